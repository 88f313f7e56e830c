"""Comparing heads on one feature set with stratified K-fold cross-validation, and the report of it."""
from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from time import perf_counter

import numpy as np
from sklearn.metrics import confusion_matrix

from tlpipe.features.cache import FeatureSet
from tlpipe.pipeline.evaluate import save_confusion_matrix
from tlpipe.pipeline.heads import HEADS, class_balance, cross_validate, resolve_pca, select_split, summarize

_METRICS = ("accuracy", "macro_f1", "log_loss", "fit_s", "predict_s")


@dataclass
class HeadResult:
    """One head's cross-validated figures (mean and standard deviation over folds) at its best parameters."""

    name: str
    params: dict
    folds: int
    accuracy: float
    accuracy_std: float
    macro_f1: float
    macro_f1_std: float
    log_loss: float
    log_loss_std: float
    fit_s: float
    fit_s_std: float
    predict_s: float
    predict_s_std: float
    pca: int | float | None = None
    grid: list[dict] = field(default_factory=list)  # every grid point searched, best first


@dataclass
class CompareResult:
    feature_key: str
    backbone: dict  # the feature set's backbone metadata (backbone, model_sha256, input_size...)
    cache_id: str
    rows: int
    setup: str  # which rows were cross-validated and why
    class_names: list[str]  # of the classes in the rows used, in label order
    balance: dict
    cv: int
    seed: int
    search: bool
    class_weight: dict | str | None
    n_jobs: int | None
    heads: list[HeadResult]
    best: str
    y_true: np.ndarray  # labels of the rows used
    y_pred: np.ndarray  # the best head's out-of-fold predictions for them
    confusion: np.ndarray  # of the best head, out of fold, rows/columns in class_names order
    seconds: float

    def head(self, name: str) -> HeadResult:
        return next(h for h in self.heads if h.name == name)

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k not in ("y_true", "y_pred", "confusion", "heads")}
        return data | {"heads": [asdict(h) for h in self.heads], "confusion": self.confusion.tolist()}


def compare_heads(fs: FeatureSet, models: tuple[str, ...] | list[str] = HEADS, *, cv: int = 5, seed: int = 0,
                  n_jobs: int | None = None, class_weight: dict | str | None = None, search: bool = False,
                  holdout: bool = True, pca: int | float | str | None = "auto") -> CompareResult:
    """Cross-validate heads on the labelled rows of a feature set and pick the best one.

    Stratified ``cv``-fold CV (shuffled with ``seed``), parallel over (head, fold) with joblib
    (``n_jobs=None``: every core). With ``holdout`` only the training rows of :func:`select_split` are
    used, so the evaluation rows stay unseen for ``evaluate_head``; ``holdout=False`` uses every labelled
    row. ``search=True`` scores each head's :func:`~pipeline.heads.search_space` and reports its best
    point (the usual, slightly optimistic, GridSearchCV ``best_score_``). The best head has the highest
    mean accuracy (ties: macro-F1); its out-of-fold predictions give the confusion matrix.
    """
    started = perf_counter()
    if holdout:
        rows, _, description = select_split(fs, seed=seed)
        setup = f"cross-validation on the training rows only ({description})"
    else:
        rows = np.flatnonzero(fs.y >= 0)
        setup = f"cross-validation on all {len(rows)} labelled rows" + (
            f" ({int(np.sum(fs.y < 0))} unlabelled rows excluded)" if np.any(fs.y < 0) else "")
    X, y = fs.X[rows], fs.y[rows]
    scores = cross_validate(X, y, list(models), cv=cv, seed=seed, search=search, class_weight=class_weight,
                            n_jobs=n_jobs, pca=pca)
    summary = summarize(scores)
    heads = []
    for name in models:
        grid = [r for r in summary if r["head"] == name]
        best = grid[0]
        heads.append(HeadResult(name=name, params=best["params"], folds=best["folds"],
                                pca=resolve_pca(name, pca, X.shape),
                                grid=grid if search else [], **{k: best[k] for k in best if k.startswith(_METRICS)}))
    winner = max(heads, key=lambda h: (h.accuracy, h.macro_f1))
    y_pred = np.empty_like(y)
    for s in scores:
        if s.head == winner.name and s.params == winner.params:
            y_pred[s.test_idx] = s.pred
    labels = np.unique(y)
    present = [fs.class_names[i] for i in labels]
    return CompareResult(
        feature_key=fs.key, backbone=dict(fs.metadata), cache_id=fs.cache_id, rows=len(rows), setup=setup,
        class_names=present, balance=class_balance(y, fs.class_names), cv=cv, seed=seed, search=search,
        class_weight=class_weight, n_jobs=n_jobs, heads=heads, best=winner.name, y_true=y, y_pred=y_pred,
        confusion=confusion_matrix(y, y_pred, labels=labels), seconds=perf_counter() - started)


