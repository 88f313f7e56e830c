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
    if fs.excluded:
        setup += f"; {fs.excluded} rows left out by an exclude list"
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
