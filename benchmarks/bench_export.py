"""Export timings and verification figures at 224 for MobileNetV2 (real weights when present), ResNet50, VGG16.

    python benchmarks/bench_export.py [--weights-dir DIR]

Each export runs into a fresh model store (no cache hits) and a second call measures the cache hit.
Writes benchmarks/results/export.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights-dir", type=Path, default=ROOT.parent / "shared" / "weights")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "export.json")
    args = parser.parse_args()

    from tlpipe.backbones.deps import require
    from tlpipe.backbones.export import export_backbone
    from tlpipe.backbones.registry import get_backbone
    from tlpipe.backbones.store import ModelStore
    from tlpipe.backbones.weights import WeightsUnavailable, resolve_weights

    started = time.perf_counter()
    require("tensorflow"), require("tf2onnx"), require("onnxruntime")
    results: dict = {"import_tf_tf2onnx_ort_s": round(time.perf_counter() - started, 2)}
    store = ModelStore(tempfile.mkdtemp(prefix="tlpipe-export-bench-"))
    for backbone in ("mobilenet_v2", "resnet50", "vgg16"):
        try:
            weights = (
                resolve_weights(get_backbone(backbone), args.weights_dir if args.weights_dir.is_dir() else "none").path
                or "none"
            )
        except WeightsUnavailable:
            weights = "none"
        started = time.perf_counter()
        entry = export_backbone(backbone, weights=weights, store=store)
        total = time.perf_counter() - started
        started = time.perf_counter()
        export_backbone(backbone, weights=weights, store=store)
        hit = time.perf_counter() - started
        v = entry.metadata["verification"]
        results[backbone] = {
            "weights": "imagenet file" if weights != "none" else "none (random init)",
            "export_s": round(total, 2),
            **entry.metadata["timings_s"],
            "cache_hit_s": round(hit, 4),
            "max_abs_diff": v["max_abs_diff"],
            "rel_diff": v["rel_diff"],
            "min_cosine": v["min_cosine"],
            "onnx_mb": round(entry.model_path.stat().st_size / 1e6, 1),
        }
        print(backbone, results[backbone], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
