"""Feature levers on one frozen backbone: input size, flip TTA, ten-crop TTA, concatenated layers, tuned C,
augmented training views, and the feature set + head that the sweep picks, judged on a fixed hold-out.

    python benchmarks/bench_levers.py [--quick] [--limit N] [--datasets flowers5_128px,cats_vs_dogs]
                                      [--repeats 5] [--heads logreg] [--work DIR] [--store DIR] [--out FILE]

For each dataset of ../shared/datasets (all photos unless --limit; a fixed seeded stratified 25 % of them is
marked ``test``, the rest ``train``, in the manifest the bench writes), with MobileNetV2 1.0 and the real
ImageNet weights of ../shared/weights (the 224 px weights at 288 px too: the network is fully convolutional
and the weights file loads by layer name at any input size), everything through tlpipe's own library calls:

1. extraction passes into one cache (``features.extract``), each timed: the baseline (224 px, no TTA, last
   layer), 288 px, flip TTA at 224 and 288, ``out_relu+block_13_expand_relu`` (one concatenated feature
   set), ten-crop TTA (flip+crops), and ``--augment 4`` (four augmented views per image of the baseline
   feature set, ``features.augment.extract_augmented``); img/s per pass and its ratio to a baseline pass
   timed in the same process (into a scratch cache). With ``--work``, passes and lever scores already
   recorded there are reused (the cache keeps the features between runs);
2. each lever's accuracy by ``--repeats`` x repeated stratified 5-fold CV on all photos (the same folds for
   every lever, so deltas are paired), logistic regression at a fixed C = 0.01 for the feature levers; the
   regularisation lever is the logreg default (C by a 3-fold internal CV); the augment lever trains each
   fold on its training photos plus their 4 views (``heads.add_views``) and scores original test photos;
3. the sweep ``compare --features all`` (``pipeline.compare.sweep``, ``--heads``, 5-fold CV on the ``train``
   rows only) picks the best (feature set, head); that pair and the baseline pair (224 / none / last layer
   + default logreg) are then fitted on the ``train`` rows and scored once on the ``test`` rows.

--quick: 300 images per dataset, 2 repeats. --limit N: a stratified sample of N images per dataset (seeded).
Writes benchmarks/results/levers.json (--quick: levers_quick.json). The machine may be shared: accuracy is
unaffected; img/s figures are ratios within one run.
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

CONCAT = f"out_relu+{MID}"  # one feature set: both layers pooled and concatenated inside the model
AUGMENT = 4  # augmented views per image (extract --augment 4) on the baseline feature set
HOLDOUT = 0.25  # the fixed stratified hold-out the sweep never sees (seeded)

# (name, sizes, layers, tta): the extraction passes, baseline first
PASSES = [
    ("baseline 224 none [last]", [224], [None], "none"),
    ("288 none [last]", [288], [None], "none"),
    ("224 flip [last]", [224], [None], "flip"),
    ("288 flip [last]", [288], [None], "flip"),
    ("224 none [last+mid concatenated]", [224], [CONCAT], "none"),
    ("224 flip+crops [last]", [224], [None], "flip+crops"),
]
AUGMENT_PASS = f"224 none [last] + {AUGMENT} augmented views"
BLOCK_L2 = "last+mid concatenated, each block L2-normalised before concatenating"
# (lever, feature sets concatenated: (size, layer, tta))
LEVERS = [
    ("baseline: 224 px, no TTA, last layer", [(224, None, "none")]),
    ("288 px", [(288, None, "none")]),
    ("flip TTA", [(224, None, "flip")]),
    ("flip+crops TTA (10 views)", [(224, None, "flip+crops")]),
    ("288 px + flip", [(288, None, "flip")]),
    ("last+mid concatenated (one feature set)", [(224, CONCAT, "none")]),
]


def subset_manifest(dataset: Path, limit: int | None, folder: Path, seed: int = 0) -> Path:
    """The dataset's photos (absolute paths, label) with a fixed seeded stratified split: ``HOLDOUT`` of them
    ``test`` (the hold-out no choice sees), the rest ``train``; or a stratified sample of ``limit`` rows first."""
    from sklearn.model_selection import train_test_split

    with open(dataset / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if limit and limit < len(rows):
        rows, _ = train_test_split(rows, train_size=limit, random_state=seed, stratify=[r["cls"] for r in rows])
    train, test = train_test_split(rows, test_size=HOLDOUT, random_state=seed, stratify=[r["cls"] for r in rows])
    split = {id(r): "test" for r in test} | {id(r): "train" for r in train}
    path = folder / f"{dataset.name}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for r in rows:
            writer.writerow([str(dataset / r["file"]), r["cls"], split[id(r)]])
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


def repeated_cv(X: np.ndarray, y: np.ndarray, head_params: dict, repeats: int, seed: int = 0, views=None) -> np.ndarray:
    """Accuracy on each fold of ``repeats`` x stratified 5-fold CV (fold order fixed by ``seed``); with
    ``views`` (augmented views, ``owner`` = row of X), each fold also trains on the views of its training
    images only (``heads.add_views``) and is scored on its test images' originals."""
    from sklearn.model_selection import RepeatedStratifiedKFold

    from tlpipe.pipeline.heads.estimators import add_views, fit, make_head

    folds = RepeatedStratifiedKFold(n_splits=5, n_repeats=repeats, random_state=seed)
    scores = []
    for train, test in folds.split(X, y):
        X_fit, y_fit, groups = add_views(X, y, train, views)
        head = fit(make_head("logreg", seed=seed, **head_params), X_fit, y_fit, groups=groups)
        scores.append(float(np.mean(head.predict(X[test]) == y[test])))
    return np.array(scores)


