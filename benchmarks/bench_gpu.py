"""The CUDA path, measured: extraction and scoring under onnxruntime-gpu, fp32 and fp16, against the CPU path.

Two steps (see ../shared/gpu/README.md for carrying onnxruntime-gpu to a lent GPU machine):

    python benchmarks/bench_gpu.py prepare [--weights FILE] [--photos DIR] [--dest .gpudata]
        Here, with TensorFlow: exports MobileNetV2 1.0 @224 (fp32, and its fp16 variant) into
        DEST/store, fits a logistic-regression head on --photos and fuses it into DEST/classifier.onnx,
        and copies a few hundred photos into DEST/photos. The device has no TensorFlow: this is what it needs.

    python benchmarks/bench_gpu.py run [--data .gpudata] [--images 20000] [--out $OUT/gpu.json]
        Anywhere (no TensorFlow needed). Multiplies DATA/photos into --images distinct JPEGs (random crops
        of 60-100 % per side, re-encoded at quality 80-95, seeded: every file has its own content), then
        measures, each in img/s in the same run:
          1. pure inference on pre-decoded uint8 batches: CUDA fp32 and fp16 at batch 32-256 (CPU at 32);
          2. `tlpipe extract --device cuda` end to end (decode threads = cores), fp32 and fp16;
          3. `tlpipe score --device cuda` with the fused classifier;
          4. the CPU path on the same host (extract and score on a subset, --cpu-images);
          5. embeddings CUDA vs CPU on that subset: mean / min cosine (fp32 >= 0.9999, fp16 >= 0.999),
             and whether the fused classifier's predictions are equal;
          6. the strict check: `--device cuda` with the GPU hidden (CUDA_VISIBLE_DEVICES="") fails with one
             line, and `--device auto` warns and falls back to the CPU.
        GPU utilisation is sampled with `nvidia-smi` during each CUDA run when it exists. Without a CUDA
        provider every CUDA measurement is skipped with the reason, so the script runs end to end on a
        CPU-only machine first. Writes one JSON document (default: $OUT/gpu.json, else
        benchmarks/results/gpu_cpu_dryrun.json) and prints it.

tlpipe is imported from this checkout, installed or not (the device has no network to install it): the
checkout goes on PYTHONPATH after the caller's (where assemble.sh puts onnxruntime-gpu first).
On the device both onnxruntime builds are visible to importlib.metadata on purpose: this script sets
TLPIPE_ALLOW_MIXED_ONNXRUNTIME=1 (the documented override) for its children.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
THRESHOLDS = {"fp32": 0.9999, "fp16": 0.999}


# ---------------------------------------------------------------------------------------------------- set-up
def tlpipe_pythonpath() -> str:
    """A PYTHONPATH under which ``import tlpipe`` is this checkout, installed or not (the facade finds the
    packages beside itself in a source checkout), after whatever PYTHONPATH the caller set (assemble.sh puts
    onnxruntime-gpu first)."""
    inherited = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join(p for p in (inherited, str(ROOT)) if p)


def child_env(pythonpath: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": pythonpath,
        "TLPIPE_ALLOW_MIXED_ONNXRUNTIME": "1",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "COLUMNS": "200",
        **extra,
    }


def tlpipe(args: Sequence[object], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    """Run the `tlpipe` command line of this checkout; returns the finished process."""
    done = subprocess.run(
        [sys.executable, "-m", "tlpipe.pipeline.cli", *map(str, args)], env=env, capture_output=True, text=True
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"tlpipe {' '.join(map(str, args))} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return done


# --------------------------------------------------------------------------------------------------- prepare
def prepare(args: argparse.Namespace) -> None:
    """Export fp32 + fp16 MobileNetV2, fit and fuse a logreg head, copy photos: everything the device needs."""
    env = child_env(tlpipe_pythonpath())
    dest: Path = args.dest
    store = dest / "store"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    weights = str(args.weights) if args.weights.is_file() else "none"
    common = ["--backbone", "mobilenet_v2", "--weights", weights, "--store", store]
    tlpipe(["export", *common], env)
    tlpipe(["export", *common, "--precision", "fp16"], env)
    entries = {("fp16" if "-fp16-" in p.name else "fp32"): p.name for p in store.iterdir() if p.is_dir()}
    if set(entries) != {"fp32", "fp16"}:
        raise RuntimeError(f"expected an fp32 and an fp16 entry in {store}, found {sorted(entries.values())}")
    work = Path(tempfile.mkdtemp(prefix="tlpipe-gpu-prepare-"))
    try:
        cache = work / "cache.h5"
        tlpipe(
            [
                "extract",
                args.photos,
                "--model",
                store / entries["fp32"],
                "--store",
                store,
                "--out",
                cache,
                "--device",
                "cpu",
                "--quiet",
            ],
            env,
        )
        tlpipe(["fit-head", cache, "--model", "logreg", "--out", work / "head.joblib"], env)
        tlpipe(["export-model", work / "head.joblib", "--out", dest / "classifier.onnx", "--store", store], env)
    finally:
        shutil.rmtree(work)
    photos = sorted(p for p in args.photos.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    random.Random(0).shuffle(photos)
    for i, photo in enumerate(photos[: args.count]):
        target = dest / "photos" / f"{i:04d}{photo.suffix.lower()}"
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(photo, target)
    (dest / "manifest.json").write_text(
        json.dumps({"entries": entries, "weights": weights, "photos_from": str(args.photos)}, indent=2)
    )
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(
        f"{dest}: {size / 2**20:.1f} MiB ({', '.join(f'{k}={v}' for k, v in entries.items())}, "
        f"{min(len(photos), args.count)} photos)"
    )


# ------------------------------------------------------------------------------------------------------- run
def _variant(job: tuple[str, str, int]) -> int:
    """Write one seeded random crop of a photo, re-encoded as JPEG (runs in a worker process)."""
    from PIL import Image

    source, target, seed = job
    rng = random.Random(seed)
    with Image.open(source) as im:
        im = im.convert("RGB")
        w, h = im.size
        cw, ch = max(32, int(w * rng.uniform(0.6, 1.0))), max(32, int(h * rng.uniform(0.6, 1.0)))
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = im.crop((left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop.save(target, "JPEG", quality=rng.randint(80, 95))
    return 1


def multiply(photos: list[Path], dest: Path, count: int, cores: int) -> float:
    """``count`` distinct JPEGs in ``dest`` made from ``photos``; returns the seconds it took."""
    dest.mkdir(parents=True, exist_ok=True)
    jobs = [(str(photos[i % len(photos)]), str(dest / f"{i:06d}.jpg"), i) for i in range(count)]
    started = time.perf_counter()
    with ProcessPoolExecutor(cores) as pool:
        sum(pool.map(_variant, jobs, chunksize=64))
    return time.perf_counter() - started


class GpuSampler:
    """Samples GPU utilisation (%) with nvidia-smi every 200 ms while in a `with` block, when nvidia-smi exists."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                self.samples.append(float(line.split(",")[0]))
            except ValueError:
                pass

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        busy = np.asarray(self.samples)
        return {
            "mean_pct": round(float(busy.mean()), 1),
            "p90_pct": round(float(np.percentile(busy, 90)), 1),
            "samples": len(busy),
        }


