"""Feature levers on one frozen backbone: input size, flip TTA, ten-crop TTA, a mid-level layer, tuned C.

    python benchmarks/bench_levers.py [--quick] [--limit N] [--datasets cats_vs_dogs,flowers5_128px]
                                      [--repeats 5] [--weights FILE] [--store DIR] [--out FILE]

For each dataset of ../shared/datasets (cats_vs_dogs: its manifest, with its train/test split; flowers5_128px:
no split column, so the sweep holds out a stratified 20 %), with MobileNetV2 1.0 and the real ImageNet
weights of ../shared/weights (the 224 px weights at 288 px too: the network is fully convolutional and the
weights file loads by layer name at any input size), everything through tlpipe's own library calls:

1. extraction passes into one cache (``features.extract``), each timed: the baseline (224 px, no TTA, last
   layer, one output), then 224 and 288 px with and without flip TTA with two outputs each (``out_relu`` and
   ``block_13_expand_relu``, the last 14x14 map), and 224 px ten-crop TTA (flip+crops); img/s per pass and
   its ratio to the baseline pass of the same run;
2. each lever's accuracy by 5 x repeated stratified 5-fold CV (the same folds for every lever, so deltas
   are paired), logistic regression at the old fixed C=0.01 for the feature levers; for the regularisation
   lever, the new default (C picked by a 3-fold internal CV) against C=0.01 on the same features;
3. the sweep ``compare --features all`` (``pipeline.compare.sweep``, logreg and svm heads, 5-fold CV on the
   training rows only) picks the best (feature set, head); that pair and the baseline pair (224 / none /
   last layer + default logreg) are then fitted on the training rows and scored on the hold-out rows no
   choice has seen.

--quick: 300 images per dataset, 2 repeats. --limit N: a stratified sample of N images per dataset (seeded).
Writes benchmarks/results/levers.json (--quick: levers_quick.json). The machine may be shared: figures
are ratios and paired deltas within one run.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# BLAS single-threaded: on a loaded 2-core machine, BLAS threads waiting on each other made one logistic
# regression fit take 25 s of wall time for 0.1 s of CPU (measured); ONNX Runtime keeps its own threads.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
MID = "block_13_expand_relu"

# (name, sizes, layers, tta): the extraction passes, baseline first
PASSES = [
    ("baseline 224 none [last]", [224], [None], "none"),
    ("224 none [last, mid]", [224], [None, MID], "none"),
    ("288 none [last, mid]", [288], [None, MID], "none"),
    ("224 flip [last, mid]", [224], [None, MID], "flip"),
    ("288 flip [last, mid]", [288], [None, MID], "flip"),
    ("224 flip+crops [last]", [224], [None], "flip+crops"),
]
# (lever, feature sets concatenated: (size, layer, tta))
LEVERS = [
    ("baseline: 224 px, no TTA, last layer", [(224, None, "none")]),
    ("288 px", [(288, None, "none")]),
    ("flip TTA", [(224, None, "flip")]),
    ("flip+crops TTA (10 views)", [(224, None, "flip+crops")]),
    ("288 px + flip", [(288, None, "flip")]),
    ("mid layer alone (block_13_expand_relu)", [(224, MID, "none")]),
    ("last + mid concatenated", [(224, None, "none"), (224, MID, "none")]),
    ("288 px + flip, last + mid concatenated", [(288, None, "flip"), (288, MID, "flip")]),
]


def subset_manifest(dataset: Path, limit: int | None, folder: Path, seed: int = 0) -> Path:
    """The dataset's manifest (absolute paths, label, split), or a stratified sample of ``limit`` rows of it."""
    with open(dataset / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if limit and limit < len(rows):
        from sklearn.model_selection import train_test_split

        rows, _ = train_test_split(rows, train_size=limit, random_state=seed, stratify=[r["cls"] for r in rows])
    path = folder / f"{dataset.name}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for r in rows:
            writer.writerow([str(dataset / r["file"]), r["cls"], r["split"]])
    return path


def aligned(cache: Path, keys: list[str]):
    """Feature sets ``keys`` concatenated column-wise on the images all of them hold (by content, sorted)."""
    from tlpipe.features.cache import read_feature_set

    sets = [read_feature_set(cache, k) for k in keys]
    common = sorted(set.intersection(*(set(fs.sha256) for fs in sets)))
    blocks = []
    for fs in sets:
        index = {s: i for i, s in enumerate(fs.sha256)}
        blocks.append(fs.X[[index[s] for s in common]])
    index = {s: i for i, s in enumerate(sets[0].sha256)}
    y = sets[0].y[[index[s] for s in common]]
    return np.hstack(blocks), y, common


def repeated_cv(X: np.ndarray, y: np.ndarray, head_params: dict, repeats: int, seed: int = 0) -> np.ndarray:
    """Accuracy on each fold of ``repeats`` x stratified 5-fold CV (fold order fixed by ``seed``)."""
    from sklearn.model_selection import RepeatedStratifiedKFold, cross_val_score

    from tlpipe.pipeline.heads import make_head

    folds = RepeatedStratifiedKFold(n_splits=5, n_repeats=repeats, random_state=seed)
    return cross_val_score(make_head("logreg", seed=seed, **head_params), X, y, cv=folds, n_jobs=1,
                           scoring="accuracy")


def summary(scores: np.ndarray, base: np.ndarray | None) -> dict:
    out = {"accuracy": float(scores.mean()), "accuracy_std": float(scores.std()), "folds": len(scores)}
    if base is not None:
        delta = scores - base
        out |= {"delta_points": float(100 * delta.mean()),
                "delta_points_se": float(100 * delta.std(ddof=1) / np.sqrt(len(delta)))}
    return out


def holdout_pair(cache: Path, key: str, head: str, seed: int = 0) -> dict:
    """Fit ``head`` on the training rows of feature set ``key`` and score the hold-out rows."""
    from sklearn.metrics import accuracy_score

    from tlpipe.features.cache import read_feature_set
    from tlpipe.pipeline.heads import fit_head, select_split

    fs = read_feature_set(cache, key)
    train, test, how = select_split(fs, seed=seed)
    started = time.perf_counter()
    estimator, info = fit_head(fs.X[train], fs.y[train], head, seed=seed)
    fit_s = time.perf_counter() - started
    accuracy = accuracy_score(fs.y[test], estimator.predict(fs.X[test]))
    return {"feature_set": key, "head": head, "params": info["params"], "holdout_accuracy": float(accuracy),
            "train_rows": int(len(train)), "holdout_rows": int(len(test)), "split": how, "fit_s": fit_s}


def run_dataset(name: str, args, work: Path, store) -> dict:
    from tlpipe.backbones.export import plan_export
    from tlpipe.features.extract import extract
    from tlpipe.pipeline.compare import sweep

    cache = work / f"{name}.h5"
    passes_file = work / f"{name}.passes.json"
    source = work / f"{name}.csv" if passes_file.is_file() else subset_manifest(SHARED / "datasets" / name, args.limit, work)
    report: dict = {"dataset": name, "images": sum(1 for _ in open(source)) - 1, "passes": [], "levers": []}
    print(f"== {name}: {report['images']} images", flush=True)
    if passes_file.is_file():  # --work with the extraction stage done: its cache and timings are reused
        report["passes"] = json.loads(passes_file.read_text())
        report["passes_reused_from"] = str(passes_file)
    for label, sizes, layers, tta in PASSES if not report["passes"] else []:
        for size in sizes:  # export first, outside the timed pass
            from tlpipe.backbones.export import obtain_layers

            obtain_layers("mobilenet_v2", layers, args.weights, size, store=store, tta=tta)
        s = extract(source, cache, backbone="mobilenet_v2", weights=args.weights, sizes=sizes, layers=layers, tta=tta,
                    store=store, allow_outside_root=True)
        rate = s.embedded / s.seconds
        report["passes"].append({"pass": label, "sizes": sizes, "layers": layers, "tta": tta, "keys": s.keys,
                                 "embedded": s.embedded, "seconds": s.seconds, "images_per_second": rate})
        print(f"  pass {label}: {s.embedded} images, {rate:.1f} img/s", flush=True)
    passes_file.write_text(json.dumps(report["passes"], indent=2))
    base_rate = report["passes"][0]["images_per_second"]
    for p in report["passes"]:
        p["speed_vs_baseline"] = p["images_per_second"] / base_rate

    def key(size, layer, tta):
        return plan_export("mobilenet_v2", args.weights, size, layer, "avg", tta=tta).key

    def pass_cost(feature_keys):
        """img/s of the pass with the fewest outputs that made all of these feature sets (none: the passes'
        times per image added, each feature set's from the smallest pass that made it)."""
        def smallest(keys):
            fitting = [p for p in report["passes"] if set(keys) <= set(p["keys"])]
            return min(fitting, key=lambda p: len(p["keys"]), default=None)

        whole = smallest(feature_keys)
        if whole is not None:
            return whole["images_per_second"]
        return 1 / sum(1 / smallest([k])["images_per_second"] for k in feature_keys)

    base_scores = None
    for lever, parts in [x for x in LEVERS if args.levers is None or x[0] in args.levers or x is LEVERS[0]]:
        keys = [key(*part) for part in parts]
        X, y, _ = aligned(cache, keys)
        started = time.perf_counter()
        scores = repeated_cv(X, y, {"C": 0.01}, args.repeats)
        row = {"lever": lever, "feature_sets": keys, "dim": int(X.shape[1]), "head": "logreg C=0.01",
               **summary(scores, base_scores), "extraction_images_per_second": pass_cost(keys),
               "cv_seconds": time.perf_counter() - started}
        row["extraction_vs_baseline"] = row["extraction_images_per_second"] / base_rate
        if base_scores is None:
            base_scores = scores
        report["levers"].append(row)
        print(f"  {lever}: {row['accuracy']:.4f} ({row.get('delta_points', 0):+.2f} pts), "
              f"{row['extraction_images_per_second']:.1f} img/s", flush=True)
    # tuned regularisation: the new default (internal CV over C) on the baseline and on the best feature lever
    best_lever = max(report["levers"][1:] or report["levers"], key=lambda r: r["accuracy"])
    tuned = [("tuned C (logreg default: 3-fold internal CV)", report["levers"][0]["feature_sets"]),
             (f"tuned C on the best feature lever ({best_lever['lever']})", best_lever["feature_sets"])]
    for lever, keys in tuned[:args.tuned]:
        X, y, _ = aligned(cache, keys)
        started = time.perf_counter()
        scores = repeated_cv(X, y, {}, args.repeats)
        row = {"lever": lever, "feature_sets": keys, "dim": int(X.shape[1]), "head": "logreg (LogisticRegressionCV)",
               **summary(scores, base_scores), "extraction_images_per_second": pass_cost(keys),
               "cv_seconds": time.perf_counter() - started}
        row["extraction_vs_baseline"] = row["extraction_images_per_second"] / base_rate
        report["levers"].append(row)
        print(f"  {lever}: {row['accuracy']:.4f} ({row['delta_points']:+.2f} pts)", flush=True)
    if not args.heads:
        return report
    # the sweep picks a pair on the training rows; the hold-out judges it against the baseline pair
    started = time.perf_counter()
    result = sweep(cache, args.sweep_features, args.heads, cv=5, seed=0, n_jobs=1)
    best = result.best
    report["sweep"] = {"seconds": time.perf_counter() - started, "heads": list(args.heads),
                       "ranking": [{"feature_set": r.feature_key, "head": r.head, "cv_accuracy": r.accuracy,
                                    "cv_accuracy_std": r.accuracy_std, "fit_s": r.fit_s,
                                    "extraction_ms": r.extraction_ms} for r in result.rows]}
    baseline_key = report["levers"][0]["feature_sets"][0]
    report["holdout"] = {"best_pair": holdout_pair(cache, best.feature_key, best.head),
                         "baseline_pair": holdout_pair(cache, baseline_key, "logreg")}
    h = report["holdout"]
    h["delta_points"] = 100 * (h["best_pair"]["holdout_accuracy"] - h["baseline_pair"]["holdout_accuracy"])
    best_rate = 1000 / best.extraction_ms if best.extraction_ms else None
    h["best_pair_extraction_images_per_second"] = best_rate
    h["best_pair_extraction_vs_baseline"] = best_rate / base_rate if best_rate else None
    print(f"  sweep best: {best.head} on {best.feature_key} (CV {best.accuracy:.4f}); hold-out "
          f"{h['best_pair']['holdout_accuracy']:.4f} vs baseline {h['baseline_pair']['holdout_accuracy']:.4f} "
          f"({h['delta_points']:+.2f} pts)", flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--datasets", default="cats_vs_dogs,flowers5_128px")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--heads", default="logreg,svm", help="The sweep's heads ('' skips the sweep)")
    parser.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_v2_1.0_224_no_top.h5"))
    parser.add_argument("--store", default=None, help="Model store (default: a temporary one)")
    parser.add_argument("--work", default=None, help="Keep caches here; a dataset whose passes are recorded there "
                                                      "skips extraction (its cache and timings are reused)")
    parser.add_argument("--levers", default=None, help="Semicolon-separated lever names to score (default: all)")
    parser.add_argument("--tuned", type=int, default=2, help="Tuned-C rows: 0, 1 (baseline) or 2 (+ best lever)")
    parser.add_argument("--sweep-features", default="all", help="The sweep's --features (default: all)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.limit, args.repeats = args.limit or 300, 2
    args.heads = tuple(h.strip() for h in args.heads.split(",") if h.strip())
    args.levers = None if args.levers is None else [x.strip() for x in args.levers.split(";")]
    from tlpipe.backbones.store import ModelStore

    out = Path(args.out or ROOT / "benchmarks" / "results" / ("levers_quick.json" if args.quick else "levers.json"))
    with tempfile.TemporaryDirectory(prefix="bench-levers-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        store = ModelStore(args.store or work / "store")
        started = time.perf_counter()
        results = [run_dataset(name.strip(), args, work, store) for name in args.datasets.split(",") if name.strip()]
    load = os.getloadavg()
    report = {
        "benchmark": "bench_levers", "quick": args.quick, "limit": args.limit, "repeats": args.repeats,
        "backbone": "mobilenet_v2_1.0", "weights": args.weights, "sweep_heads": list(args.heads), "seconds": time.perf_counter() - started,
        "machine": {"cores": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                    "load_average_at_end": load,
                    "note": "shared with other jobs; compare ratios and paired deltas within this run"},
        "datasets": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