def summary(scores: np.ndarray, base: np.ndarray | None) -> dict:
    out = {"accuracy": float(scores.mean()), "accuracy_std": float(scores.std()), "folds": len(scores)}
    if base is not None:
        delta = scores - base
        out |= {
            "delta_points": float(100 * delta.mean()),
            "delta_points_se": float(100 * delta.std(ddof=1) / np.sqrt(len(delta))),
        }
    return out


def holdout_pair(cache: Path, key: str, head: str, seed: int = 0, use_augmented: bool = False) -> dict:
    """Fit ``head`` (its defaults) on the training rows of feature set ``key`` and score the hold-out rows."""
    from sklearn.metrics import accuracy_score

    from tlpipe.features.cache import read_feature_set, read_views
    from tlpipe.pipeline.heads.estimators import fit_head, select_split, views_within

    fs = read_feature_set(cache, key)
    train, test, how = select_split(fs, seed=seed)
    views = views_within(read_views(cache, fs), train) if use_augmented else None
    started = time.perf_counter()
    estimator, info = fit_head(fs.X[train], fs.y[train], head, seed=seed, views=views)
    fit_s = time.perf_counter() - started
    accuracy = accuracy_score(fs.y[test], estimator.predict(fs.X[test]))
    return {
        "feature_set": key,
        "head": head,
        "params": info["params"],
        "holdout_accuracy": float(accuracy),
        "augmented_views": info["augmented_views"],
        "train_rows": int(len(train)),
        "holdout_rows": int(len(test)),
        "split": how,
        "fit_s": fit_s,
    }


def timed_pass(source: Path, cache: Path, sizes, layers, tta, args, store) -> dict:
    """One ``extract`` pass into ``cache``, its model exported first (outside the timing)."""
    from tlpipe.backbones.export import obtain_layers
    from tlpipe.features.extract import extract

    for size in sizes:
        obtain_layers("mobilenet_v2", layers, args.weights, size, store=store, tta=tta)
    s = extract(
        source,
        cache,
        backbone="mobilenet_v2",
        weights=args.weights,
        sizes=sizes,
        layers=layers,
        tta=tta,
        store=store,
        allow_outside_root=True,
    )
    return {
        "sizes": sizes,
        "layers": layers,
        "tta": tta,
        "keys": s.keys,
        "embedded": s.embedded,
        "seconds": s.seconds,
        "images_per_second": s.embedded / s.seconds if s.seconds else 0.0,
    }