def _pm(mean: float, std: float, digits: int = 3, scale: float = 1.0) -> str:
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _cells(h: HeadResult) -> list[str]:
    params = ", ".join(f"{k}={v}" for k, v in h.params.items()) or "defaults"
    return [h.name, _pm(h.accuracy, h.accuracy_std), _pm(h.macro_f1, h.macro_f1_std),
            _pm(h.log_loss, h.log_loss_std), _pm(h.fit_s, h.fit_s_std, 2), _pm(h.predict_s, h.predict_s_std, 3),
            params + (f", pca={h.pca}" if h.pca else "")]


_COLUMNS = ["head", "accuracy", "macro-F1", "log-loss", "fit s", "predict s", "parameters"]


def format_table(result: CompareResult):
    """A rich table of the comparison (best head marked), for the CLI."""
    from rich.table import Table

    table = Table(title=f"{result.cv}-fold CV on {result.rows} rows of {result.feature_key}")
    for i, column in enumerate(_COLUMNS):
        table.add_column(column, justify="left" if i in (0, 6) else "right")
    for h in sorted(result.heads, key=lambda h: (-h.accuracy, -h.macro_f1)):
        cells = _cells(h)
        if h.name == result.best:
            cells[0] = f"[bold green]{h.name} *[/]"
        table.add_row(*cells)
    return table


def _markdown(result: CompareResult) -> str:
    meta = result.backbone
    tuning = ("best point of each head's search grid (slightly optimistic, like GridSearchCV's best_score_)"
              if result.search else "defaults")
    heads = sorted(result.heads, key=lambda h: (-h.accuracy, -h.macro_f1))
    lines = [
        f"# Head comparison: {result.feature_key}", "",
        f"Best head: **{result.best}** (highest mean accuracy; ties broken by macro-F1).", "",
        "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS),
        *("| " + " | ".join(_cells(h)) + " |" for h in heads), "",
        "Figures are mean ± standard deviation over the folds; times are seconds per fit / per prediction of "
        "one fold.", "", "## Setup", "",
        f"- Feature set: `{result.feature_key}` (backbone {meta.get('backbone', '?')}, input size "
        f"{meta.get('input_size', '?')}, model sha256 {str(meta.get('model_sha256') or '?')[:16]}), cache "
        f"`{result.cache_id}`",
        f"- Rows: {result.rows}; {result.setup}",
        f"- Stratified {result.cv}-fold CV, shuffled with seed {result.seed}; class_weight {result.class_weight}",
        f"- Hyperparameters: {tuning}",
        f"- Wall time: {result.seconds:.1f} s (n_jobs {result.n_jobs or 'all cores'})", "",
        "## Class balance", "", "| class | rows |", "|---|---|",
        *(f"| {name} | {count} |" for name, count in result.balance["counts"].items() if count),
        "", f"Imbalance ratio (largest / smallest class): {result.balance['imbalance_ratio']:.2f}", "",
        "![comparison](comparison.png)", "", f"![confusion matrix of {result.best}](confusion_matrix.png)", "",
    ]
    return "\n".join(lines)


