"""Active-learning benchmark of `tlpipe suggest`: simulated labelling on real photos with their labels hidden.

    python benchmarks/bench_suggest.py [--quick] [--work DIR] [--weights FILE] [--out FILE] [--chart FILE]

Needs ../shared (cats_vs_dogs with its train/test manifest, flowers5_128px, MobileNetV2 1.0 ImageNet weights) and
the `tf` and `cpu` extras only to embed the photos once (caches kept in --work, default /tmp/tlpipe-bench-suggest).

For each data set: the evaluation photos are never labelled nor suggested (cats_vs_dogs: its test_set, 500 photos;
flowers5_128px: a stratified 20 % of the photos, fixed, seed 0); the rest is the pool, its labels hidden. Each run
starts from 2 labelled photos per class (random, per seed; the same start for every strategy of a seed), fits the
default head (`fit-head`'s logreg: `tlpipe.pipeline.heads.estimators.fit_head`), measures its accuracy on the evaluation photos,
then labels the next N = 20 photos the strategy picks (`tlpipe.pipeline.suggest.select`, the function `tlpipe
suggest` calls, with that head; or uniformly at random), up to 400 labels (the last batch smaller). Strategies:
random, hybrid (the default), margin, entropy, diverse; 5 seeds; mean and standard error over the seeds.

Cold start: from no labels at all, the first 20 photos picked by `select` without a head (typiclust-like) against 20
random photos: classes covered and the accuracy of a head fitted on them.

Goal (issue 31): the default strategy reaches random sampling's final accuracy (at 400 labels) with at most half
its labels, and is never worse than random by more than the seeds' spread (the larger of the two curves' standard
deviation over seeds) at any round. Writes benchmarks/results/suggest.json (--quick: suggest_quick.json) and the
chart docs/figures/suggest.png.
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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
DATASETS = {
    "cats_vs_dogs": SHARED / "datasets" / "cats_vs_dogs",
    "flowers5_128px": SHARED / "datasets" / "flowers5_128px",
}
STRATEGIES = ("random", "hybrid", "margin", "entropy", "diverse")
START_PER_CLASS = 2


def embed(name: str, work: Path, weights: Path, store: Path | None) -> Path:
    """The data set's cache (extracted once with the real MobileNetV2 1.0 weights)."""
    cache = work / f"{name}.h5"
    if not cache.exists():
        from tlpipe.backbones.store import ModelStore
        from tlpipe.features.extract import extract

        extract(
            DATASETS[name] / "manifest.csv",
            cache,
            backbone="mobilenet_v2",
            weights=weights,
            store=ModelStore(store) if store else None,
            device="cpu",
        )
    return cache