def decoded_batch(images: list[Path], count: int, size: int) -> np.ndarray:
    """``count`` of the images decoded and resized the way extraction does it: uint8 (count, size, size, 3)."""
    from tlpipe.features.images import decode_image

    return np.stack([decode_image(p.read_bytes(), size, "squash")[0] for p in images[:count]])


def pure_inference(model: Path, device: str, pixels: np.ndarray, batches: list[int], seconds: float) -> dict:
    """img/s of the embedder alone on pre-decoded batches, each batch size timed for >= ``seconds``."""
    from tlpipe.backbones.runtime import OnnxEmbedder, default_streams

    embedder = OnnxEmbedder(model, device=device, streams=default_streams() if device == "cpu" else 1)
    result: dict[str, object] = {"provider": embedder.provider}
    for batch in batches:
        x = pixels[:batch] if len(pixels) >= batch else np.resize(pixels, (batch, *pixels.shape[1:]))
        embedder(x)  # warm-up: CUDA kernels, cuDNN algorithm search, arena growth
        done, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds or done < 3 * batch:
            embedder(x)
            done += batch
        result[f"batch_{batch}"] = round(done / elapsed, 1)
    return result


def timed_cli(args: Sequence[object], env: dict[str, str], images: int, sample_gpu: bool) -> dict:
    """Run one tlpipe command end to end (process start included) and report img/s."""
    started = time.perf_counter()
    with GpuSampler() if sample_gpu else _null() as sampler:
        done = tlpipe(args, env)
    seconds = time.perf_counter() - started
    out: dict[str, object] = {"images": images, "seconds": round(seconds, 2), "img_s": round(images / seconds, 1)}
    if sampler is not None and sampler.summary():
        out["gpu_utilisation"] = sampler.summary()
    if "CUDA" in done.stderr and "fall" in done.stderr:
        out["stderr"] = done.stderr[-500:]
    return out


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def embeddings_by_sha(cache: Path) -> dict[str, np.ndarray]:
    from tlpipe.features.cache import read_feature_set

    fs = read_feature_set(cache)
    return dict(zip(fs.sha256, np.asarray(fs.X, dtype=np.float64)))


