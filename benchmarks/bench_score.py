"""Scoring benchmark: fused-classifier scoring against extraction on the same images, and peak memory vs size.

    python benchmarks/bench_score.py [--quick] [--data DIR] [--weights FILE] [--out FILE]

On a folder of generated JPEGs (copies of --data's photos, ~480x375, each with a few pixels changed so that
every file has its own content hash), with MobileNetV2 1.0 @ 224 (--weights if the file exists, else
random init):
  extract        `features.extract` end to end (decode threads + ONNX Runtime + HDF5 commits)
  score_fused    `pipeline.score` with the fused classifier from `pipeline.fuse.export_model` (CSV output)
  score_head     `pipeline.score` with the saved head (backbone session, then predict_proba)
Throughput is the best of two alternating rounds (target: score_fused within 10 % of extract). Peak RSS of
scoring SMALL and LARGE images (2,000 and 20,000; --quick: 200 and 1,000) is measured in a fresh child
process each, through resource.getrusage(RUSAGE_CHILDREN) of a wrapper (target: flat).
Writes benchmarks/results/score.json (--quick: score_quick.json).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import zip_longest
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"

SCORE_CHILD = """
import json, sys
from tlpipe.pipeline.scoring.score import score
s = score(sys.argv[1], sys.argv[2], model=sys.argv[3], device="cpu")
print(json.dumps({"written": s.written, "failed": s.failed, "seconds": s.seconds, "img_s": s.images_per_second}))
"""
# A fresh wrapper per measurement: RUSAGE_CHILDREN is the peak over the children it has waited for.
RSS_WRAPPER = """
import json, resource, subprocess, sys
child = subprocess.run(sys.argv[1:], capture_output=True, text=True, check=True)
peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({**json.loads(child.stdout.strip().splitlines()[-1]), "peak_rss_mb": peak_kb / 1024}))
"""


def source_photos(data: Path) -> list[tuple[str, str | np.ndarray]]:
    """(label, file or RGB array) of the photos to copy: --data's class folders, else scikit-learn's samples."""
    from PIL import Image

    from tlpipe.features.sources import discover

    if data.is_dir():
        by_label: dict[str, list[str]] = {}
        for r in discover(data).records:
            by_label.setdefault(r.label or "unlabelled", []).append(r.abspath)
        # classes interleaved, so that any prefix of the copies holds every class
        return [
            (label, path)
            for group in zip_longest(*by_label.values())
            for label, path in zip(by_label, group)
            if path is not None
        ]
    from sklearn.datasets import load_sample_images

    samples, photos, rng = load_sample_images().images, [], np.random.default_rng(0)
    for i in range(20):  # 480x375 crops, classes interleaved
        for label, photo in zip(("china", "flower"), samples):
            top, left = int(rng.integers(0, 40)), int(rng.integers(0, 150))
            crop = Image.fromarray(photo[top : top + 375, left : left + 480])
            photos.append((label, np.asarray(crop if i % 2 else crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT))))
    return photos


def make_images(dest: Path, count: int, photos: list[tuple[str, str | np.ndarray]]) -> list[tuple[str, str]]:
    """``count`` JPEGs under ``dest/<label>/``, round-robin copies of ``photos`` with 8 pixels changed each."""
    from PIL import Image

    from tlpipe.backbones.runtime import physical_cores

    copies = [list(range(i, count, len(photos))) for i in range(min(len(photos), count))]

    def write(index: int) -> list[tuple[str, str]]:
        label, photo = photos[index]
        pixels = np.asarray(Image.open(photo).convert("RGB")) if isinstance(photo, str) else photo
        (dest / label).mkdir(parents=True, exist_ok=True)
        written = []
        for n in copies[index]:
            rng = np.random.default_rng(n)
            copy = pixels.copy()
            ys, xs = rng.integers(0, copy.shape[0], 8), rng.integers(0, copy.shape[1], 8)
            copy[ys, xs] = rng.integers(0, 256, (8, 3), dtype=np.uint8)
            relpath = f"{label}/{n:06d}.jpg"
            Image.fromarray(copy).save(dest / relpath, "JPEG", quality=90)
            written.append((relpath, label))
        return written

    with ThreadPoolExecutor(physical_cores()) as pool:
        rows = [row for chunk in pool.map(write, range(len(copies))) for row in chunk]
    return sorted(rows, key=lambda r: int(Path(r[0]).stem))


def manifest(folder: Path, rows: list[tuple[str, str]], count: int) -> Path:
    """A CSV manifest of the first ``count`` generated images (same folder, so paths stay relative)."""
    path = folder / f"first_{count}.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows(rows[:count])
    return path


def peak_rss(source: Path, out: Path, model: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = [sys.executable, "-c", SCORE_CHILD, str(source), str(out), str(model)]
    result = subprocess.run(
        [sys.executable, "-c", RSS_WRAPPER, *child], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 vs 1,000 images: checks the benchmark runs")
    parser.add_argument("--data", type=Path, default=SHARED / "datasets" / "cats_vs_dogs")
    parser.add_argument("--weights", type=Path, default=SHARED / "weights" / "mobilenet_v2_1.0_224_no_top.h5")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (generated images, models)")
    args = parser.parse_args()
    small, large = (200, 1000) if args.quick else (2000, 20000)
    out = args.out or ROOT / "benchmarks" / "results" / ("score_quick.json" if args.quick else "score.json")

    from tlpipe.backbones.export import export_backbone
    from tlpipe.backbones.store import ModelStore
    from tlpipe.features.cache import read_feature_set
    from tlpipe.features.extract import extract
    from tlpipe.pipeline.heads.estimators import make_head
    from tlpipe.pipeline.heads.persistence import save_head
    from tlpipe.pipeline.scoring.fuse import export_model
    from tlpipe.pipeline.scoring.score import score

    work = Path(tempfile.mkdtemp(prefix="tlpipe-bench-score-"))
    try:
        weights = args.weights if args.weights.is_file() else "none"
        store = ModelStore(work / "store")
        entry = export_backbone("mobilenet_v2", weights=weights, store=store)
        started = time.perf_counter()
        images = work / "images"
        rows = make_images(images, large, source_photos(args.data))
        results: dict = {
            "quick": args.quick,
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
            "backbone": entry.key,
            "weights": str(weights),
            "source_photos": str(args.data) if args.data.is_dir() else "sklearn samples",
            "generate_seconds": round(time.perf_counter() - started, 1),
            "throughput_images": small,
        }
        bench_set = manifest(images, rows, small)

        rounds: dict[str, list[float]] = {"extract": [], "score_fused": []}
        fused = work / "classifier.onnx"
        for r in range(2):
            cache = work / f"cache{r}.h5"
            summary = extract(bench_set, cache, model=str(entry.directory), store=store, device="cpu")
            rounds["extract"].append(summary.embedded / summary.seconds)
            if r == 0:
                fs = read_feature_set(cache)
                head = make_head("logreg").fit(fs.X, fs.y)
                save_head(head, work / "head.joblib", feature_set=fs, metrics={}, params={})
                results["fuse_verification"] = export_model(work / "head.joblib", fused, store=store)["verification"]
            summary = score(bench_set, work / f"fused{r}.csv", model=fused, device="cpu")
            rounds["score_fused"].append(summary.scored / summary.seconds)
        summary = score(bench_set, work / "head.csv", head=work / "head.joblib", store=store, device="cpu")
        results["rounds_img_s"] = rounds
        results["extract_img_s"] = max(rounds["extract"])
        results["score_fused_img_s"] = max(rounds["score_fused"])
        results["score_head_img_s"] = summary.scored / summary.seconds
        results["fused_vs_extract"] = results["score_fused_img_s"] / results["extract_img_s"]

        for count in (small, large):
            source = bench_set if count == small else manifest(images, rows, large)
            results[f"rss_{count}"] = peak_rss(source, work / f"rss{count}.csv", fused)
        results["rss_growth"] = results[f"rss_{large}"]["peak_rss_mb"] / results[f"rss_{small}"]["peak_rss_mb"]

        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        width = max(map(len, results))
        for k, v in results.items():
            print(f"{k:<{width}}  {v:.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    finally:
        if args.keep:
            print(f"work folder: {work}")
        else:
            shutil.rmtree(work)


if __name__ == "__main__":
    main()
