"""Extraction benchmark: JPEG folder -> finished HDF5 cache, against the practitioners' Keras way, same run.

    python benchmarks/bench_extract.py [--data DIR] [--weights FILE] [--skip-keras] [--precision int8] [--rounds 3]
                                       [--skip-quality] [--quick]

Measures, on the same images with the same backbone (MobileNetV2 1.0 @ 224, real weights), in interleaved
rounds (medians of the per-round ratios are reported):
  keras      image_dataset_from_directory + preprocess_input + model.predict (the guides' way)
  tlpipe     `features.extract` end to end (discover, hash, decode, ONNX Runtime, HDF5 commits)
  inference  the same ONNX model on pre-decoded uint8 tensors, best of 1 or 2 streams (the ceiling)
  cached     a re-run over the fully cached folder
  CPU        ms.core per image of pure inference and of extract (process CPU time, robust to other load) and
             their ratio, the fraction of inference extract can reach on cores it has to itself
and, before the rounds:
  decode     ms.core per image (thread CPU time, robust to a loaded machine) of decode + resize to 224:
             before (Pillow decode + antialiased resize) and after (libjpeg-turbo + OpenCV bilinear), and the
             bilinear filter without the libraries (Pillow decode + numpy);
  threads    read + hash + decode img/s with 1 and 2 threads (extract's mapper), the serial fraction this
             implies (Amdahl) and the decode ceiling it predicts for 16 cores;
  bound      the fraction of pure inference no extraction on these cores can exceed: every core busy
             with nothing but inference and libjpeg-turbo's bare full-size decode (the decode floor);
  quality    (fp32 only) embeddings of each resize filter against the old path and against Keras'
             image_dataset_from_directory pixels (mean / min cosine), and a logistic-regression probe on
             cats_vs_dogs (manifest split) and flowers5_128px (5-fold CV) for each.
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

    model = keras.applications.MobileNetV2(
        include_top=False, weights=str(weights), input_shape=(224, 224, 3), pooling="avg"
    )
    started = time.perf_counter()
    ds = keras.utils.image_dataset_from_directory(
        data, image_size=(224, 224), batch_size=32, shuffle=False, verbose=False
    )
    ds = ds.map(lambda x, y: (keras.applications.mobilenet_v2.preprocess_input(x), y))
    features = model.predict(ds, verbose=0)
    return time.perf_counter() - started, len(features)


def pure_inference(entry, images, batch: int = 32, rounds: int = 3, streams: int = 1) -> float:
    """Best of ``rounds`` over pre-decoded tensors, ``streams`` sessions splitting the cores, each fed
    by its own thread (so the ceiling is measured with the same parallelism extract may use)."""
    from concurrent.futures import ThreadPoolExecutor

    from tlpipe.backbones.runtime import OnnxEmbedder

    embed = OnnxEmbedder(entry.model_path, device="cpu", streams=streams)
    batches = [images[i : i + batch] for i in range(0, len(images), batch)]
    best = 0.0
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(embed, batches[:streams]))  # warm-up, every session
        clock = time.process_time()
        for _ in range(rounds):
            started = time.perf_counter()
            list(pool.map(embed, batches))
            best = max(best, len(images) / (time.perf_counter() - started))
    INFERENCE_CPU_MS.append((time.process_time() - clock) / (rounds * len(images)) * 1e3)
    return best


INFERENCE_CPU_MS: list[float] = []  # ms.core per image of each pure_inference call (process CPU time)


def least_thread_ms(fn, items, passes: int) -> float:
    """ms of this thread's CPU time per item of ``fn`` over ``items``: the least of ``passes`` passes (thread CPU
    time does not count the time other processes hold the core)."""
    best = float("inf")
    for _ in range(passes):
        started = time.thread_time()
        for item in items:
            fn(item)
        best = min(best, (time.thread_time() - started) / len(items) * 1e3)
    return best


def decode_costs(datas: list[bytes], size: int = 224, passes: int = 3) -> dict[str, float]:
    """ms.core per image of decode + resize on one thread, by path: the least thread CPU time of ``passes``
    passes (thread CPU time does not count the time other processes hold the core)."""
    from tlpipe.features import fastdecode
    from tlpipe.features.images import decode_image

    def cost(resize_filter: str) -> float:
        return least_thread_ms(lambda data: decode_image(data, size, resize_filter=resize_filter), datas, passes)

    with fastdecode.disabled():
        before = cost("antialias")  # the path before this change: Pillow decode + antialiased resize
        pillow_bilinear = cost("bilinear")  # Pillow decode + bilinear in numpy: without the libraries
    costs = {
        "before_pillow_antialias": before,
        "after_fast_bilinear": cost("bilinear"),
        "pillow_decode_numpy_bilinear": pillow_bilinear,
    }
    try:  # the floor: libjpeg-turbo's full-size decode alone, no resize, no header parsing (JPEGs only)
        import simplejpeg

        jpegs = [d for d in datas if simplejpeg.is_jpeg(d)]
        if jpegs:  # ms.core per JPEG (the photo sets benchmarked are all JPEG)
            costs["libjpeg_turbo_decode_only"] = least_thread_ms(
                lambda d: simplejpeg.decode_jpeg(d, colorspace="RGB"), jpegs, passes
            )
    except ImportError:
        pass
    return costs


def thread_scaling(records, size: int = 224, threads=(1, 2), rounds: int = 2) -> dict:
    """Read + hash + decode img/s through extract's mapper (:func:`~tlpipe.features.decoder.iter_decoded`) with 1 and 2 threads, CPU per
    image, the serial fraction ``s`` implied by the 2-thread speed-up (Amdahl: speedup(n) = 1 / (s + (1-s)/n))
    and the decode ceiling it predicts for 16 cores."""
    from tlpipe.features.decoder import iter_decoded

    out: dict = {"img_s": {}, "cpu_ms_per_image": {}}
    for n in threads:
        best, cpu = 0.0, float("inf")
        for _ in range(rounds):
            wall, clock = time.perf_counter(), time.process_time()
            count = sum(1 for _ in iter_decoded(records, size, "squash", lambda sha: False, workers=n))
            best = max(best, count / (time.perf_counter() - wall))
            cpu = min(cpu, (time.process_time() - clock) / count * 1e3)
        out["img_s"][n], out["cpu_ms_per_image"][n] = best, cpu
    one, two = out["img_s"][threads[0]], out["img_s"][threads[-1]]
    speedup = two / one
    serial = min(1.0, max(0.0, (threads[-1] / speedup - 1) / (threads[-1] - 1)))
    out.update(gil_held_ms(records[:200], size))
    # The decode ceiling on n cores: n / (CPU per image), unless the GIL-held part saturates first.
    out["model_img_s_16_cores"] = min(16e3 / out["worker_ms_core"], 1e3 / max(out["gil_held_ms"], 1e-9))
    out["speedup_2_threads"] = speedup
    out["serial_fraction"] = serial
    out["predicted_img_s_16_cores"] = one / (serial + (1 - serial) / 16)
    out["ideal_img_s_16_cores"] = 16 * 1e3 / out["cpu_ms_per_image"][threads[0]]
    return out


def gil_held_ms(records, size: int = 224, passes: int = 3) -> dict[str, float]:
    """ms per image that extract's decode worker holds the GIL (the part that cannot run in parallel):
    thread CPU time of the whole worker (read, sha256, decode, resize) minus that of the calls that release
    the GIL (file read, hashlib on large buffers, simplejpeg's decode, OpenCV's resize), on one thread."""
    import hashlib

    import cv2
    import simplejpeg

    from tlpipe.features.decoder import decode_record
    from tlpipe.features.fastdecode import dct_scale

    def free_calls(r) -> None:
        data = Path(r.abspath).read_bytes()
        hashlib.sha256(data).hexdigest()
        height, width = simplejpeg.decode_jpeg_header(data)[:2]
        k = dct_scale(width, height, size)
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=-(-width // k), min_height=-(-height // k))
        cv2.resize(pixels, (size, size), interpolation=cv2.INTER_LINEAR)

    total = least_thread_ms(lambda r: decode_record(r, size, "squash", lambda sha: False), records, passes)
    free = least_thread_ms(free_calls, records, passes)
    return {"worker_ms_core": total, "gil_released_ms_core": free, "gil_held_ms": max(0.0, total - free)}


def keras_pixels(data: Path, size: int = 224):
    """(relative path, uint8 pixels) batches as Keras' image_dataset_from_directory resizes them (bilinear, no
    antialiasing), rounded to uint8 for the uint8-input ONNX model."""
    import keras
    import numpy as np

    ds = keras.utils.image_dataset_from_directory(
        data, image_size=(size, size), batch_size=64, shuffle=False, labels=None, verbose=False
    )
    paths = [str(Path(p).relative_to(data)) for p in ds.file_paths]
    start = 0
    for batch in ds:
        pixels = np.clip(np.rint(batch.numpy()), 0, 255).astype(np.uint8)
        yield paths[start : start + len(pixels)], pixels
        start += len(pixels)


def quality(entry, datasets: dict[str, Path], limit: int | None = None) -> dict:
    """Embeddings per resize filter against the old path and Keras' pixels; linear-probe accuracy of each."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from tlpipe.backbones.runtime import OnnxEmbedder
    from tlpipe.features import fastdecode
    from tlpipe.features.images import load_image
    from tlpipe.features.sources import discover

    embed = OnnxEmbedder(entry.model_path, device="cpu", streams=1)
    size = entry.input_size

    def cosines(a, b):
        return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

    results: dict = {}
    for name, root in datasets.items():
        records = discover(root / "manifest.csv" if (root / "manifest.csv").is_file() else root).records
        records = records[:: max(1, len(records) // limit)][:limit] if limit else records  # every class
        index = {r.relpath: i for i, r in enumerate(records)}
        X: dict[str, np.ndarray] = {}
        for variant in (
            "old",
            "bilinear",
        ):  # old: the path before (Pillow decode + antialias, = --resize-filter antialias)
            chunks = []
            for start in range(0, len(records), 64):
                chunk = records[start : start + 64]
                if variant == "old":
                    with fastdecode.disabled():
                        pixels = [load_image(r.abspath, size, resize_filter="antialias")[0] for r in chunk]
                else:
                    pixels = [load_image(r.abspath, size, resize_filter=variant)[0] for r in chunk]
                chunks.append(embed(np.stack(pixels)))
            X[variant] = np.concatenate(chunks)
        keras_X = np.zeros_like(X["old"])
        seen = 0
        for paths, pixels in keras_pixels(root, size):
            rows = [index.get(p) for p in paths]
            keep = [i for i, row in enumerate(rows) if row is not None]
            keras_X[[rows[i] for i in keep]] = embed(pixels[keep])
            seen += len(keep)
        if seen == len(records):
            X["keras"] = keras_X
        y = np.array([r.label for r in records])
        split = np.array([r.split for r in records])
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1))
        row: dict = {"images": len(records)}
        for variant, features in X.items():
            if variant != "old":
                c = cosines(features, X["old"])
                row[f"cosine_{variant}_vs_old"] = {"mean": float(c.mean()), "min": float(c.min())}
            if variant != "keras" and "keras" in X:
                c = cosines(features, X["keras"])
                row[f"cosine_{variant}_vs_keras_pixels"] = {"mean": float(c.mean()), "min": float(c.min())}
            if set(split) >= {"train", "test"}:
                train, test = split == "train", split == "test"
                accuracy = probe.fit(features[train], y[train]).score(features[test], y[test])
                row[f"probe_{variant}"] = {"accuracy": float(accuracy), "setup": "manifest train/test"}
            else:
                folds = StratifiedKFold(5, shuffle=True, random_state=0)
                accuracy = cross_val_score(probe, features, y, cv=folds).mean()
                row[f"probe_{variant}"] = {"accuracy": float(accuracy), "setup": "5-fold stratified CV"}
        row["probe_points_bilinear_minus_old"] = 100 * (
            row["probe_bilinear"]["accuracy"] - row["probe_old"]["accuracy"]
        )
        results[name] = row
        print(f"quality {name}: " + json.dumps(row), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / "datasets" / "cats_vs_dogs")
    parser.add_argument("--weights", type=Path, default=SHARED / "weights" / "mobilenet_v2_1.0_224_no_top.h5")
    parser.add_argument("--skip-keras", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="fp32", help="fp32 | int8 (calibrated on --data)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/extract[_PRECISION].json")
    parser.add_argument("--skip-quality", action="store_true", help="skip the embedding / probe comparison (fp32)")
    parser.add_argument("--quality-limit", type=int, default=None, help="images per data set in the quality check")
    parser.add_argument("--flowers", type=Path, default=SHARED / "datasets" / "flowers5_128px")
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
    results: dict = {
        "images": len(records),
        "precision": args.precision,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "backbone": entry.key,
    }

    results["load_average_at_start"] = os.getloadavg()
    decoded = np.stack([load_image(r.abspath, 224)[0] for r in records[:320]])
    started = time.perf_counter()
    for r in records[:320]:
        load_image(r.abspath, 224)
    results["decode_img_s_1_thread"] = 320 / (time.perf_counter() - started)
    results["decode_ms_core_per_image"] = decode_costs([Path(r.abspath).read_bytes() for r in records[:300]])
    print("decode ms.core per image: " + json.dumps(results["decode_ms_core_per_image"]), flush=True)
    results["decode_threads"] = thread_scaling(records[:600])
    print("decode threads: " + json.dumps(results["decode_threads"]), flush=True)
    if args.precision == "fp32" and not args.skip_quality:
        datasets = {"cats_vs_dogs": args.data}
        if args.flowers.is_dir():
            datasets["flowers5_128px"] = args.flowers
        results["quality"] = quality(entry, datasets, args.quality_limit)
    # Rounds interleave the three measurements, so drift in a shared machine's speed hits all of them alike;
    # the figures reported are the medians of the per-round ratios.
    rounds: list[dict] = []
    for i in range(args.rounds):
        by_streams = {n: pure_inference(entry, decoded, rounds=1, streams=n) for n in (1, 2)}
        clock = time.process_time()
        summary = extract(args.data, work / f"cache{i}.h5", model=str(entry.directory), device="cpu")
        extract_cpu = (time.process_time() - clock) / summary.embedded * 1e3
        row = {
            "inference_img_s": max(by_streams.values()),
            "inference_by_streams": by_streams,
            "tlpipe_img_s": summary.embedded / summary.seconds,
        }
        row["fraction_of_inference"] = row["tlpipe_img_s"] / row["inference_img_s"]
        # CPU time is robust to other processes: on cores saturated by extract alone, its fraction of pure
        # inference is bounded by (inference ms.core per image) / (extract ms.core per image).
        row["inference_ms_core_per_image"] = min(INFERENCE_CPU_MS[-2:])
        row["extract_ms_core_per_image"] = extract_cpu
        row["cpu_fraction_of_inference"] = row["inference_ms_core_per_image"] / extract_cpu
        if not args.skip_keras:
            seconds, n = keras_baseline(args.data, args.weights)
            row["keras_img_s"] = n / seconds
            row["speedup_vs_keras"] = row["tlpipe_img_s"] / row["keras_img_s"]
        rounds.append(row)
        print(
            f"round {i + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)), flush=True
        )
    results["rounds"] = rounds
    for name in (
        "inference_img_s",
        "tlpipe_img_s",
        "keras_img_s",
        "fraction_of_inference",
        "speedup_vs_keras",
        "inference_ms_core_per_image",
        "extract_ms_core_per_image",
        "cpu_fraction_of_inference",
    ):
        if name in rounds[0]:
            results[name] = float(np.median([r[name] for r in rounds]))
    # What no extraction on these cores can beat: inference plus the decode floor alone, all cores busy.
    floor = results["decode_ms_core_per_image"].get("libjpeg_turbo_decode_only")
    if floor and floor == floor:
        cores = len(os.sched_getaffinity(0))
        best = cores * 1e3 / (results["inference_ms_core_per_image"] + floor)
        results["bound_fraction_inference_plus_decode_floor"] = min(1.0, best / results["inference_img_s"])
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
