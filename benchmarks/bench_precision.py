"""Precision benchmark: fp32 vs int8 (vs fp16) ONNX Runtime for one backbone, against Keras, same run.

    python benchmarks/bench_precision.py [--data DIR] [--weights FILE]

Records, for MobileNetV2 1.0 @ 224 with the real weights on cats_vs_dogs by default:
  sweep       `tlpipe bench` (batch x threads per precision, Keras, decoding) -> best configuration per precision
  rounding    int8 embeddings' cosine to fp32 with round-to-nearest weights vs GPTQ rounding (same calibration)
  probe       logistic regression on fp32 vs int8 features (manifest train/test split): accuracy
  extract     end-to-end `features.extract` img/s at fp32 and int8
  profile     ONNX Runtime's per-operator time shares at fp32 and int8 (batch 32, all cores)
Writes benchmarks/results/precision.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"


def operator_profile(model_path: Path, images, batch: int = 32, rounds: int = 4) -> dict:
    """Share of kernel time per operator type, from ONNX Runtime's own profiler."""
    import onnxruntime as ort

    from tlpipe.backbones.runtime import session_options

    options = session_options()
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        for _ in range(rounds):
            session.run(None, {"images": images[:batch]})
        events = json.loads(Path(session.end_profiling()).read_text())
    spent: Counter = Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            spent[event["args"].get("op_name", "?")] += event["dur"]
    total = sum(spent.values()) or 1
    return {op: round(us / total, 3) for op, us in spent.most_common(8)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / "datasets" / "cats_vs_dogs")
    parser.add_argument("--weights", type=Path, default=SHARED / "weights" / "mobilenet_v2_1.0_224_no_top.h5")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "precision.json")
    args = parser.parse_args()
    if not args.data.is_dir() or not args.weights.is_file():
        sys.exit(f"benchmark data not found ({args.data}, {args.weights}); pass --data and --weights")

    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from tlpipe.backbones.quantize import compare_to_fp32, quantize_int8
    from tlpipe.backbones.store import ModelStore
    from tlpipe.features.cache import read_feature_set
    from tlpipe.features.calibration import sample_images
    from tlpipe.features.extract import extract
    from tlpipe.features.sources import discover
    from tlpipe.pipeline.bench import format_report, run_bench

    work = Path(tempfile.mkdtemp(prefix="tlpipe-precision-"))
    store = ModelStore(work / "store")
    manifest = args.data / "manifest.csv"
    source = manifest if manifest.is_file() else args.data
    results: dict = {}
    extract_rates, keys = {}, {}
    for precision in ("fp32", "int8"):  # int8 is calibrated on a sample of the photos being extracted
        summary = extract(
            source,
            work / "cache.h5",
            backbone="mobilenet_v2",
            weights=args.weights,
            store=store,
            device="cpu",
            precision=precision,
        )
        extract_rates[precision], keys[precision] = summary.embedded / summary.seconds, summary.key
    results["extract_img_s"] = extract_rates
    probe = {}
    for precision, key in keys.items():
        fs = read_feature_set(work / "cache.h5", key)
        train, test = fs.split == "train", fs.split == "test"
        if not train.any() or not test.any():
            train = test = np.ones(len(fs), bool)
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)).fit(fs.X[train], fs.y[train])
        probe[precision] = model.score(fs.X[test], fs.y[test])
    fp32_set, int8_set = (
        read_feature_set(work / "cache.h5", keys["fp32"]),
        read_feature_set(work / "cache.h5", keys["int8"]),
    )
    cos = np.sum(fp32_set.X * int8_set.X, 1) / np.linalg.norm(fp32_set.X, axis=1) / np.linalg.norm(int8_set.X, axis=1)
    results["probe_accuracy"] = probe
    results["int8_cosine_all_images"] = {"mean": float(cos.mean()), "min": float(cos.min()), "images": len(cos)}

    fp32_entry = store.get(keys["fp32"])
    sample = sample_images(discover(source).records, 224)
    results["rounding"] = {
        name: compare_to_fp32(
            quantize_int8(fp32_entry.model_path, sample.calibration, gptq=gptq)[0], fp32_entry.model_path, sample.held
        )
        for name, gptq in (("round_to_nearest", False), ("gptq", True))
    }

    report = run_bench(
        "mobilenet_v2",
        weights=args.weights,
        store=store,
        images=source,
        precisions=["int8", "fp16"],
        batch_sizes=[1, 8, 32, 64],
        threads=[1, 2],
        min_seconds=3.0,
        log=lambda m: print(m, file=sys.stderr),
    )
    results["bench"] = report.to_dict()
    results["profile_op_share"] = {
        p: operator_profile(store.get(report.variants[p]["key"] if p != "fp32" else report.key).model_path, sample.held)
        for p in ("fp32", "int8")
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(format_report(report))
    print(json.dumps({k: v for k, v in results.items() if k != "bench"}, indent=2))


if __name__ == "__main__":
    main()
