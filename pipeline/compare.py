"""Comparing heads on one feature set with stratified K-fold cross-validation, and the report of it."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field, fields
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
    per_class: dict = field(default_factory=dict)  # class name -> precision, recall, f1-score, support (out of fold)
    ece: float | None = None  # expected calibration error of the out-of-fold probabilities (10 bins)

    @property
    def accuracy_se(self) -> float:
        """Standard error of the mean CV accuracy (fold standard deviation / sqrt(folds))."""
        return self.accuracy_std / np.sqrt(max(self.folds, 1))


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
    y_pred: np.ndarray  # the best head's out-of-fold predictions for them (-1: a class too small to be scored)
    confusion: np.ndarray  # of the best head, out of fold, rows/columns in class_names order
    seconds: float
    choice: str = ""  # why the best head won, in words
    chance: float = 0.0  # accuracy of always predicting the largest class of the CV rows
    holdout: dict | None = None  # the best head refitted on the training rows, scored once on the held-out rows
    learning_curve: list[dict] = field(default_factory=list)  # {"rows", "accuracy"} of the best head on the hold-out
    misclassified: list[dict] = field(default_factory=list)  # path, true, predicted, probability, sha256; worst first
    misclassified_source: str = ""  # which predictions the misclassified list comes from
    reliability: dict = field(default_factory=dict)  # head -> {"confidence", "accuracy", "count"} per bin
    embedding_map: dict = field(default_factory=dict)  # "pca" (and "umap"): 2-D points, labels, misclassified
    estimator: object = None  # the refitted best head (None without held-out rows)
    train_rows: np.ndarray | None = None  # feature-set rows the best head was refitted on
    holdout_rows: np.ndarray | None = None  # feature-set rows it was scored on
    map_rows: np.ndarray | None = None  # (n, D) embeddings of the embedding map's points

    def head(self, name: str) -> HeadResult:
        return next(h for h in self.heads if h.name == name)

    def to_dict(self) -> dict:
        skip = (
            "y_true",
            "y_pred",
            "confusion",
            "heads",
            "estimator",
            "train_rows",
            "holdout_rows",
            "embedding_map",
            "map_rows",
        )
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}  # no deep copies
        heads = [asdict(h) | {"accuracy_se": h.accuracy_se} for h in self.heads]
        return data | {"heads": heads, "confusion": self.confusion.tolist()}


ECE_BINS = 10
LEARNING_FRACTIONS = (0.25, 0.5)  # of the training rows, besides all of them
GALLERY = 16  # thumbnails of the worst misclassified images


def reliability_bins(y: np.ndarray, proba: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Reliability diagram data and expected calibration error of top-class probabilities.

    Parameters
    ----------
    y : (N,) true labels; proba : (N, K) float probabilities in ``labels`` order; bins : equal-width
    confidence bins on [0, 1].

    Returns
    -------
    dict with ``confidence``, ``accuracy``, ``count`` (lists, one per non-empty bin) and ``ece``: the
    count-weighted mean |accuracy - confidence| over bins (Naeini et al. 2015; Guo et al. 2017).
    """
    confidence = proba.max(axis=1)
    correct = labels[proba.argmax(axis=1)] == y
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    out = {"confidence": [], "accuracy": [], "count": []}
    ece = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            out["confidence"].append(float(confidence[inside].mean()))
            out["accuracy"].append(float(correct[inside].mean()))
            out["count"].append(int(inside.sum()))
            ece += inside.sum() / len(y) * abs(correct[inside].mean() - confidence[inside].mean())
    return out | {"ece": float(ece)}


def choose_best(heads: list[HeadResult]) -> tuple[HeadResult, str]:
    """The head to use, and why: among heads within one standard error of the top mean accuracy (a
    difference CV cannot resolve), the lowest log-loss wins, then the shortest predict time."""
    top = max(heads, key=lambda h: (h.accuracy, -h.log_loss))
    floor = top.accuracy - top.accuracy_se
    close = [h for h in heads if h.accuracy >= floor - 1e-12]
    winner = min(close, key=lambda h: (h.log_loss, h.predict_s))
    if len(close) == 1:
        return winner, (
            f"{winner.name} has the highest mean CV accuracy ({winner.accuracy:.4f}); no other head is within "
            f"one standard error of it ({top.accuracy_se:.4f})"
        )
    others = ", ".join(f"{h.name} {h.accuracy:.4f}" for h in close if h is not top)
    why = (
        f"{top.name} has the highest mean CV accuracy ({top.accuracy:.4f}, standard error {top.accuracy_se:.4f}); "
        f"within one standard error of it: {others}, a difference CV cannot resolve; among these "
    )
    ties = [h for h in close if h.log_loss == winner.log_loss]
    if len(ties) > 1:
        return winner, why + f"the log-losses tie at {winner.log_loss:.4f} and {winner.name} predicts fastest"
    return winner, why + f"{winner.name} has the lowest log-loss ({winner.log_loss:.4f}, better probabilities)"


def _fit_score(X, y, train, test, name, params, pca, seed, class_weight, labels, class_names, views=None, n_jobs=1):
    """Fit the head on rows ``train`` (and their augmented ``views``; on class names, so it predicts names, as
    ``fit-head``'s heads do) and return it with its probabilities on rows ``test`` in ``labels`` (label index)
    order."""
    import warnings

    from tlpipe.pipeline.heads import fit_head, name_labels, views_within

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        estimator, _ = fit_head(
            X[train],
            name_labels(y[train], class_names),
            name,
            seed=seed,
            class_weight=class_weight,
            pca=pca,
            params=params,
            n_jobs=n_jobs,
            views=views_within(views, train),
        )
    return estimator, _probabilities(estimator, X[test], labels, class_names)


