"""Benchmark: tlpipe's head comparison against a naive GridSearchCV over the same grids.

Data: synthetic embeddings shaped like pooled CNN features (10,000 x 1,280 float32, 10 classes):
a random low-rank class structure (three pairs of confusable classes), per-image activation level,
per-dimension scales and noise, through a ReLU. Good heads land around 90-95% accuracy.

(a) tlpipe: ``compare_heads(search=True)`` on logreg, svm, rbf-svm, mlp: 5-fold CV over each head's
    ``search_space``.
(b) baseline: ``GridSearchCV(estimator, same grid, cv=5, refit=False)`` with scikit-learn's defaults:
    LogisticRegression(), SVC(kernel="linear", probability=True), SVC(kernel="rbf", probability=True),
    MLPClassifier(); n_jobs=None, as most code is written. Same folds as (a).

BLAS runs single-threaded for both (threadpoolctl): on a small shared machine multi-threaded OpenBLAS
can be many times slower for these matrix sizes, which would flatter tlpipe (its joblib workers get
one BLAS thread each). tlpipe's speed-up then comes from its algorithms and its process parallelism
over (head, fold); --serial also times it with n_jobs=1 to separate the two.

Run: python benchmarks/bench_heads.py [--quick] [--rows N]  (writes benchmarks/results/heads.json)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tlpipe.features.cache import FeatureSet  # noqa: E402
from tlpipe.pipeline.heads.estimators import HEADS, search_space  # noqa: E402
from tlpipe.pipeline.heads.selection import compare_heads  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "heads.json"


def synthetic_embeddings(n: int, dim: int = 1280, classes: int = 10, rank: int = 48, seed: int = 0):
    """Embedding-like data: non-negative, correlated dimensions, classes not trivially separable."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, rank))
    for j in range(1, classes, 3):  # classes 1, 4, 7 sit close to 0, 3, 6
        centres[j] = centres[j - 1] + rng.normal(0, 0.45, rank)
    y = rng.permutation(np.arange(n) % classes)
    latent = centres[y] + rng.normal(0, 1, (n, rank))
    mixing = rng.normal(0, 1 / np.sqrt(rank), (rank, dim))
    pre = latent @ mixing + rng.normal(0, 0.7, (n, dim)) + rng.normal(-0.2, 0.3, dim)
    level = rng.lognormal(0, 0.3, (n, 1))  # per-image activation level
    scale = rng.lognormal(0, 0.6, dim)  # per-dimension scale
    return (np.maximum(level * pre, 0) * scale).astype(np.float32), y.astype(np.int32)


def baseline(X, y, folds, names) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import SVC

    estimators = {
        "logreg": LogisticRegression(),
        "svm": SVC(kernel="linear", probability=True),
        "rbf-svm": SVC(kernel="rbf", probability=True),
        "mlp": MLPClassifier(),
    }
    out = {}
    for name in names:
        started = time.perf_counter()
        search = GridSearchCV(estimators[name], search_space(name), cv=folds, refit=False).fit(X, y)
        best = search.best_index_
        out[name] = {
            "seconds": time.perf_counter() - started,
            "accuracy": float(search.best_score_),
            "accuracy_std": float(search.cv_results_["std_test_score"][best]),
            "params": search.best_params_,
        }
        print(f"  baseline {name}: {out[name]['seconds']:.1f} s, accuracy {out[name]['accuracy']:.4f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 rows: a smoke run")
    parser.add_argument("--rows", type=int, help="number of rows (default 10,000, or 2,000 with --quick)")
    parser.add_argument("--serial", action="store_true", help="also time tlpipe with n_jobs=1")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    n = args.rows or (2000 if args.quick else 10000)
    cv, seed = 5, 0
    X, y = synthetic_embeddings(n)
    fs = FeatureSet(
        key="synthetic-1280",
        X=X,
        y=y,
        split=np.full(n, ""),
        paths=np.full(n, ""),
        sha256=np.full(n, ""),
        class_names=[f"class_{i}" for i in range(10)],
    )
    print(
        f"{n} x {X.shape[1]} float32, {len(np.unique(y))} classes, {np.mean(X == 0):.0%} zeros; {os.cpu_count()} cores",
        flush=True,
    )
    warnings.filterwarnings("ignore")  # the baseline's lbfgs/adam hit their iteration limits, as they do

    runs = {}
    for label, n_jobs in [("tlpipe", None), *([("tlpipe serial", 1)] if args.serial else [])]:
        started = time.perf_counter()
        result = compare_heads(fs, HEADS, cv=cv, seed=seed, n_jobs=n_jobs, search=True, holdout=False)
        runs[label] = {
            "seconds": time.perf_counter() - started,
            "n_jobs": n_jobs or os.cpu_count(),
            "heads": {
                h.name: {
                    "accuracy": h.accuracy,
                    "accuracy_std": h.accuracy_std,
                    "params": h.params,
                    "pca": h.pca,
                    "fit_s": h.fit_s,
                    "predict_s": h.predict_s,
                }
                for h in result.heads
            },
        }
        print(f"  {label}: {runs[label]['seconds']:.1f} s", flush=True)

    from sklearn.model_selection import StratifiedKFold

    folds = list(StratifiedKFold(cv, shuffle=True, random_state=seed).split(X, y))
    base = baseline(X, y, folds, HEADS)
    base_seconds = sum(b["seconds"] for b in base.values())
    ours = runs["tlpipe"]
    rows = []
    for name in HEADS:
        a, b = ours["heads"][name]["accuracy"], base[name]["accuracy"]
        rows.append(
            {
                "head": name,
                "tlpipe_accuracy": a,
                "baseline_accuracy": b,
                "difference_points": 100 * (a - b),
                "equal": abs(a - b) <= 0.005,
                "tlpipe_params": ours["heads"][name]["params"],
                "baseline_params": base[name]["params"],
                "baseline_seconds": base[name]["seconds"],
            }
        )
    ratio = base_seconds / ours["seconds"]
    print(f"\n{'head':8} {'tlpipe acc':>10} {'baseline acc':>12} {'diff (pts)':>10}  baseline s")
    for r in rows:
        print(
            f"{r['head']:8} {r['tlpipe_accuracy']:10.4f} {r['baseline_accuracy']:12.4f} "
            f"{r['difference_points']:+10.2f}  {r['baseline_seconds']:9.1f}"
        )
    for label, run in runs.items():
        print(
            f"{label:14} {run['seconds']:8.1f} s  (n_jobs {run['n_jobs']}): {base_seconds / run['seconds']:.2f}x faster"
        )
    print(f"{'baseline':14} {base_seconds:8.1f} s")
    print(
        f"target >= 3x at equal accuracy (+-0.5 points): ratio {ratio:.2f}x, "
        f"{'all heads equal' if all(r['equal'] for r in rows) else 'accuracy differs for ' + ', '.join(r['head'] for r in rows if not r['equal'])}"
    )

    import joblib
    import sklearn

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "data": {"rows": n, "dim": int(X.shape[1]), "classes": 10, "zeros": float(np.mean(X == 0))},
                "cv": cv,
                "seed": seed,
                "grids": {name: search_space(name) for name in HEADS},
                "tlpipe": runs,
                "baseline": {"seconds": base_seconds, "heads": base},
                "ratio": ratio,
                "heads": rows,
                "machine": {
                    "cores": os.cpu_count(),
                    "python": platform.python_version(),
                    "sklearn": sklearn.__version__,
                    "numpy": np.__version__,
                    "joblib": joblib.__version__,
                },
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
            indent=2,
            default=str,
        )
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    with threadpool_limits(1):
        main()
