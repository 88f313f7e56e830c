"""Deployment benchmark: one classifier, three runtimes (ONNX Runtime, OpenCV DNN, TensorFlow Lite), three precisions.

    python benchmarks/bench_deploy.py [--data DIR] [--weights FILE] [--images N] [--rounds R] [--out FILE]

With MobileNetV2 1.0 @ 224 (--weights, the real ImageNet file) and cats_vs_dogs (--data, its manifest's training
split fits the heads, its test split gives the N = 200 timed photos):

- builds a logreg head on fp32, fp16 and int8 embeddings (int8/fp16: the backbone variants `extract --precision`
  makes), fuses each into an ONNX classifier (`export-model`, standard operators), and the fp32 head into TFLite
  classifiers at fp32, fp16 and int8 (`export-model --format tflite --precision ...`, int8 calibrated on training
  photos);
- decodes the N photos once (the head's resize and filter) and, in a fresh process without TensorFlow, times each
  (runtime, precision) on those same uint8 pixels: model calls only, batches of 32, all cores, R rounds after a
  warm-up, interleaved (every runtime once per round, so the shared machine's load hits all alike); accuracy on
  the N photos' true labels and label agreement with ONNX Runtime fp32 are recorded;
- model size on disk per format and precision.

Writes benchmarks/results/deploy.json (the CPU named from /proc/cpuinfo).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"

# The timing child: no TensorFlow in it (LiteRT runs the .tflite files), one runtime at a time on the same pixels.
TIME_CHILD = r"""
import json, os, sys, time
import numpy as np
work = sys.argv[1]
plan = json.load(open(work + "/plan.json"))
pixels = np.load(work + "/pixels.npy")
batch, rounds, threads = plan["batch"], plan["rounds"], os.cpu_count()

def onnxruntime(path):
    import onnxruntime as ort
    options = ort.SessionOptions(); options.intra_op_num_threads = threads
    s = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return lambda x: s.run(["probabilities", "label"], {"images": x}), "onnxruntime " + ort.__version__

def opencv(path):
    import cv2
    cv2.setNumThreads(threads)
    net = cv2.dnn.readNetFromONNX(path)
    def run(x):
        net.setInput(np.ascontiguousarray(x), "images")
        return net.forward(["probabilities", "label"])
    return run, "opencv " + cv2.__version__

def tflite(path):
    from tlpipe.pipeline.scoring.tflite import TfliteSession
    s = TfliteSession(path, threads=threads)
    return lambda x: s.run_outputs(x, ["probabilities", "label"]), s.runtime

def one_pass(run):
    return [run(pixels[i:i + batch]) for i in range(0, len(pixels), batch)]

loaded, results = [], []
for row in plan["runs"]:
    run, version = {"onnxruntime": onnxruntime, "opencv": opencv, "tflite": tflite}[row["runtime"]](row["path"])
    try:
        out = one_pass(run)  # warm-up, and the answers
    except Exception as exc:
        results.append({**row, "runtime_version": version, "error": str(exc)[:300]}); continue
    np.save(f"{work}/{row['runtime']}-{row['precision']}.npy", np.concatenate([o[0] for o in out]))
    labels = np.concatenate([np.asarray(o[1]).reshape(-1) for o in out]).tolist()
    loaded.append((row, version, run, labels, []))
load_before = os.getloadavg()
for _ in range(rounds):  # interleaved: every runtime once per round, so a change in the machine's load hits all
    for row, version, run, labels, seconds in loaded:
        start = time.perf_counter()
        one_pass(run)
        seconds.append(time.perf_counter() - start)
for row, version, run, labels, seconds in loaded:
    img_s = [len(pixels) / s for s in seconds]
    results.append({**row, "runtime_version": version, "img_s": max(img_s), "img_s_median": float(np.median(img_s)),
                    "labels": labels})
    print(row["runtime"], row["precision"], f"{max(img_s):.1f} img/s", file=sys.stderr)