def _bar_chart(result: CompareResult, path: Path) -> None:
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state

    heads = result.heads
    fig = Figure(figsize=(9, 3.8))
    axes = fig.subplots(1, 3)
    x = np.arange(len(heads))
    panels = [("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("fit_s", "fit time (s)")]
    for ax, (metric, label) in zip(axes, panels):
        means = [getattr(h, metric) for h in heads]
        ax.bar(x, means, yerr=[getattr(h, metric + "_std") for h in heads], capsize=4,
               color=["tab:green" if h.name == result.best else "tab:blue" for h in heads])
        ax.set_xticks(x, [h.name for h in heads], rotation=30, ha="right")
        ax.set_title(label)
        if metric != "fit_s":
            low = min(means) - 3 * max(getattr(h, metric + "_std") for h in heads) - 0.02
            ax.set_ylim(max(0.0, low), 1.0)
    fig.suptitle(f"{result.cv}-fold CV, {result.feature_key}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_report(result: CompareResult, folder: str | os.PathLike) -> dict[str, Path]:
    """Write report.md, results.csv, results.json, comparison.png and confusion_matrix.png into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / name for name in ("report.md", "results.csv", "results.json", "comparison.png",
                                              "confusion_matrix.png")}
    paths["report.md"].write_text(_markdown(result))
    with open(paths["results.csv"], "w", newline="") as f:
        writer = csv.writer(f)
        stats = [m + suffix for m in _METRICS for suffix in ("", "_std")]
        writer.writerow(["head", *stats, "folds", "params", "pca", "best"])
        for h in result.heads:
            writer.writerow([h.name, *(getattr(h, s) for s in stats), h.folds, json.dumps(h.params), h.pca,
                             h.name == result.best])
    paths["results.json"].write_text(json.dumps(result.to_dict(), indent=2, default=str))
    _bar_chart(result, paths["comparison.png"])
    save_confusion_matrix(result.confusion, result.class_names, paths["confusion_matrix.png"],
                          title=f"{result.best}: out-of-fold confusion matrix")
    return paths


# -- sweep: every head on every feature set ------------------------------------------------------------
@dataclass
class SweepRow:
    """One (feature set, head) pair of a sweep: cross-validated figures and what extracting it costs."""

    feature_key: str
    head: str
    params: dict
    accuracy: float
    accuracy_std: float
    macro_f1: float
    fit_s: float
    predict_s: float
    extraction_ms: float | None  # ms per image of the extraction pass that filled the feature set
    feature_sets_in_pass: int | None  # feature sets that pass filled together (they share its cost)
    input_size: int | None
    tta: str
    layer: str | None


@dataclass
class SweepResult:
    cache: str
    pattern: str
    rows: list[SweepRow]  # ranked: accuracy, then macro-F1, then cheaper extraction
    results: dict[str, CompareResult]
    images: int  # images common to every feature set (the rows every pair is scored on)
    cv: int
    seed: int
    seconds: float

    @property
    def best(self) -> SweepRow:
        return self.rows[0]

    def to_dict(self) -> dict:
        return {"cache": self.cache, "pattern": self.pattern, "images": self.images, "cv": self.cv, "seed": self.seed,
                "seconds": self.seconds, "best": asdict(self.best), "rows": [asdict(r) for r in self.rows],
                "setups": {k: r.setup for k, r in self.results.items()}}


def is_sweep(features: str | None) -> bool:
    """Whether ``--features`` asks for a sweep: ``all``, a glob (``*?[``) or a comma-separated list."""
    return features is not None and (features == "all" or any(c in features for c in "*?[,"))


def matching_feature_sets(cache: str | os.PathLike, pattern: str) -> list[str]:
    """Feature-set keys of ``cache`` that ``pattern`` names: ``all``, shell globs or exact keys, comma-separated."""
    from fnmatch import fnmatchcase

    from tlpipe.features.cache import CacheError, list_feature_sets

    keys = list_feature_sets(cache)
    if pattern == "all":
        chosen = keys
    else:
        parts = [p.strip() for p in pattern.split(",") if p.strip()]
        chosen = [k for k in keys if any(fnmatchcase(k, p) or k == p for p in parts)]
    if not chosen:
        raise CacheError(f"{cache}: no feature set matches {pattern!r}; it holds: {', '.join(keys) or 'none'}")
    return chosen


def extraction_records(cache: str | os.PathLike) -> dict[str, dict]:
    """The ``extraction`` record (speed of the pass that filled it) of every feature set that has one."""
    from tlpipe.features.cache import read_retrying

    def read(f) -> dict[str, dict]:
        return {k: json.loads(g.attrs["extraction"]) for k, g in f["features"].items() if "extraction" in g.attrs}

    return read_retrying(cache, read)


def _common_rows(sets: list[FeatureSet]) -> list[FeatureSet]:
    """Each feature set cut to the images all of them hold, in one order (by content hash), so every pair
    is scored on the same rows and the same folds."""
    common = set(sets[0].sha256)
    for fs in sets[1:]:
        common &= set(fs.sha256)
    order = sorted(common)
    out = []
    for fs in sets:
        index = {s: i for i, s in enumerate(fs.sha256)}
        rows = np.array([index[s] for s in order], dtype=np.int64)
        out.append(FeatureSet(key=fs.key, X=fs.X[rows], y=fs.y[rows], split=fs.split[rows], paths=fs.paths[rows],
                              sha256=fs.sha256[rows], class_names=fs.class_names, metadata=fs.metadata,
                              cache_id=fs.cache_id))
    return out


def sweep(cache: str | os.PathLike, pattern: str = "all", models: tuple[str, ...] | list[str] = HEADS, *, cv: int = 5,
          seed: int = 0, n_jobs: int | None = None, class_weight: dict | str | None = None, search: bool = False,
          holdout: bool = True, pca: int | float | str | None = "auto") -> SweepResult:
    """Score every head on every feature set ``pattern`` names and rank the (feature set, head) pairs.

    Parameters
    ----------
    cache : path
        HDF5 cache made by ``tlpipe extract``.
    pattern : str
        ``all``, shell globs over feature-set keys, or keys, comma-separated (:func:`matching_feature_sets`).
    models, cv, seed, n_jobs, class_weight, search, holdout, pca
        As for :func:`compare_heads`, applied to each feature set.

    Returns
    -------
    SweepResult
        Pairs ranked by mean CV accuracy (ties: macro-F1, then the cheaper extraction), each with fit and
        predict seconds per fold and the extraction cost in ms per image recorded by the extract that
        filled the feature set (None for caches written before it was recorded). Every feature set is cut
        to the images all of them hold, so all pairs see the same rows, the same hold-out and the same folds.
    """
    from tlpipe.features.cache import read_feature_set

    started = perf_counter()
    keys = matching_feature_sets(cache, pattern)
    sets = _common_rows([read_feature_set(cache, k) for k in keys])
    speeds = extraction_records(cache)
    results, rows = {}, []
    for fs in sets:
        result = compare_heads(fs, models, cv=cv, seed=seed, n_jobs=n_jobs, class_weight=class_weight, search=search,
                               holdout=holdout, pca=pca)
        results[fs.key] = result
        speed = speeds.get(fs.key, {})
        rate = speed.get("images_per_second")
        for h in result.heads:
            rows.append(SweepRow(
                feature_key=fs.key, head=h.name, params=h.params, accuracy=h.accuracy, accuracy_std=h.accuracy_std,
                macro_f1=h.macro_f1, fit_s=h.fit_s, predict_s=h.predict_s,
                extraction_ms=1000.0 / rate if rate else None, feature_sets_in_pass=speed.get("feature_sets_in_pass"),
                input_size=fs.metadata.get("input_size"), tta=fs.metadata.get("tta", "none"),
                layer=fs.metadata.get("layer")))
    rows.sort(key=lambda r: (-r.accuracy, -r.macro_f1, r.extraction_ms if r.extraction_ms is not None else np.inf))
    return SweepResult(cache=str(cache), pattern=pattern, rows=rows, results=results, images=len(sets[0]), cv=cv,
                       seed=seed, seconds=perf_counter() - started)


_SWEEP_COLUMNS = ["rank", "feature set", "head", "accuracy", "macro-F1", "fit s", "predict s", "extract ms/img"]


def _sweep_cells(rank: int, r: SweepRow) -> list[str]:
    cost = "?" if r.extraction_ms is None else f"{r.extraction_ms:.1f}" + (
        f" (pass of {r.feature_sets_in_pass})" if (r.feature_sets_in_pass or 1) > 1 else "")
    return [str(rank), r.feature_key, r.head, _pm(r.accuracy, r.accuracy_std), f"{r.macro_f1:.3f}",
            f"{r.fit_s:.2f}", f"{r.predict_s:.3f}", cost]


def format_sweep_table(result: SweepResult):
    """A rich table of the ranked pairs (best marked), for the CLI."""
    from rich.table import Table

    table = Table(title=f"{result.cv}-fold CV of every head on {len(result.results)} feature sets "
                        f"({result.images} images each)")
    for i, column in enumerate(_SWEEP_COLUMNS):
        table.add_column(column, justify="left" if i in (1, 2) else "right")
    for rank, r in enumerate(result.rows, 1):
        cells = _sweep_cells(rank, r)
        if rank == 1:
            cells[2] = f"[bold green]{r.head} *[/]"
        table.add_row(*cells)
    return table


def write_sweep_report(result: SweepResult, folder: str | os.PathLike) -> dict[str, Path]:
    """Write sweep.md, sweep.csv and sweep.json into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / name for name in ("sweep.md", "sweep.csv", "sweep.json")}
    best = result.best
    lines = [f"# Sweep: every head on every feature set of `{result.cache}`", "",
             f"Best pair: **{best.head}** on `{best.feature_key}` (highest mean accuracy; ties: macro-F1, then "
             f"the cheaper extraction).", "",
             "| " + " | ".join(_SWEEP_COLUMNS) + " |", "|" + "---|" * len(_SWEEP_COLUMNS),
             *("| " + " | ".join(_sweep_cells(i, r)) + " |" for i, r in enumerate(result.rows, 1)), "",
             f"{result.cv}-fold stratified CV (seed {result.seed}) on the same {result.images} images for every "
             f"feature set; accuracy is mean ± standard deviation over folds; fit / predict seconds per fold; "
             f"extraction ms per image of the extract pass that filled the feature set (a pass that filled "
             f"several feature sets at once shares its cost among them).", "",
             f"Rows: {next(iter(result.results.values())).setup}.", ""]
    paths["sweep.md"].write_text("\n".join(lines))
    with open(paths["sweep.csv"], "w", newline="") as f:
        writer = csv.writer(f)
        fields = list(asdict(best))
        writer.writerow(["rank", *fields])
        for i, r in enumerate(result.rows, 1):
            writer.writerow([i, *(json.dumps(v) if isinstance(v, dict) else v for v in asdict(r).values())])
    paths["sweep.json"].write_text(json.dumps(result.to_dict(), indent=2, default=str))
    return paths