def interleaved_speed(source: Path, work: Path, args, store, images: int) -> dict:
    """img/s of every pass on the first ``images`` photos of ``source``, each timed between two baseline passes
    on the same photos (fresh scratch caches), so a change of the machine's load between passes cancels out of
    the ratio: ``speed_vs_baseline`` = the pass's img/s / the mean of the two baselines around it."""
    from tlpipe.backbones.export import obtain_backbone
    from tlpipe.features.augment import extract_augmented
    from tlpipe.features.cache import feature_set_key

    lines = open(source).read().splitlines()
    sample = work / f"{source.stem}.speed.csv"
    sample.write_text("\n".join(lines[: images + 1]) + "\n")
    scratch = work / f"{source.stem}.speed.h5"

    def one(sizes, layers, tta, augment=False) -> float:
        scratch.unlink(missing_ok=True)
        row = timed_pass(sample, scratch, sizes, layers, tta, args, store)
        if not augment:
            return row["images_per_second"]
        entry = obtain_backbone("mobilenet_v2", args.weights, 224, store=store)
        from tlpipe.features.sources import discover

        a = extract_augmented(
            discover(sample, allow_outside_root=True).records, scratch, entry, feature_set_key(entry.key), views=AUGMENT
        )
        return images / (row["seconds"] + a.seconds)  # the extract and its augmented views, per photo

    out = {}
    one([224], [None], "none")  # warm-up (sessions, file cache)
    before = one([224], [None], "none")
    for label, sizes, layers, tta in [*PASSES[1:], (AUGMENT_PASS, [224], [None], "none")]:
        rate = one(sizes, layers, tta, augment=label == AUGMENT_PASS)
        after = one([224], [None], "none")
        out[label] = {
            "images": images,
            "images_per_second": rate,
            "baseline_before": before,
            "baseline_after": after,
            "speed_vs_baseline": rate / ((before + after) / 2),
        }
        print(
            f"  speed {label}: {rate:.1f} img/s, {out[label]['speed_vs_baseline']:.3f} x baseline "
            f"({before:.1f} / {after:.1f})",
            flush=True,
        )
        before = after
    scratch.unlink(missing_ok=True)
    return out