def _probabilities(estimator, X: np.ndarray, labels: np.ndarray, class_names) -> np.ndarray:
    """A head's probabilities (fitted on class names) on ``X`` as (N, len(labels)) in ``labels`` (label index) order."""
    index = {c: i for i, c in enumerate(class_names)}
    proba = np.zeros((len(X), len(labels)))
    proba[:, np.searchsorted(labels, [index[c] for c in estimator.classes_])] = estimator.predict_proba(X)
    return proba / proba.sum(axis=1, keepdims=True)


def _subsample(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified ``fraction`` of positions 0..len(y)-1 (at least 3 per class, all of a smaller class)."""
    rng = np.random.default_rng(seed)
    picked = []
    for label in np.unique(y):
        where = np.flatnonzero(y == label)
        take = min(len(where), max(3, int(round(fraction * len(where)))))
        picked.append(rng.choice(where, take, replace=False))
    return np.sort(np.concatenate(picked))


UMAP_COST = "about 10 s of numba compilation in each new process, whatever the data size"


def _import_umap():
    """``umap`` (umap-learn) imported without TensorFlow: umap's ``__init__`` imports its ParametricUMAP,
    which imports TensorFlow when it is installed (seconds, and unused here); a ``None`` entry in
    ``sys.modules`` makes that import fail, which umap handles, and is removed afterwards."""
    import sys

    if "umap" in sys.modules or "tensorflow" in sys.modules:
        import umap

        return umap
    sys.modules["tensorflow"] = None  # type: ignore[assignment]
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ImportWarning)
            import umap
    finally:
        if sys.modules.get("tensorflow", 0) is None:
            del sys.modules["tensorflow"]
    return umap


def _embedding_map(X: np.ndarray, seed: int, methods: tuple[str, ...] = ("pca",)) -> dict:
    """2-D coordinates of ``X`` (after standardising): PCA and, when asked, UMAP (McInnes et al. 2018; the
    optional extra ``tlpipe[umap]``; numba compiles it in each new process: :data:`UMAP_COST`).

    Raises
    ------
    ImportError
        When UMAP is asked for and umap-learn is not installed (named, with the extra to install).
    """
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    Z = StandardScaler().fit_transform(X)
    maps = {}
    if "pca" in methods:
        # two components: randomized SVD (a few passes over Z) instead of the full D x D eigendecomposition
        # (0.3-0.5 s for 1,280 dims); the top two directions agree to rounding on embeddings
        maps["pca"] = PCA(2, svd_solver="randomized", random_state=seed).fit_transform(Z)
    if "umap" in methods:
        try:
            umap = _import_umap()
        except ImportError as exc:
            raise ImportError(
                f"a UMAP map needs umap-learn, which is not installed ({exc}): "
                f"pip install 'tlpipe[umap]', or leave out --umap"
            ) from None
        maps["umap"] = umap.UMAP(n_components=2, random_state=seed, n_jobs=1).fit_transform(Z)
    return maps


def compare_heads(
    fs: FeatureSet,
    models: tuple[str, ...] | list[str] = HEADS,
    *,
    cv: int = 5,
    seed: int = 0,
    n_jobs: int | None = None,
    class_weight: dict | str | None = None,
    search: bool = False,
    holdout: bool = True,
    pca: int | float | str | None = "auto",
    learning_curve: bool = True,
    views=None,
) -> CompareResult:
    """Cross-validate heads on the training rows of a feature set, pick the best, refit it and score it
    once on the held-out rows.

    Stratified ``cv``-fold CV (shuffled with ``seed``), parallel over (head, fold) with joblib
    (``n_jobs=None``: every core); classes smaller than ``cv`` stay in every training fold (warned by
    name). With ``holdout`` only the training rows of :func:`select_split` are cross-validated; the best
    head is then refitted on all of them with the parameters CV chose and scored once on the evaluation
    rows (``result.holdout``), together with a learning curve (the same head fitted on
    :data:`LEARNING_FRACTIONS` of the training rows, scored on the same held-out rows).
    ``holdout=False`` cross-validates every labelled row (no held-out score). ``search=True`` scores each
    head's :func:`~pipeline.heads.search_space` and reports its best point (the usual, slightly optimistic,
    GridSearchCV ``best_score_``). The best head: see :func:`choose_best`. ``views``
    (:func:`tlpipe.features.cache.read_views`, ``--use-augmented``): augmented views, added to a fit's
    training rows for the images among them only (:func:`~pipeline.heads.add_views`); views of held-out
    images are never used, and every score is on original images.
    """
    from joblib import Parallel, delayed
    from sklearn.metrics import accuracy_score, classification_report, f1_score, log_loss

    started = perf_counter()
    test = np.array([], dtype=int)
    if holdout:
        rows, test, description = select_split(fs, seed=seed)
        setup = f"cross-validation on the training rows only ({description})"
    else:
        rows = np.flatnonzero(fs.y >= 0)
        setup = f"cross-validation on all {len(rows)} labelled rows (no held-out rows)" + (
            f" ({int(np.sum(fs.y < 0))} unlabelled rows excluded)" if np.any(fs.y < 0) else ""
        )
    if fs.excluded:
        setup += f"; {fs.excluded} rows left out by an exclude list"
    X, y = fs.X[rows], fs.y[rows]
    from tlpipe.pipeline.heads import views_within

    cv_views = views_within(views, rows)
    if views is not None:
        setup += (
            f"; plus {len(cv_views[0])} augmented views of the training images as extra training rows "
            f"(views of evaluation images never trained on; scores on originals only)"
        )
    fitted: dict = {}  # heads CV fits on all training rows anyway (the default logreg, to choose C)
    scores = cross_validate(
        X,
        y,
        list(models),
        cv=cv,
        seed=seed,
        search=search,
        class_weight=class_weight,
        n_jobs=n_jobs,
        pca=pca,
        class_names=fs.class_names,
        views=cv_views,
        fitted=fitted,
    )
    summary = summarize(scores)
    labels = np.unique(y)
    present = [fs.class_names[i] for i in labels]
    heads, oof, reliability = [], {}, {}
    for name in models:
        grid = [r for r in summary if r["head"] == name]
        best = grid[0]
        pred, proba = np.full_like(y, -1), np.zeros((len(y), len(labels)))
        for s in scores:
            if s.head == name and s.params == best["params"]:
                pred[s.test_idx], proba[s.test_idx] = s.pred, s.proba
        scored = pred >= 0
        oof[name] = (pred, proba, scored)
        report = classification_report(
            y[scored], pred[scored], labels=labels, target_names=present, output_dict=True, zero_division=0
        )
        calibration = reliability[name] = reliability_bins(y[scored], proba[scored], labels)
        heads.append(
            HeadResult(
                name=name,
                params=best["params"],
                folds=best["folds"],
                pca=resolve_pca(name, pca, X.shape),
                grid=grid if search else [],
                per_class={c: report[c] for c in present},
                ece=calibration["ece"],
                **{k: best[k] for k in best if k.startswith(_METRICS)},
            )
        )
    winner, choice = choose_best(heads)
    y_pred, proba, scored = oof[winner.name]
    result = CompareResult(
        feature_key=fs.key,
        backbone=dict(fs.metadata),
        cache_id=fs.cache_id,
        rows=len(rows),
        setup=setup,
        class_names=present,
        balance=class_balance(y, fs.class_names),
        cv=cv,
        seed=seed,
        search=search,
        class_weight=class_weight,
        n_jobs=n_jobs,
        heads=heads,
        best=winner.name,
        y_true=y,
        y_pred=y_pred,
        confusion=confusion_matrix(y[scored], y_pred[scored], labels=labels),
        seconds=0.0,
        choice=choice,
        chance=float(np.bincount(y).max() / len(y)),
        reliability=reliability,
    )

    if len(test):
        # The winner refitted on every training row (the head --save-best keeps) and, for the learning
        # curve, on stratified fractions of them: all scored once on the held-out rows, in parallel.
        train_pos = np.arange(len(rows))
        subsets = [train_pos] + (
            [_subsample(y, f, seed) for f in LEARNING_FRACTIONS if f * len(y) >= 3 * len(labels)]
            if learning_curve
            else []
        )
        # A winner CV already fitted on every training row (the default logreg: the very head fit-head builds,
        # C chosen by its internal CV) is not fitted again.
        X_all, y_all = fs.X, fs.y
        refit = fitted.get(winner.name)
        if refit is None and len(subsets) == 1:  # the refit alone: here, its SVM calibration folds on every core
            fits = [
                _fit_score(
                    X_all,
                    y_all,
                    rows,
                    test,
                    winner.name,
                    winner.params,
                    winner.pca,
                    seed,
                    class_weight,
                    labels,
                    list(fs.class_names),
                    views,
                    n_jobs=n_jobs,
                )
            ]
        else:
            fits = [(refit, _probabilities(refit, fs.X[test], labels, fs.class_names))] if refit is not None else []
            fits += Parallel(n_jobs=-1 if n_jobs is None else n_jobs)(
                delayed(_fit_score)(
                    X_all,
                    y_all,
                    rows[sub],
                    test,
                    winner.name,
                    winner.params,
                    winner.pca,
                    seed,
                    class_weight,
                    labels,
                    list(fs.class_names),
                    views,
                )
                for sub in subsets[len(fits) :]
            )
        estimator, held = fits[0]
        true = fs.y[test]
        pred = labels[held.argmax(axis=1)]
        known = np.isin(true, labels)
        report = classification_report(
            true, pred, labels=labels, target_names=present, output_dict=True, zero_division=0
        )
        result.holdout = {
            "head": winner.name,
            "params": winner.params,
            "pca": winner.pca,
            "rows": int(len(test)),
            "train_rows": int(len(rows)),
            "accuracy": float(accuracy_score(true, pred)),
            "macro_f1": float(f1_score(true, pred, labels=labels, average="macro", zero_division=0)),
            "log_loss": float(log_loss(true[known], held[known], labels=labels)) if known.all() else None,
            "ece": reliability_bins(true, held, labels)["ece"],
            "per_class": {c: report[c] for c in present},
            "description": description.split(";")[0],
        }
        result.learning_curve = sorted(
            (
                {"rows": int(len(sub)), "accuracy": float(accuracy_score(true, labels[p.argmax(axis=1)]))}
                for sub, (_, p) in zip(subsets, fits)
            ),
            key=lambda point: point["rows"],
        )
        result.estimator, result.train_rows, result.holdout_rows = estimator, rows, test
        where, w_true, w_pred, w_proba = test, true, pred, held
        result.misclassified_source = f"{winner.name} refitted on the training rows, on the {len(test)} held-out rows"
    else:
        where, w_true, w_pred, w_proba = rows[scored], y[scored], y_pred[scored], proba[scored]
        result.misclassified_source = f"{winner.name}'s out-of-fold predictions ({cv}-fold CV), no held-out rows"
    wrong = np.flatnonzero(w_pred != w_true)
    confidence = w_proba.max(axis=1)
    order = wrong[np.argsort(-confidence[wrong], kind="stable")]
    result.misclassified = [
        {
            "path": str(fs.paths[where[i]]),
            "sha256": str(fs.sha256[where[i]]),
            "true": fs.class_names[w_true[i]],
            "predicted": fs.class_names[w_pred[i]],
            "probability": float(confidence[i]),
            "probability_true": float(w_proba[i, np.searchsorted(labels, w_true[i])]) if w_true[i] in labels else 0.0,
        }
        for i in order
    ]
    maps = _embedding_map(fs.X[where], seed, ("pca",))  # UMAP, slower, only when a report asks for it
    result.map_rows = fs.X[where]
    mistaken = np.zeros(len(where), dtype=bool)
    mistaken[wrong] = True
    result.embedding_map = {
        "points": {k: v.tolist() for k, v in maps.items()},
        "labels": [fs.class_names[c] for c in w_true],
        "misclassified": mistaken.tolist(),
        "source": result.misclassified_source,
    }
    result.seconds = perf_counter() - started
    return result


def _pm(mean: float, std: float, digits: int = 3, scale: float = 1.0) -> str:
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _cells(h: HeadResult) -> list[str]:
    params = ", ".join(f"{k}={v}" for k, v in h.params.items()) or "defaults"
    return [
        h.name,
        _pm(h.accuracy, h.accuracy_std),
        _pm(h.macro_f1, h.macro_f1_std),
        _pm(h.log_loss, h.log_loss_std),
        _pm(h.fit_s, h.fit_s_std, 2),
        _pm(h.predict_s, h.predict_s_std, 3),
        params + (f", pca={h.pca}" if h.pca else ""),
    ]


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


def _markdown(result: CompareResult, files: dict[str, Path], gallery_note: str) -> str:
    meta = result.backbone
    tuning = (
        "best point of each head's search grid (slightly optimistic, like GridSearchCV's best_score_)"
        if result.search
        else "defaults (the same as `tlpipe fit-head`'s)"
        + (
            "; logreg's C picked once by its internal 3-fold CV on all the cross-validated rows, as fit-head "
            "picks it, then every fold scored at that C (its CV figures are slightly optimistic; the held-out "
            "score is not)"
            if any(h.name == "logreg" for h in result.heads)
            else ""
        )
    )
    heads = sorted(result.heads, key=lambda h: (-h.accuracy, -h.macro_f1))
    lines = [
        f"# Head comparison: {result.feature_key}",
        "",
        f"Best head: **{result.best}**. Why: {result.choice}.",
        "",
        "## Cross-validation on the training rows",
        "",
        f"{result.cv}-fold CV on {result.rows} rows: {result.setup}.",
        "",
        "| " + " | ".join(_COLUMNS) + " | ECE |",
        "|" + "---|" * (len(_COLUMNS) + 1),
        *("| " + " | ".join(_cells(h)) + f" | {h.ece:.3f} |" for h in heads),
        "",
        "Figures are mean ± standard deviation over the folds; times are seconds per fit / per prediction of "
        f"one fold. Chance level (always the largest class): accuracy {result.chance:.3f}. ECE: expected "
        f"calibration error of the out-of-fold probabilities ({ECE_BINS} bins).",
        "",
    ]
    if result.holdout:
        h = result.holdout
        loss = f", log-loss {h['log_loss']:.4f}" if h["log_loss"] is not None else ""
        chosen = ", ".join(f"{k}={v}" for k, v in h["params"].items()) or "defaults"
        chosen += f", pca={h['pca']}" if h["pca"] else ""
        lines += [
            "## Held-out score of the best head",
            "",
            f"{h['head']} refitted with the parameters CV chose ({chosen}) on all {h['train_rows']} training rows, "
            f"scored once on {h['rows']} held-out rows ({h['description']}): **accuracy {h['accuracy']:.4f}**, "
            f"macro-F1 {h['macro_f1']:.4f}{loss}, ECE {h['ece']:.3f}.",
            "",
        ]
    else:
        lines += [
            "## Held-out score of the best head",
            "",
            "None: every labelled row was cross-validated (`--all-rows`), so no row was held out.",
            "",
        ]
    lines += [
        "## Per-class precision, recall and F1 (out of fold)",
        "",
        "| head | class | precision | recall | F1 | support |",
        "|---|---|---|---|---|---|",
    ]
    for h in heads:
        lines += [
            f"| {h.name} | {c} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1-score']:.3f} | {int(r['support'])} |"
            for c, r in h.per_class.items()
        ]
    lines += [
        "",
        "## Misclassified images",
        "",
        f"{len(result.misclassified)} misclassified: {result.misclassified_source}; listed in "
        f"[misclassified.csv](misclassified.csv), most confident mistakes first. {gallery_note}",
        "",
        "![worst misclassified](misclassified.png)",
        "",
        "## Figures",
        "",
        "![comparison](comparison.png)",
        "",
        f"![confusion matrix of {result.best}](confusion_matrix.png)",
        "",
        "![reliability diagram](reliability.png)",
        "",
    ]
    if "learning_curve.png" in {p.name for p in files.values()}:
        lines += [
            "![learning curve](learning_curve.png)",
            "",
            "Learning curve: the best head fitted on stratified fractions of the training rows, each scored "
            "on the same held-out rows. Still rising at the right end: more photos would likely help.",
            "",
        ]
    maps = ", ".join(f"![{k} map of the embeddings](embedding_map_{k}.png)" for k in result.embedding_map["points"])
    lines += [
        maps,
        "",
        f"Embedding map ({', '.join(k.upper() for k in result.embedding_map['points'])}"
        f"{'' if 'umap' in result.embedding_map['points'] else '; a UMAP map too with --umap (tlpipe[umap])'}): "
        f"{result.embedding_map['source']}, coloured by true class, misclassified marked ×.",
        "",
        "## Setup",
        "",
        f"- Feature set: `{result.feature_key}` (backbone {meta.get('backbone', '?')}, input size "
        f"{meta.get('input_size', '?')}, model sha256 {str(meta.get('model_sha256') or '?')[:16]}), cache "
        f"`{result.cache_id}`",
        f"- Rows: {result.rows}; {result.setup}",
        f"- Stratified {result.cv}-fold CV, shuffled with seed {result.seed}; class_weight {result.class_weight}",
        f"- Hyperparameters: {tuning}",
        f"- Wall time: {result.seconds:.1f} s (n_jobs {result.n_jobs or 'all cores'})",
        "",
        "## Class balance",
        "",
        "| class | rows |",
        "|---|---|",
        *(f"| {name} | {count} |" for name, count in result.balance["counts"].items() if count),
        "",
        f"Imbalance ratio (largest / smallest class): {result.balance['imbalance_ratio']:.2f}",
        "",
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
        ax.bar(
            x,
            means,
            yerr=[getattr(h, metric + "_std") for h in heads],
            capsize=4,
            color=["tab:green" if h.name == result.best else "tab:blue" for h in heads],
        )
        ax.set_xticks(x, [h.name for h in heads], rotation=30, ha="right")
        ax.set_title(label)
        if metric != "fit_s":
            low = min(means) - 3 * max(getattr(h, metric + "_std") for h in heads) - 0.02
            if metric == "accuracy":
                low = min(low, result.chance - 0.05)
                ax.axhline(result.chance, color="tab:red", linestyle="--", linewidth=1)
                ax.text(
                    len(heads) - 0.5,
                    result.chance,
                    f"chance {result.chance:.2f}",
                    color="tab:red",
                    ha="right",
                    va="bottom",
                    fontsize=8,
                )
            ax.set_ylim(max(0.0, low), 1.0)
    fig.suptitle(f"{result.cv}-fold CV, {result.feature_key}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _reliability_chart(result: CompareResult, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4.6))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    for name, bins in result.reliability.items():
        ax.plot(
            bins["confidence"],
            bins["accuracy"],
            marker="o",
            label=f"{name} (ECE {bins['ece']:.3f})",
            linewidth=2.5 if name == result.best else 1,
        )
    ax.set(
        xlabel="predicted probability of the top class",
        ylabel="accuracy",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title="Reliability (out of fold)",
    )
    ax.legend(fontsize=8, loc="upper left")
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.11, top=0.93)  # fixed margins (tight_layout is slow)
    fig.savefig(path, dpi=100)


def _learning_chart(result: CompareResult, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.8))
    ax = fig.subplots()
    points = result.learning_curve
    ax.plot([p["rows"] for p in points], [p["accuracy"] for p in points], marker="o", color="tab:green")
    ax.axhline(result.chance, color="tab:red", linestyle="--", linewidth=1, label=f"chance {result.chance:.2f}")
    ax.set(xlabel="training rows", ylabel="held-out accuracy", title=f"Learning curve: {result.best}")
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.15, right=0.96, bottom=0.13, top=0.92)  # fixed margins (tight_layout is slow)
    fig.savefig(path, dpi=100)


def _map_chart(result: CompareResult, kind: str, path: Path) -> None:
    from matplotlib.figure import Figure

    points = np.asarray(result.embedding_map["points"][kind])
    labels = np.asarray(result.embedding_map["labels"], dtype=object)
    wrong = np.asarray(result.embedding_map["misclassified"], dtype=bool)
    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    for name in result.class_names:
        inside = labels == name
        ax.scatter(points[inside, 0], points[inside, 1], s=8, alpha=0.6, label=name)
    ax.scatter(
        points[wrong, 0],
        points[wrong, 1],
        s=40,
        marker="x",
        color="black",
        linewidths=1,
        label=f"misclassified ({int(wrong.sum())})",
    )
    ax.set(title=f"{kind.upper()} of the embeddings", xticks=[], yticks=[])
    ax.legend(fontsize=7, markerscale=1.5, loc="best")
    fig.subplots_adjust(left=0.03, right=0.97, bottom=0.03, top=0.93)  # fixed margins (tight_layout is slow)
    fig.savefig(path, dpi=100)


def _resolve_image(path: str, roots: list[str]) -> Path | None:
    candidates = [Path(path)] + [(Path(r) if Path(r).is_dir() else Path(r).parent) / path for r in roots]
    return next((c for c in candidates if c.is_file()), None)


def _gallery(result: CompareResult, roots: list[str], path: Path) -> str:
    """A thumbnail grid of the worst misclassified images (PIL, no plotting); returns a sentence on what
    could be read. Each thumbnail is the picture as the model saw it: upright, in sRGB, refused when damaged
    (:func:`tlpipe.features.images.load_thumbnail`)."""
    from PIL import Image, ImageDraw

    from tlpipe.features.images import ImageError, load_thumbnail

    worst = result.misclassified[:GALLERY]
    cell, caption, cols = 160, 30, 4
    rows = max(1, int(np.ceil(len(worst) / cols)))
    sheet = Image.new("RGB", (cols * cell, rows * (cell + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    unreadable = []
    for k, item in enumerate(worst):
        x, y = (k % cols) * cell, (k // cols) * (cell + caption)
        found = _resolve_image(item["path"], roots)
        try:
            if found is None:
                raise FileNotFoundError(item["path"])
            image = load_thumbnail(found, cell - 8)
            sheet.paste(image, (x + (cell - image.width) // 2, y + (cell - image.height) // 2))
        except (OSError, ValueError, ImageError):
            unreadable.append(item["path"])
            draw.rectangle((x + 4, y + 4, x + cell - 4, y + cell - 4), outline="grey")
            draw.text((x + 10, y + cell // 2 - 12), "image not readable", fill="black")
            draw.text((x + 10, y + cell // 2), Path(item["path"]).name[:24], fill="grey")
        draw.text((x + 4, y + cell), f"{item['true']} -> {item['predicted']}"[:30], fill="black")
        draw.text((x + 4, y + cell + 14), f"p={item['probability']:.2f}", fill="firebrick")
    if not worst:
        draw.text((10, cell // 2), "no misclassified images", fill="black")
    sheet.save(path)
    if not worst:
        return "No image was misclassified."
    if unreadable:
        return (
            f"Thumbnails of the {len(worst)} worst in misclassified.png; {len(unreadable)} of them could not be "
            f"read from their paths (shown as placeholders), e.g. {unreadable[0]}."
        )
    return f"Thumbnails of the {len(worst)} worst in misclassified.png, read from the image paths."


def write_report(
    result: CompareResult, folder: str | os.PathLike, *, image_roots: list[str] | None = None, umap: bool = False
) -> dict[str, Path]:
    """Write the report folder.

    Files: report.md, results.csv, results.json, per_class.csv, misclassified.csv, comparison.png (with
    the chance level), confusion_matrix.png, reliability.png, misclassified.png (thumbnail gallery;
    images found by their cached path, relative to one of ``image_roots``, the cache's sources),
    embedding_map_pca.png, with ``umap`` embedding_map_umap.png too (umap-learn, ``tlpipe[umap]``: it
    costs :data:`UMAP_COST`, so it is asked for, not drawn whenever installed) and, with held-out rows,
    learning_curve.png. Returns file name -> path.

    Raises
    ------
    ImportError
        ``umap=True`` without umap-learn installed (before anything is written).
    """
    folder = Path(folder)
    points = result.embedding_map.get("points", {})
    if umap and "umap" not in points and result.map_rows is not None:
        points |= {k: v.tolist() for k, v in _embedding_map(result.map_rows, result.seed, ("umap",)).items()}
    folder.mkdir(parents=True, exist_ok=True)
    names = [
        "report.md",
        "results.csv",
        "results.json",
        "per_class.csv",
        "misclassified.csv",
        "comparison.png",
        "confusion_matrix.png",
        "reliability.png",
        "misclassified.png",
        *(f"embedding_map_{k}.png" for k in result.embedding_map.get("points", {})),
    ]
    if result.learning_curve:
        names.append("learning_curve.png")
    paths = {name: folder / name for name in names}
    with open(paths["results.csv"], "w", newline="") as f:
        writer = csv.writer(f)
        stats = [m + suffix for m in _METRICS for suffix in ("", "_std")]
        writer.writerow(["head", *stats, "folds", "params", "pca", "ece", "best"])
        for h in result.heads:
            writer.writerow(
                [
                    h.name,
                    *(getattr(h, s) for s in stats),
                    h.folds,
                    json.dumps(h.params),
                    h.pca,
                    h.ece,
                    h.name == result.best,
                ]
            )
    with open(paths["per_class.csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["head", "source", "class", "precision", "recall", "f1", "support"])
        sources = [(h.name, f"{result.cv}-fold CV", h.per_class) for h in result.heads]
        if result.holdout:
            sources.append((result.best, "held-out", result.holdout["per_class"]))
        for name, source, per_class in sources:
            for c, r in per_class.items():
                writer.writerow([name, source, c, r["precision"], r["recall"], r["f1-score"], int(r["support"])])
    with open(paths["misclassified.csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "true", "predicted", "probability", "probability_true", "sha256"])
        writer.writeheader()
        writer.writerows(result.misclassified)
    paths["results.json"].write_text(json.dumps(result.to_dict(), indent=2, default=str))
    _bar_chart(result, paths["comparison.png"])
    save_confusion_matrix(
        result.confusion,
        result.class_names,
        paths["confusion_matrix.png"],
        title=f"{result.best}: out-of-fold confusion matrix",
    )
    _reliability_chart(result, paths["reliability.png"])
    note = _gallery(result, list(image_roots or []), paths["misclassified.png"])
    for kind in result.embedding_map.get("points", {}):
        _map_chart(result, kind, paths[f"embedding_map_{kind}.png"])
    if result.learning_curve:
        _learning_chart(result, paths["learning_curve.png"])
    paths["report.md"].write_text(_markdown(result, paths, note))
    return paths


def save_best(
    result: CompareResult, fs: FeatureSet, path: str | os.PathLike, *, cache_path: str | os.PathLike | None = None
) -> dict:
    """Save the head compare chose, refitted with its CV-chosen parameters on all training rows.

    This is the estimator whose held-out score the report shows (no second fit). Its sidecar records the
    evaluation rows (so ``tlpipe evaluate`` scores the same hold-out) and ``"trained_by": "compare
    --save-best"`` with the comparison's choice.

    Raises
    ------
    ValueError
        When the comparison had no held-out rows (``holdout=False``): then nothing was refitted.
    """
    from tlpipe.pipeline.artifacts import save_head

    if result.estimator is None:
        raise ValueError(
            "the comparison has no held-out rows (--all-rows), so no best head was refitted; "
            "compare without --all-rows to save one"
        )
    params = {
        "head": result.best,
        "params": result.holdout["params"],
        "pca": result.holdout["pca"],
        "search": result.search,
        "seed": result.seed,
        "class_weight": result.class_weight,
        "trained_by": "compare --save-best",
        "choice": result.choice,
        "cv": result.cv,
        "cv_accuracy": result.head(result.best).accuracy,
    }
    metrics = {k: result.holdout[k] for k in ("accuracy", "macro_f1", "log_loss")} | {
        "n": result.holdout["rows"],
        "setup": result.setup,
    }
    return save_head(
        result.estimator,
        path,
        feature_set=fs,
        metrics=metrics,
        params=params,
        cache_path=cache_path,
        train_rows=result.train_rows,
        evaluation_rows=result.holdout_rows,
        evaluation_setup=result.holdout["description"],
    )


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
    pick: int = 0  # index in rows of the pair to use (choose_pair)
    why: str = ""

    @property
    def best(self) -> SweepRow:
        """The pair to use (:func:`choose_pair`): not always the top-ranked one."""
        return self.rows[self.pick]

    def to_dict(self) -> dict:
        return {
            "cache": self.cache,
            "pattern": self.pattern,
            "images": self.images,
            "cv": self.cv,
            "seed": self.seed,
            "seconds": self.seconds,
            "best": asdict(self.best),
            "why": self.why,
            "rows": [asdict(r) for r in self.rows],
            "setups": {k: r.setup for k, r in self.results.items()},
        }


def choose_pair(rows: list[SweepRow], cv: int) -> tuple[int, str]:
    """The (feature set, head) pair to use from accuracy-ranked ``rows``, and why.

    As :func:`choose_best` does for heads: pairs within one standard error of the top mean CV accuracy
    (fold standard deviation / sqrt(``cv``)) are a difference CV cannot resolve; among them the cheapest
    extraction per image wins (a feature set whose cost was not recorded counts as the dearest), then
    the higher rank. So a tie between 224 px and 288 px + flip goes to 224 px.

    Parameters
    ----------
    rows : list of SweepRow
        Ranked by mean accuracy, best first (as :func:`sweep` ranks them); not empty.
    cv : int
        Folds the accuracies are means over.

    Returns
    -------
    (int, str)
        Index into ``rows``, and a sentence for reports.
    """
    top = rows[0]
    se = top.accuracy_std / np.sqrt(max(cv, 1))
    close = [i for i, r in enumerate(rows) if r.accuracy >= top.accuracy - se - 1e-12]

    def cost(i: int) -> float:
        ms = rows[i].extraction_ms
        return float(ms) if ms is not None else float("inf")

    pick = min(close, key=lambda i: (cost(i), i))
    if len(close) == 1:
        return pick, (
            f"the highest mean CV accuracy ({top.accuracy:.4f}); no other pair is within one standard "
            f"error of it ({se:.4f})"
        )
    within = (
        f"{len(close)} pairs are within one standard error ({se:.4f}) of the top mean CV accuracy ({top.accuracy:.4f})"
    )
    if cost(pick) == float("inf"):
        return pick, f"{within}; their extraction costs are not recorded, so the top pair"
    chosen = rows[pick]
    return pick, (
        f"{within}, a difference CV cannot resolve; among them {chosen.head} on {chosen.feature_key} "
        f"has the cheapest extraction ({cost(pick):.1f} ms per image)"
    )


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
        out.append(
            FeatureSet(
                key=fs.key,
                X=fs.X[rows],
                y=fs.y[rows],
                split=fs.split[rows],
                paths=fs.paths[rows],
                sha256=fs.sha256[rows],
                class_names=fs.class_names,
                metadata=fs.metadata,
                cache_id=fs.cache_id,
            )
        )
    return out


def sweep(
    cache: str | os.PathLike,
    pattern: str = "all",
    models: tuple[str, ...] | list[str] = HEADS,
    *,
    cv: int = 5,
    seed: int = 0,
    n_jobs: int | None = None,
    class_weight: dict | str | None = None,
    search: bool = False,
    holdout: bool = True,
    pca: int | float | str | None = "auto",
    use_augmented: bool = False,
) -> SweepResult:
    """Score every head on every feature set ``pattern`` names and rank the (feature set, head) pairs.

    Parameters
    ----------
    cache : path
        HDF5 cache made by ``tlpipe extract``.
    pattern : str
        ``all``, shell globs over feature-set keys, or keys, comma-separated (:func:`matching_feature_sets`).
    models, cv, seed, n_jobs, class_weight, search, holdout, pca
        As for :func:`compare_heads`, applied to each feature set.
    use_augmented : bool
        Train on the augmented views of each feature set that has them (``extract --augment N``) as extra
        training rows (:func:`compare_heads`' ``views``); feature sets without views train on originals.

    Returns
    -------
    SweepResult
        Pairs ranked by mean CV accuracy (ties: macro-F1, then the cheaper extraction), the pair to use
        chosen among them by :func:`choose_pair` (``best``, ``why``), each with fit and
        predict seconds per fold and the extraction cost in ms per image recorded by the extract that
        filled the feature set (None for caches written before it was recorded). Every feature set is cut
        to the images all of them hold, so all pairs see the same rows, the same hold-out and the same folds.
    """
    from tlpipe.features.cache import read_feature_set, read_views

    started = perf_counter()
    keys = matching_feature_sets(cache, pattern)
    sets = _common_rows([read_feature_set(cache, k) for k in keys])
    speeds = extraction_records(cache)
    results, rows = {}, []
    for fs in sets:
        result = compare_heads(
            fs,
            models,
            cv=cv,
            seed=seed,
            n_jobs=n_jobs,
            class_weight=class_weight,
            search=search,
            holdout=holdout,
            pca=pca,
            views=read_views(cache, fs) if use_augmented else None,
        )
        results[fs.key] = result
        speed = speeds.get(fs.key, {})
        rate = speed.get("images_per_second")
        for h in result.heads:
            rows.append(
                SweepRow(
                    feature_key=fs.key,
                    head=h.name,
                    params=h.params,
                    accuracy=h.accuracy,
                    accuracy_std=h.accuracy_std,
                    macro_f1=h.macro_f1,
                    fit_s=h.fit_s,
                    predict_s=h.predict_s,
                    extraction_ms=1000.0 / rate if rate else None,
                    feature_sets_in_pass=speed.get("feature_sets_in_pass"),
                    input_size=fs.metadata.get("input_size"),
                    tta=fs.metadata.get("tta", "none"),
                    layer=fs.metadata.get("layer"),
                )
            )
    rows.sort(key=lambda r: (-r.accuracy, -r.macro_f1, r.extraction_ms if r.extraction_ms is not None else np.inf))
    pick, why = choose_pair(rows, cv)
    return SweepResult(
        cache=str(cache),
        pattern=pattern,
        rows=rows,
        results=results,
        images=len(sets[0]),
        cv=cv,
        seed=seed,
        seconds=perf_counter() - started,
        pick=pick,
        why=why,
    )


_SWEEP_COLUMNS = ["rank", "feature set", "head", "accuracy", "macro-F1", "fit s", "predict s", "extract ms/img"]


def _sweep_cells(rank: int, r: SweepRow) -> list[str]:
    cost = (
        "?"
        if r.extraction_ms is None
        else f"{r.extraction_ms:.1f}"
        + (f" (pass of {r.feature_sets_in_pass})" if (r.feature_sets_in_pass or 1) > 1 else "")
    )
    return [
        str(rank),
        r.feature_key,
        r.head,
        _pm(r.accuracy, r.accuracy_std),
        f"{r.macro_f1:.3f}",
        f"{r.fit_s:.2f}",
        f"{r.predict_s:.3f}",
        cost,
    ]


def format_sweep_table(result: SweepResult):
    """A rich table of the ranked pairs (best marked), for the CLI."""
    from rich.table import Table

    table = Table(
        title=f"{result.cv}-fold CV of every head on {len(result.results)} feature sets ({result.images} images each)"
    )
    for i, column in enumerate(_SWEEP_COLUMNS):
        table.add_column(column, justify="left" if i in (1, 2) else "right")
    for rank, r in enumerate(result.rows, 1):
        cells = _sweep_cells(rank, r)
        if rank == result.pick + 1:
            cells[2] = f"[bold green]{r.head} *[/]"
        table.add_row(*cells)
    return table


def write_sweep_report(result: SweepResult, folder: str | os.PathLike) -> dict[str, Path]:
    """Write sweep.md, sweep.csv and sweep.json into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / name for name in ("sweep.md", "sweep.csv", "sweep.json")}
    best = result.best
    lines = [
        f"# Sweep: every head on every feature set of `{result.cache}`",
        "",
        f"Best pair: **{best.head}** on `{best.feature_key}` (rank {result.pick + 1}). Why: {result.why}.",
        "",
        "| " + " | ".join(_SWEEP_COLUMNS) + " |",
        "|" + "---|" * len(_SWEEP_COLUMNS),
        *("| " + " | ".join(_sweep_cells(i, r)) + " |" for i, r in enumerate(result.rows, 1)),
        "",
        f"{result.cv}-fold stratified CV (seed {result.seed}) on the same {result.images} images for every "
        f"feature set; accuracy is mean ± standard deviation over folds; fit / predict seconds per fold; "
        f"extraction ms per image of the extract pass that filled the feature set (a pass that filled "
        f"several feature sets at once shares its cost among them).",
        "",
        f"Rows: {next(iter(result.results.values())).setup}.",
        "",
    ]
    paths["sweep.md"].write_text("\n".join(lines))
    with open(paths["sweep.csv"], "w", newline="") as f:
        writer = csv.writer(f)
        fields = list(asdict(best))
        writer.writerow(["rank", *fields])
        for i, r in enumerate(result.rows, 1):
            writer.writerow([i, *(json.dumps(v) if isinstance(v, dict) else v for v in asdict(r).values())])
    paths["sweep.json"].write_text(json.dumps(result.to_dict(), indent=2, default=str))
    return paths