def split(fs, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Pool and evaluation rows."""
    labelled = np.flatnonzero(fs.y >= 0)
    if name == "cats_vs_dogs":
        test = labelled[fs.split[labelled] == "test"]  # the manifest's test_set
        return np.setdiff1d(labelled, test), test
    from sklearn.model_selection import train_test_split

    pool, test = train_test_split(labelled, test_size=0.2, random_state=0, stratify=fs.y[labelled])
    return np.sort(pool), np.sort(test)


def fit_and_score(X, y, lab, X_test, y_test):
    from tlpipe.pipeline.heads.estimators import fit_head

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixed-C note while a class has < 3 labels; convergence notes
        head, info = fit_head(X[lab], y[lab], "logreg")
    return head, float(np.mean(head.predict(X_test) == y_test)), info["params"].get("C_chosen_by", "")


def run(X, y, X_test, y_test, Z, strategy: str, seed: int, batch: int, budget: int) -> dict:
    from tlpipe.pipeline.suggest import select

    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    lab = np.zeros(len(y), bool)
    start = np.random.default_rng(1000 + seed)  # the same start for every strategy of a seed
    for c in classes:
        lab[start.choice(np.flatnonzero(y == c), START_PER_CLASS, replace=False)] = True
    labels, accuracy, select_s, fit_s, fixed = [], [], [], [], []
    while True:
        t = time.perf_counter()
        head, acc, chosen_by = fit_and_score(X, y, lab, X_test, y_test)
        fit_s.append(time.perf_counter() - t)
        labels.append(int(lab.sum()))
        accuracy.append(acc)
        fixed.append(chosen_by.startswith("fixed"))
        if lab.sum() >= budget:
            break
        m = min(batch, budget - int(lab.sum()))
        t = time.perf_counter()
        if strategy == "random":
            picks = rng.choice(np.flatnonzero(~lab), m, replace=False)
        else:
            sel = select(X, lab, m, strategy=strategy, predict_proba=head.predict_proba, seed=seed, projection=Z)
            picks = sel.rows
            if len(picks) < m:  # never seen here (pools of thousands), but would bias the curve
                raise RuntimeError(f"{strategy} picked {len(picks)} of {m}: {sel.notes}")
        select_s.append(time.perf_counter() - t)
        assert not lab[picks].any()
        lab[picks] = True
    return {
        "labels": labels,
        "accuracy": accuracy,
        "fixed_c_rounds": int(sum(fixed)),
        "select_s": float(np.sum(select_s)),
        "fit_s": float(np.sum(fit_s)),
    }


def cold_start(X, y, X_test, y_test, Z, seed: int, n: int) -> dict:
    from tlpipe.pipeline.suggest import select

    out = {}
    none = np.zeros(len(y), bool)
    for kind in ("diverse", "random"):
        if kind == "diverse":
            rows = select(X, none, n, seed=seed, projection=Z).rows
        else:
            rows = np.random.default_rng(seed).choice(len(y), n, replace=False)
        lab = none.copy()
        lab[rows] = True
        covered = len(np.unique(y[rows]))
        acc = fit_and_score(X, y, lab, X_test, y_test)[1] if covered >= 2 else None
        out[kind] = {"classes_covered": covered, "accuracy": acc}
    return out


def summarise(runs: dict[str, list[dict]], budget: int) -> dict:
    curves = {}
    for strategy, seeds in runs.items():
        A = np.array([r["accuracy"] for r in seeds])  # (seeds, rounds)
        curves[strategy] = {
            "labels": seeds[0]["labels"],
            "mean": A.mean(0).tolist(),
            "std": A.std(0, ddof=1).tolist() if len(seeds) > 1 else [0.0] * A.shape[1],
            "se": (A.std(0, ddof=1) / np.sqrt(len(seeds))).tolist() if len(seeds) > 1 else [0.0] * A.shape[1],
            "per_seed": A.tolist(),
            "select_s_per_round": float(np.mean([r["select_s"] / max(1, len(r["labels"]) - 1) for r in seeds])),
            "fit_s_per_round": float(np.mean([r["fit_s"] / len(r["labels"]) for r in seeds])),
            "fixed_c_rounds": [r["fixed_c_rounds"] for r in seeds],
        }
    random, default = curves["random"], curves["hybrid"]
    target = random["mean"][-1]
    labels = np.array(default["labels"])
    reached = [int(n) for n, a in zip(labels, default["mean"]) if a >= target]
    first = reached[0] if reached else None
    gaps = []
    for i, n in enumerate(labels):
        spread = max(random["std"][i], default["std"][i])
        gaps.append(
            {
                "labels": int(n),
                "hybrid_minus_random": default["mean"][i] - random["mean"][i],
                "spread": spread,
                "ok": default["mean"][i] - random["mean"][i] >= -spread,
            }
        )
    others = {}
    for strategy, curve in curves.items():
        hit = [int(n) for n, a in zip(curve["labels"], curve["mean"]) if a >= target]
        others[strategy] = hit[0] if hit else None
    return {
        "curves": curves,
        "random_final_accuracy": target,
        "hybrid_final_accuracy": default["mean"][-1],
        "hybrid_labels_to_random_final": first,
        "labels_saved": None if first is None else budget - first,
        "labels_saved_share": None if first is None else (budget - first) / budget,
        "labels_to_random_final_by_strategy": others,
        "half_the_labels": first is not None and first <= budget / 2,
        "never_worse_than_random_by_more_than_spread": all(g["ok"] for g in gaps),
        "worst_round": min(gaps, key=lambda g: g["hybrid_minus_random"] + g["spread"]),
        "rounds": gaps,
    }


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    names = list(results["datasets"])
    fig = Figure(figsize=(6.2 * len(names), 4.6))
    axes = np.atleast_1d(fig.subplots(1, len(names)))
    colours = {
        "random": "black",
        "hybrid": "tab:red",
        "margin": "tab:blue",
        "entropy": "tab:green",
        "diverse": "tab:purple",
    }
    for ax, name in zip(axes, names):
        summary = results["datasets"][name]
        for strategy, curve in summary["curves"].items():
            x, m, se = np.array(curve["labels"]), np.array(curve["mean"]), np.array(curve["se"])
            label = strategy + (" (default)" if strategy == "hybrid" else "")
            ax.plot(x, m, color=colours[strategy], lw=2.2 if strategy in ("hybrid", "random") else 1.2, label=label)
            ax.fill_between(x, m - se, m + se, color=colours[strategy], alpha=0.15, lw=0)
        target = summary["random_final_accuracy"]
        ax.axhline(target, color="grey", ls="--", lw=1)
        first = summary["hybrid_labels_to_random_final"]
        title = f"{name}: random's accuracy at {results['budget']} labels ({target:.3f})"
        if first is not None:
            ax.axvline(first, color="tab:red", ls=":", lw=1)
            title += f"\nreached by hybrid at {first} labels ({summary['labels_saved']} saved)"
        else:
            title += "\nnot reached by hybrid"
        ax.set(xlabel="labelled photos", ylabel="accuracy on held-out photos", title=title)
        lows = [min(c["mean"]) for c in summary["curves"].values()]
        ax.set_ylim(
            max(0.0, min(lows) - 0.02), min(1.0, max(max(c["mean"]) for c in summary["curves"].values()) + 0.01)
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(
        f"tlpipe suggest: MobileNetV2 1.0 embeddings, default logreg head, batches of {results['batch']}, "
        f"{results['seeds']} seeds (mean ± s.e.)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, up to 100 labels, cats_vs_dogs only")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tlpipe-bench-suggest"))
    parser.add_argument("--weights", type=Path, default=SHARED / "weights" / "mobilenet_v2_1.0_224_no_top.h5")
    parser.add_argument("--store", type=Path, default=None, help="model store [default: tlpipe's]")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--budget", type=int, default=400)
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset")
    parser.add_argument(
        "--strategies", default=",".join(STRATEGIES), help="comma-separated subset (random and hybrid always)"
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--chart", type=Path, default=ROOT / "docs" / "figures" / "suggest.png")
    args = parser.parse_args()
    names = [n for n in args.datasets.split(",") if n]
    strategies = [s for s in STRATEGIES if s in {"random", "hybrid", *args.strategies.split(",")}]
    if args.quick:
        args.seeds, args.budget, names = 1, 100, ["cats_vs_dogs"]
    out = args.out or ROOT / "benchmarks" / "results" / ("suggest_quick.json" if args.quick else "suggest.json")
    for needed in [args.weights, *(DATASETS[n] for n in names)]:
        if not needed.exists():
            sys.exit(f"bench_suggest needs {needed} (../shared)")
    from tlpipe.features.cache import read_feature_set
    from tlpipe.pipeline.audit.checks import normalise_rows
    from tlpipe.pipeline.suggest.strategies import project

    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_start": os.getloadavg(),
            "note": "2-core machine shared with other helpers' jobs; times are noisy",
        },
        "backbone": "mobilenet_v2 1.0 @224, ImageNet weights (../shared), average pooling",
        "head": "fit-head's default logreg (tlpipe.pipeline.heads.estimators.fit_head(X, y, 'logreg'))",
        "start_per_class": START_PER_CLASS,
        "batch": args.batch,
        "budget": args.budget,
        "seeds": args.seeds,
        "strategies": strategies,
        "goal": "hybrid reaches random's accuracy at the budget with at most half the labels, and is never worse "
        "than random by more than the seeds' spread (max of the two curves' std over seeds) at any round",
        "datasets": {},
    }
    started = time.perf_counter()
    for name in names:
        fs = read_feature_set(embed(name, args.work, args.weights, args.store))
        pool, test = split(fs, name)
        X, y = fs.X[pool], fs.y[pool]
        X_test, y_test = fs.X[test], fs.y[test]
        Z = project(normalise_rows(X.copy()), 0)
        runs: dict[str, list[dict]] = {s: [] for s in strategies}
        cold = []
        for seed in range(args.seeds):
            for strategy in strategies:
                t = time.perf_counter()
                runs[strategy].append(run(X, y, X_test, y_test, Z, strategy, seed, args.batch, args.budget))
                curve = " ".join(f"{a:.3f}" for a in runs[strategy][-1]["accuracy"])
                print(f"{name} seed {seed} {strategy} ({time.perf_counter() - t:.0f} s): {curve}", flush=True)
            cold.append(cold_start(X, y, X_test, y_test, Z, seed, args.batch))
        summary = summarise(runs, args.budget)
        summary |= {
            "pool": len(pool),
            "evaluation": len(test),
            "classes": list(fs.class_names),
            "feature_set": fs.key,
            "label_conflicts_left_out": fs.excluded_conflicts,
            "cold_start": {
                kind: {
                    "classes_covered_mean": float(np.mean([c[kind]["classes_covered"] for c in cold])),
                    "accuracy": [c[kind]["accuracy"] for c in cold],
                }
                for kind in ("diverse", "random")
            },
        }
        results["datasets"][name] = summary
        print(
            f"{name}: random final {summary['random_final_accuracy']:.4f}; hybrid reaches it at "
            f"{summary['hybrid_labels_to_random_final']} labels; never worse beyond spread: "
            f"{summary['never_worse_than_random_by_more_than_spread']}",
            flush=True,
        )
        results["seconds"] = time.perf_counter() - started
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
    if not args.quick:
        chart(results, args.chart)
    print(f"wrote {out}" + ("" if args.quick else f" and {args.chart}"))


if __name__ == "__main__":
    main()