def run_dataset(name: str, args, work: Path, store) -> dict:
    from tlpipe.backbones.export import obtain_backbone, plan_export
    from tlpipe.features.augment import extract_augmented
    from tlpipe.features.cache import feature_set_key, read_feature_set, read_views
    from tlpipe.features.sources import discover
    from tlpipe.pipeline.heads.selection import sweep

    cache = work / f"{name}.h5"
    passes_file, levers_file = work / f"{name}.passes.json", work / f"{name}.levers.json"
    source = work / f"{name}.csv"
    if not source.is_file():
        subset_manifest(SHARED / "datasets" / name, args.limit, work)
    report: dict = {"dataset": name, "images": sum(1 for _ in open(source)) - 1, "holdout_fraction": HOLDOUT}
    print(f"== {name}: {report['images']} images", flush=True)
    # Passes already timed (by an earlier run with this --work) are reused; the passes timed now are timed
    # against a baseline pass timed in this process too (into a scratch cache), so every ratio is same-run.
    passes = json.loads(passes_file.read_text()) if passes_file.is_file() else {}
    todo = [p for p in PASSES if p[0] not in passes] + (
        [] if AUGMENT_PASS in passes or not args.augment else [(AUGMENT_PASS, [224], [None], "none")]
    )
    if todo:
        scratch = work / f"{name}.scratch.h5"
        scratch.unlink(missing_ok=True)
        base = timed_pass(source, scratch, [224], [None], "none", args, store)
        scratch.unlink(missing_ok=True)
        print(f"  baseline re-timed in this run: {base['images_per_second']:.1f} img/s", flush=True)
        for label, sizes, layers, tta in todo:
            if label == AUGMENT_PASS:
                timed_pass(source, cache, sizes, layers, tta, args, store)  # cached: the baseline pass made it
                entry = obtain_backbone("mobilenet_v2", args.weights, 224, store=store)
                records = discover(source, allow_outside_root=True).records
                a = extract_augmented(records, cache, entry, feature_set_key(entry.key), views=AUGMENT)
                row = {
                    "sizes": [224],
                    "layers": [None],
                    "tta": "none",
                    "keys": [feature_set_key(entry.key)],
                    "augmented_views": a.embedded,
                    "embedded": a.images,
                    "seconds": a.seconds,
                    "images_per_second": a.images / a.seconds,
                    "note": f"{AUGMENT} views per image",
                }
            else:
                row = timed_pass(source, cache, sizes, layers, tta, args, store)
            row |= {
                "baseline_images_per_second_same_run": base["images_per_second"],
                "speed_vs_baseline": row["images_per_second"] / base["images_per_second"],
                "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "load_average": os.getloadavg(),
            }
            passes[label] = row
            passes_file.write_text(json.dumps(passes, indent=2))
            print(
                f"  pass {label}: {row['embedded']} images, {row['images_per_second']:.1f} img/s "
                f"({row['speed_vs_baseline']:.2f} x baseline)",
                flush=True,
            )
    report["passes"] = [{"pass": k, **v} for k, v in passes.items()]
    speed_file = work / f"{name}.speed.json"
    if args.speed_images and not speed_file.is_file():
        speed_file.write_text(json.dumps(interleaved_speed(source, work, args, store, args.speed_images), indent=2))
    interleaved = json.loads(speed_file.read_text()) if speed_file.is_file() else {}
    report["interleaved_speed"] = interleaved

    def key(size, layer, tta):
        return feature_set_key(plan_export("mobilenet_v2", args.weights, size, layer, "avg", tta=tta).key)

    def speed(keys, augmented=False):
        fitting = [
            (k, p) for k, p in passes.items() if set(keys) <= set(p["keys"]) and (k == AUGMENT_PASS) == augmented
        ]
        label, p = min(fitting, key=lambda kp: len(kp[1]["keys"]))
        if label == PASSES[0][0]:
            return p["images_per_second"], 1.0
        if label in interleaved:  # the interleaved ratio: robust to the load changing between whole passes
            return p["images_per_second"], interleaved[label]["speed_vs_baseline"]
        return p["images_per_second"], p["speed_vs_baseline"]

    levers = json.loads(levers_file.read_text()) if levers_file.is_file() else {}
    rows: list[tuple[str, list, dict, bool, str]] = [
        (lever, [key(*p) for p in parts], {"C": 0.01}, False, "logreg C=0.01") for lever, parts in LEVERS
    ]
    base_keys = rows[0][1]
    rows.append(
        ("tuned C (logreg default: C by 3-fold internal CV)", base_keys, {}, False, "logreg (LogisticRegressionCV)")
    )
    concat_keys = [key(224, CONCAT, "none")]
    rows.append((BLOCK_L2, concat_keys, {"C": 0.01}, False, "logreg C=0.01, each block L2-normalised first"))
    rows.append(("last+mid concatenated + tuned C", concat_keys, {}, False, "logreg (LogisticRegressionCV)"))
    if args.augment:
        rows.append(
            (
                f"augment N={AUGMENT} (training rows only)",
                base_keys,
                {"C": 0.01},
                True,
                f"logreg C=0.01 + {AUGMENT} views per training image",
            )
        )
    base_scores = None
    for lever, keys, params, augmented, head in rows:
        if args.levers is not None and lever not in args.levers and lever != rows[0][0]:
            continue
        if lever in levers and levers[lever].get("repeats") == args.repeats:
            row = levers[lever]
        else:
            X, y, common = aligned(cache, keys)
            if lever == BLOCK_L2:  # does a per-block normalisation before concatenating matter? (heads standardise)
                last = X[:, :1280] / np.maximum(np.linalg.norm(X[:, :1280], axis=1, keepdims=True), 1e-12)
                mid = X[:, 1280:] / np.maximum(np.linalg.norm(X[:, 1280:], axis=1, keepdims=True), 1e-12)
                X = np.hstack([last, mid])
            views = None
            if augmented:
                fs = read_feature_set(cache, keys[0])
                order = {s: i for i, s in enumerate(common)}
                found = read_views(cache, fs)
                owner = np.array([order.get(s, -1) for s in fs.sha256[found.owner]])
                views = (found.X[owner >= 0], owner[owner >= 0])
            started = time.perf_counter()
            scores = repeated_cv(X, y, params, args.repeats, views=views)
            row = {
                "lever": lever,
                "feature_sets": keys,
                "dim": int(X.shape[1]),
                "head": head,
                "rows": int(len(y)),
                "repeats": args.repeats,
                "scores": scores.tolist(),
                "cv_seconds": time.perf_counter() - started,
            }
            levers[lever] = row
            levers_file.write_text(json.dumps(levers, indent=2))
        scores = np.array(row["scores"])
        row |= summary(scores, base_scores)
        row["extraction_images_per_second"], row["extraction_vs_baseline"] = speed(keys, augmented)
        if base_scores is None:
            base_scores = scores
        report.setdefault("levers", []).append(row)
        print(
            f"  {lever}: {row['accuracy']:.4f} ({row.get('delta_points', 0):+.2f} pts), "
            f"{row['extraction_vs_baseline']:.2f} x baseline speed",
            flush=True,
        )
    if not args.heads:
        return report
    # the sweep picks a pair on the training rows; the fixed hold-out judges it against the baseline pair
    sweep_file = work / f"{name}.sweep.json"
    if sweep_file.is_file():
        report["sweep"], report["holdout"] = json.loads(sweep_file.read_text())
    else:
        started = time.perf_counter()
        result = sweep(cache, args.sweep_features, args.heads, cv=5, seed=0, n_jobs=args.n_jobs)
        report["sweep"] = {
            "seconds": time.perf_counter() - started,
            "heads": list(args.heads),
            "setup": next(iter(result.results.values())).setup,
            "ranking": [
                {
                    "feature_set": r.feature_key,
                    "head": r.head,
                    "cv_accuracy": r.accuracy,
                    "cv_accuracy_std": r.accuracy_std,
                    "fit_s": r.fit_s,
                    "extraction_ms": r.extraction_ms,
                }
                for r in result.rows
            ],
        }
        report["sweep"]["pick"], report["sweep"]["why"] = result.pick, result.why
        best = report["sweep"]["ranking"][result.pick]
        report["holdout"] = {
            "best_pair": holdout_pair(cache, best["feature_set"], best["head"]),
            "baseline_pair": holdout_pair(cache, base_keys[0], "logreg"),
        }
        sweep_file.write_text(json.dumps([report["sweep"], report["holdout"]], indent=2))
    best = report["sweep"]["ranking"][report["sweep"].get("pick", 0)]  # the pair sweep() picks (choose_pair)
    h = report["holdout"]
    h["delta_points"] = 100 * (h["best_pair"]["holdout_accuracy"] - h["baseline_pair"]["holdout_accuracy"])
    h["best_pair_extraction_images_per_second"], h["best_pair_extraction_vs_baseline"] = speed([best["feature_set"]])
    print(
        f"  sweep best: {best['head']} on {best['feature_set']} (CV {best['cv_accuracy']:.4f}); hold-out "
        f"{h['best_pair']['holdout_accuracy']:.4f} vs baseline {h['baseline_pair']['holdout_accuracy']:.4f} "
        f"({h['delta_points']:+.2f} pts)",
        flush=True,
    )
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
    parser.add_argument(
        "--work",
        default=None,
        help="Keep caches here; a dataset whose passes are recorded there "
        "skips extraction (its cache and timings are reused)",
    )
    parser.add_argument("--levers", default=None, help="Semicolon-separated lever names to score (default: all)")
    parser.add_argument("--sweep-features", default="all", help="The sweep's --features (default: all)")
    parser.add_argument(
        "--no-augment", dest="augment", action="store_false", help=f"Skip the augment N={AUGMENT} pass and lever"
    )
    parser.add_argument("--n-jobs", type=int, default=2, help="The sweep's joblib workers")
    parser.add_argument(
        "--speed-images",
        type=int,
        default=300,
        help="Photos of the interleaved speed measurement (each pass between two baselines); 0: none",
    )
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
        "benchmark": "bench_levers",
        "quick": args.quick,
        "limit": args.limit,
        "repeats": args.repeats,
        "backbone": "mobilenet_v2_1.0",
        "weights": args.weights,
        "sweep_heads": list(args.heads),
        "seconds": time.perf_counter() - started,
        "machine": {
            "cores": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "load_average_at_end": load,
            "note": "shared with other jobs; compare ratios and paired deltas within this run",
        },
        "datasets": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