print(json.dumps({"results": results, "loadavg_before": load_before, "loadavg_after": os.getloadavg()}))
"""


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / "datasets" / "cats_vs_dogs" / "manifest.csv")
    parser.add_argument("--weights", type=Path, default=SHARED / "weights" / "mobilenet_v2_1.0_224_no_top.h5")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "deploy.json")
    args = parser.parse_args()
    if not args.data.exists() or not args.weights.is_file():
        sys.exit(f"needs {args.data} and {args.weights} (../shared): real photos and weights")

    from tlpipe.backbones.deps import distribution_version
    from tlpipe.backbones.store import ModelStore
    from tlpipe.features.cache import read_feature_set
    from tlpipe.features.extract import extract
    from tlpipe.features.images import load_image
    from tlpipe.features.sources import discover
    from tlpipe.pipeline.heads.estimators import make_head
    from tlpipe.pipeline.heads.persistence import save_head
    from tlpipe.pipeline.scoring.fuse import export_model
    from tlpipe.pipeline.scoring.tflite import export_tflite

    work = Path(tempfile.mkdtemp(prefix="tlpipe-bench-deploy-"))
    store = ModelStore(work / "store")
    records = discover(args.data).records
    train = [r.abspath for r in records if r.split == "train"]
    test = [r for r in records if r.split == "test"]
    step = max(1, len(test) // args.images)
    timed = test[::step][: args.images]  # both classes, spread over the split
    started = time.perf_counter()

    heads, built = {}, {}
    for precision in ("fp32", "fp16", "int8"):
        cache = work / f"cache-{precision}.h5"
        summary = extract(
            args.data, cache, backbone="mobilenet_v2", weights=args.weights, precision=precision, store=store
        )
        fs = read_feature_set(cache, summary.key)
        rows = fs.split == "train"
        head = work / f"logreg-{precision}.joblib"
        save_head(
            make_head("logreg").fit(fs.X[rows], np.asarray(fs.class_names)[fs.y[rows]]),
            head,
            feature_set=fs,
            metrics={},
            params={},
        )
        heads[precision] = head
        record = export_model(head, work / f"classifier-{precision}.onnx", store=store, verify_images=train[:32])
        built[("onnx", precision)] = (work / f"classifier-{precision}.onnx", record)
    for precision in ("fp32", "fp16", "int8"):
        path = work / f"classifier-{precision}.tflite"
        record = export_tflite(heads["fp32"], path, precision=precision, images=train, store=store)
        built[("tflite", precision)] = (path, record)
    build_s = time.perf_counter() - started

    fp32_record = built[("onnx", "fp32")][1]
    size, resize, resize_filter = (
        fp32_record["input_size"],
        fp32_record["backbone"]["resize"],
        fp32_record["resize_filter"],
    )
    pixels = np.stack([load_image(r.abspath, size, resize, resize_filter=resize_filter)[0] for r in timed])
    np.save(work / "pixels.npy", pixels)
    class_names = fp32_record["class_names"]
    truth = np.array([class_names.index(r.label) for r in timed])
    runs = [
        {"runtime": runtime, "precision": precision, "path": str(built[(fmt, precision)][0])}
        for runtime, fmt in (("onnxruntime", "onnx"), ("opencv", "onnx"), ("tflite", "tflite"))
        for precision in ("fp32", "fp16", "int8")
    ]
    (work / "plan.json").write_text(json.dumps({"runs": runs, "batch": args.batch, "rounds": args.rounds}))
    child = subprocess.run(
        [sys.executable, "-c", TIME_CHILD, str(work)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if child.returncode:
        sys.exit(child.stderr[-3000:])
    timing = json.loads(child.stdout.strip().splitlines()[-1])
    results = timing["results"]
    reference = np.load(work / "onnxruntime-fp32.npy")
    reference_labels = reference.argmax(axis=1)
    rows = []
    for r in results:
        fmt = "tflite" if r["runtime"] == "tflite" else "onnx"
        path, record = built[(fmt, r["precision"])]
        row = {
            "runtime": r["runtime"],
            "runtime_version": r["runtime_version"],
            "format": fmt,
            "precision": r["precision"],
            "bytes": path.stat().st_size,
            "head_fitted_on": f"{r['precision']} embeddings" if fmt == "onnx" else "fp32 embeddings",
        }
        if "error" in r:
            rows.append(row | {"error": r["error"]})
            continue
        labels = np.asarray(r["labels"])
        proba = np.load(work / f"{r['runtime']}-{r['precision']}.npy")
        rows.append(
            row
            | {
                "img_s": round(r["img_s"], 1),
                "img_s_median": round(r["img_s_median"], 1),
                "accuracy": float(np.mean(labels == truth)),
                "labels_equal_to_onnxruntime_fp32": float(np.mean(labels == reference_labels)),
                "max_abs_diff_to_onnxruntime_fp32": float(np.abs(proba - reference).max()),
                "verification_at_export": record.get("verification") if r["runtime"] != "opencv" else None,
            }
        )
    report = {
        "benchmark": "bench_deploy",
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "note": "shared machine (other agents' jobs run beside it): figures are indicative",
            "loadavg_1_5_15_before_after": [timing["loadavg_before"], timing["loadavg_after"]],
        },
        "versions": {
            m: distribution_version(m)
            for m in ("onnxruntime", "opencv-python-headless", "tensorflow", "ai-edge-litert", "onnx", "scikit-learn")
        },
        "setup": {
            "backbone": "mobilenet_v2 1.0 @ 224, ImageNet weights " + args.weights.name,
            "head": "logreg (make_head defaults), fitted on the training split's embeddings",
            "images": len(timed),
            "data": str(args.data),
            "batch": args.batch,
            "threads": os.cpu_count(),
            "rounds": args.rounds,
            "measure": "model calls only on the same decoded uint8 pixels; after a warm-up pass, the rounds interleave "
            "the runtimes (each once per round); img_s is the best round, img_s_median the median",
            "build_seconds": round(build_s, 1),
        },
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for row in rows:
        figures = (
            f"{row['img_s']:7.1f} img/s  accuracy {row['accuracy']:.3f}  labels = ORT fp32 "
            f"{row['labels_equal_to_onnxruntime_fp32']:.3f}  max|diff| {row['max_abs_diff_to_onnxruntime_fp32']:.1e}"
            if "img_s" in row
            else f"error: {row['error']}"
        )
        print(f"{row['runtime']:<12} {row['precision']:<5} {row['bytes'] / 1e6:6.2f} MB  {figures}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