def cosine_agreement(a: Path, b: Path) -> dict:
    """Mean and minimum cosine between two caches' embeddings of the same images (matched by sha256)."""
    ea, eb = embeddings_by_sha(a), embeddings_by_sha(b)
    common = sorted(set(ea) & set(eb))
    x, y = np.stack([ea[s] for s in common]), np.stack([eb[s] for s in common])
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1) + 1e-12)
    return {"images": len(common), "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}


def predictions(csv_path: Path) -> dict[str, str]:
    import csv

    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    label = next(k for k in ("label", "top1_label", "predicted") if k in rows[0])
    return {r["sha256"]: r[label] for r in rows}


def strict_check(model: Path, store: Path, images: Path, env: dict[str, str], work: Path, has_cuda: bool) -> dict:
    """--device cuda with the GPU hidden fails with one line; --device auto warns and falls back (on a build
    without a CUDA provider there is nothing to fall back from, so no warning is expected there)."""
    hidden = {**env, "CUDA_VISIBLE_DEVICES": ""}
    base = ["extract", images, "--model", model, "--store", store, "--quiet"]
    cuda = tlpipe([*base, "--out", work / "strict_cuda.h5", "--device", "cuda"], hidden, check=False)
    auto = tlpipe([*base, "--out", work / "strict_auto.h5", "--device", "auto"], hidden, check=False)
    cuda_lines = [line for line in cuda.stderr.strip().splitlines() if line.strip()]
    return {
        "cuda_exit": cuda.returncode,
        "cuda_stderr_lines": len(cuda_lines),
        "cuda_message": cuda_lines[-1] if cuda_lines else "",
        "cuda_ok": cuda.returncode != 0 and len(cuda_lines) == 1 and "cuda" in cuda.stderr.lower(),
        "auto_exit": auto.returncode,
        "auto_warning": " ".join(auto.stderr.split())[-300:],
        "auto_ok": auto.returncode == 0
        and (work / "strict_auto.h5").exists()
        and (not has_cuda or "running on the cpu" in auto.stderr.lower()),
    }


def run(args: argparse.Namespace) -> None:
    pythonpath = tlpipe_pythonpath()
    os.environ["PYTHONPATH"] = pythonpath
    os.environ["TLPIPE_ALLOW_MIXED_ONNXRUNTIME"] = "1"
    sys.path[:0] = [p for p in pythonpath.split(os.pathsep) if p]
    env = child_env(pythonpath)

    import onnxruntime as ort

    from tlpipe.backbones.runtime import physical_cores

    data: Path = args.data.resolve()
    entries = json.loads((data / "manifest.json").read_text())["entries"]
    store, classifier = data / "store", data / "classifier.onnx"
    models = {precision: store / key for precision, key in entries.items()}
    cores = physical_cores()
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    skip = None if has_cuda else f"no CUDA provider in this ONNX Runtime ({', '.join(available)})"
    results: dict = {
        "machine": {
            "platform": platform.platform(),
            "cores": cores,
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "onnxruntime_file": ort.__file__,
            "providers": available,
        },
        "cuda_skipped": skip,
        "entries": entries,
    }
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        results["machine"]["gpu"] = smi.stdout.strip()

    work = Path(tempfile.mkdtemp(prefix="tlpipe-bench-gpu-"))
    try:
        photos = sorted((data / "photos").iterdir())
        images = work / "images"
        results["images"] = {
            "count": args.images,
            "from_photos": len(photos),
            "generate_seconds": round(multiply(photos, images, args.images, cores), 1),
        }
        files = sorted(images.iterdir())
        subset = work / "subset"
        subset.mkdir()
        for f in files[: args.cpu_images]:
            (subset / f.name).symlink_to(f)

        # 1. pure inference
        pixels = decoded_batch(files, 256, 224)
        inference: dict = {}
        for precision, model in models.items():
            if has_cuda:
                inference[f"cuda_{precision}"] = pure_inference(
                    model / "model.onnx", "cuda", pixels, [32, 64, 128, 256], args.seconds
                )
            inference[f"cpu_{precision}"] = pure_inference(model / "model.onnx", "cpu", pixels, [32], args.seconds)
        results["pure_inference_img_s"] = inference

        # 2. and 4. extract end to end, CUDA on the whole set, CPU on the subset
        extract: dict = {}
        for precision, model in models.items():
            base = ["extract", "--model", model, "--store", store, "--quiet", "--workers", cores]
            if has_cuda:
                extract[f"cuda_{precision}"] = timed_cli(
                    [
                        base[0],
                        images,
                        *base[1:],
                        "--device",
                        "cuda",
                        "--batch-size",
                        args.batch_size,
                        "--out",
                        work / f"cuda_{precision}.h5",
                    ],
                    env,
                    len(files),
                    sample_gpu=True,
                )
                tlpipe(
                    [base[0], subset, *base[1:], "--device", "cuda", "--out", work / f"cuda_sub_{precision}.h5"], env
                )
            extract[f"cpu_{precision}"] = timed_cli(
                [base[0], subset, *base[1:], "--device", "cpu", "--out", work / f"cpu_{precision}.h5"],
                env,
                args.cpu_images,
                sample_gpu=False,
            )
        results["extract"] = extract

        # 3. and 4. scoring with the fused classifier
        scoring: dict = {}
        if has_cuda:
            scoring["cuda"] = timed_cli(
                [
                    "score",
                    images,
                    "--model",
                    classifier,
                    "--device",
                    "cuda",
                    "--quiet",
                    "--workers",
                    cores,
                    "--batch-size",
                    args.batch_size,
                    "--out",
                    work / "cuda.csv",
                ],
                env,
                len(files),
                sample_gpu=True,
            )
            tlpipe(
                ["score", subset, "--model", classifier, "--device", "cuda", "--quiet", "--out", work / "cuda_sub.csv"],
                env,
            )
        scoring["cpu"] = timed_cli(
            [
                "score",
                subset,
                "--model",
                classifier,
                "--device",
                "cpu",
                "--quiet",
                "--workers",
                cores,
                "--out",
                work / "cpu_sub.csv",
            ],
            env,
            args.cpu_images,
            sample_gpu=False,
        )
        results["score"] = scoring

        # 5. agreement, CUDA vs CPU on the same images
        if has_cuda:
            agreement: dict = {}
            for precision in models:
                found = cosine_agreement(work / f"cuda_sub_{precision}.h5", work / f"cpu_{precision}.h5")
                agreement[precision] = {
                    **found,
                    "threshold": THRESHOLDS[precision],
                    "ok": found["mean_cosine"] >= THRESHOLDS[precision],
                }
            gpu_pred, cpu_pred = predictions(work / "cuda_sub.csv"), predictions(work / "cpu_sub.csv")
            agreement["predictions_equal"] = gpu_pred == cpu_pred
            agreement["predictions_differing"] = sum(gpu_pred[s] != cpu_pred.get(s) for s in gpu_pred)
            results["cuda_vs_cpu"] = agreement
            fastest = max(v for k, v in inference["cuda_fp32"].items() if k.startswith("batch_"))
            results["bound"] = {
                "extract_fp32_over_pure_inference": round(extract["cuda_fp32"]["img_s"] / fastest, 3),
                "reading": "decode-bound" if extract["cuda_fp32"]["img_s"] < 0.8 * fastest else "inference-bound",
            }
        else:
            results["cuda_vs_cpu"] = {"skipped": skip}

        # 6. strict provider check with the GPU hidden
        probe = work / "probe"
        probe.mkdir()
        for f in files[:16]:
            (probe / f.name).symlink_to(f)
        results["strict_check"] = strict_check(models["fp32"], store, probe, env, work, has_cuda)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    text = json.dumps(results, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare", help="export models, fuse a head, copy photos (here, with TensorFlow)")
    p.add_argument("--weights", type=Path, default=SHARED / "weights" / "mobilenet_v2_1.0_224_no_top.h5")
    p.add_argument("--photos", type=Path, default=SHARED / "datasets" / "cats_vs_dogs")
    p.add_argument(
        "--count",
        type=int,
        default=150,
        help="photos to carry (keep .gpudata small enough to travel with the last wheel part)",
    )
    p.add_argument("--dest", type=Path, default=ROOT / ".gpudata")
    r = sub.add_parser("run", help="measure (on the device, or here with CUDA parts skipped)")
    r.add_argument("--data", type=Path, default=ROOT / ".gpudata")
    r.add_argument("--images", type=int, default=20000)
    r.add_argument("--cpu-images", type=int, default=2000, help="subset for the CPU path and the agreement check")
    r.add_argument("--batch-size", type=int, default=128)
    r.add_argument("--seconds", type=float, default=3.0, help="time per pure-inference configuration")
    default_out = (
        Path(os.environ["OUT"]) / "gpu.json"
        if os.environ.get("OUT")
        else ROOT / "benchmarks" / "results" / "gpu_cpu_dryrun.json"
    )
    r.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args)
    else:
        if args.cpu_images > args.images:
            parser.error("--cpu-images cannot exceed --images")
        run(args)


if __name__ == "__main__":
    main()
