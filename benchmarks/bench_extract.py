"""Extraction benchmark: JPEG folder -> finished HDF5 cache, against the practitioners' Keras way, same run.

    python benchmarks/bench_extract.py [--data DIR] [--weights FILE] [--skip-keras] [--precision int8] [--rounds 3]

Measures, on the same images with the same backbone (MobileNetV2 1.0 @ 224, real weights), in interleaved
rounds (medians of the per-round ratios are reported):
  keras      image_dataset_from_directory + preprocess_input + model.predict (the guides' way)
  tlpipe     `features.extract` end to end (discover, hash, decode, ONNX Runtime, HDF5 commits)
  inference  the same ONNX model on pre-decoded uint8 tensors, best of 1 or 2 streams (the ceiling)
  cached     a re-run over the fully cached folder
Writes benchmarks/results/extract[_PRECISION].json. Defaults use ../shared (weights + cats_vs_dogs).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"


def keras_baseline(data: Path, weights: Path) -> tuple[float, int]:
    import keras

    model = keras.applications.MobileNetV2(include_top=False, weights=str(weights), input_shape=(224, 224, 3), pooling="avg")
    started = time.perf_counter()
    ds = keras.utils.image_dataset_from_directory(data, image_size=(224, 224), batch_size=32, shuffle=False, verbose=False)
    ds = ds.map(lambda x, y: (keras.applications.mobilenet_v2.preprocess_input(x), y))
    features = model.predict(ds, verbose=0)
    return time.perf_counter() - started, len(features)


def pure_inference(entry, images, batch: int = 32, rounds: int = 3, streams: int = 1) -> float:
    """Best of ``rounds`` over pre-decoded tensors, ``streams`` sessions splitting the cores, each fed
    by its own thread (so the ceiling is measured with the same parallelism extract may use)."""
    from concurrent.futures import ThreadPoolExecutor

    from tlpipe.backbones.runtime import OnnxEmbedder

    embed = OnnxEmbedder(entry.model_path, device="cpu", streams=streams)
    batches = [images[i:i + batch] for i in range(0, len(images), batch)]
    best = 0.0
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(embed, batches[:streams]))  # warm-up, every session
        for _ in range(rounds):
            started = time.perf_counter()
            list(pool.map(embed, batches))
            best = max(best, len(images) / (time.perf_counter() - started))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / "datasets" / "cats_vs_dogs")
    parser.add_argument("--weights", type=Path, default=SHARED / "weights" / "mobilenet_v2_1.0_224_no_top.h5")
    parser.add_argument("--skip-keras", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="fp32", help="fp32 | int8 (calibrated on --data)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/extract[_PRECISION].json")
    args = parser.parse_args()
    suffix = "" if args.precision == "fp32" else f"_{args.precision}"
    args.out = args.out or ROOT / "benchmarks" / "results" / f"extract{suffix}.json"
    if not args.data.is_dir() or not args.weights.is_file():
        sys.exit(f"benchmark data not found ({args.data}, {args.weights}); pass --data and --weights")

    import numpy as np

    from tlpipe.backbones.export import export_backbone
    from tlpipe.backbones.store import ModelStore
    from tlpipe.features.extract import extract
    from tlpipe.features.images import load_image
    from tlpipe.features.sources import discover

    work = Path(tempfile.mkdtemp(prefix="tlpipe-bench-"))
    store = ModelStore(work / "store")
    entry = export_backbone("mobilenet_v2", weights=args.weights, store=store)
    if args.precision != "fp32":
        from tlpipe.features.calibration import variant_for

        entry = variant_for(entry, args.precision, store, discover(args.data).records)
    records = discover(args.data).records
    results: dict = {"images": len(records), "precision": args.precision, "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
                     "backbone": entry.key}

    decoded = np.stack([load_image(r.abspath, 224)[0] for r in records[:320]])
    started = time.perf_counter()
    for r in records[:320]:
        load_image(r.abspath, 224)
    results["decode_img_s_1_thread"] = 320 / (time.perf_counter() - started)
    # Rounds interleave the three measurements, so drift in a shared machine's speed hits all of them alike;
    # the figures reported are the medians of the per-round ratios.
    rounds: list[dict] = []
    for i in range(args.rounds):
        by_streams = {n: pure_inference(entry, decoded, rounds=1, streams=n) for n in (1, 2)}
        summary = extract(args.data, work / f"cache{i}.h5", model=str(entry.directory), device="cpu")
        row = {"inference_img_s": max(by_streams.values()), "inference_by_streams": by_streams,
               "tlpipe_img_s": summary.embedded / summary.seconds}
        row["fraction_of_inference"] = row["tlpipe_img_s"] / row["inference_img_s"]
        if not args.skip_keras:
            seconds, n = keras_baseline(args.data, args.weights)
            row["keras_img_s"] = n / seconds
            row["speedup_vs_keras"] = row["tlpipe_img_s"] / row["keras_img_s"]
        rounds.append(row)
        print(f"round {i + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)), flush=True)
    results["rounds"] = rounds
    for name in ("inference_img_s", "tlpipe_img_s", "keras_img_s", "fraction_of_inference", "speedup_vs_keras"):
        if name in rounds[0]:
            results[name] = float(np.median([r[name] for r in rounds]))
    rerun = extract(args.data, work / "cache0.h5", model=str(entry.directory), device="cpu")
    results["cached_rerun_img_s"] = rerun.cached / rerun.seconds
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    width = max(map(len, results))
    for k, v in results.items():
        if k != "rounds":
            print(f"{k:<{width}}  {v:.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
