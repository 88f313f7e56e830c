"""Comparing heads on one feature set with stratified K-fold cross-validation, and the report of it."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from time import perf_counter

import numpy as np
from sklearn.metrics import confusion_matrix

from tlpipe.errors import InputError
from tlpipe.features.cache import FeatureSet
from tlpipe.features.spec import RunOptions
from tlpipe.pipeline.heads.estimators import (
    HEADS,
    class_balance,
    cross_validate,
    finite_only,
    kept_dimensions,
    pca_components,
    resolve_pca,
    select_split,
    summarize,
)
from tlpipe.pipeline.heads.spec import HeadSpec

__all__ = [
    "CompareResult",
    "ECE_BINS",
    "GALLERY",
    "HeadResult",
    "LEARNING_FRACTIONS",
    "METRICS",
    "SweepResult",
    "SweepRow",
    "UMAP_COST",
    "choose_best",
    "choose_pair",
    "compare",
    "compare_heads",
    "extraction_records",
    "is_sweep",
    "matching_feature_sets",
    "reliability_bins",
    "save_best_head",
    "sweep",
]

METRICS = ("accuracy", "macro_f1", "log_loss", "fit_s", "predict_s")


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
    # the embedding's dimensions and those PCA kept, fitted on all cross-validated rows (all without PCA)
    dimensions: dict = field(default_factory=dict)
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
    # the confusion matrix of those same predictions (class_names order), so a report can link its cells to the
    # misclassified images behind them
    misclassified_confusion: list = field(default_factory=list)
    reliability: dict = field(default_factory=dict)  # head -> {"confidence", "accuracy", "count"} per bin
    embedding_map: dict = field(default_factory=dict)  # "pca" (and "umap"): 2-D points, labels, misclassified
    report_files: dict = field(default_factory=dict)  # file name -> path of the report, when one was written
    estimator: object = None  # the refitted best head (None without held-out rows)
    train_rows: np.ndarray | None = None  # feature-set rows the best head was refitted on
    holdout_rows: np.ndarray | None = None  # feature-set rows it was scored on

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
    out: dict[str, list] = {"confidence": [], "accuracy": [], "count": []}
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

    from tlpipe.pipeline.heads.estimators import fit_head, name_labels, views_within

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
    umap: bool = False,
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
    (rows, test), left_out = finite_only(fs.X, rows, test)  # rows with NaN / inf: no head can train on them
    if left_out:
        setup += f"; {left_out}"
    if fs.excluded:
        setup += f"; {fs.excluded} rows left out by an exclude list"
    if fs.excluded_missing:
        from tlpipe.features.cache import missing_note

        setup += f"; {missing_note(fs.excluded_missing)}"
    X, y = fs.X[rows], fs.y[rows]
    from tlpipe.pipeline.heads.estimators import views_within

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
                dimensions={
                    "input": int(X.shape[1]),
                    "kept": kept_dimensions(name, resolve_pca(name, pca, X.shape), X, seed) or int(X.shape[1]),
                },
                grid=grid if search else [],
                per_class={c: report[c] for c in present},
                ece=calibration["ece"],
                **{k: best[k] for k in best if k.startswith(METRICS)},
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
            "dimensions": {"input": int(fs.X.shape[1]), "kept": pca_components(estimator) or int(fs.X.shape[1])},
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
    result.misclassified_confusion = confusion_matrix(w_true, w_pred, labels=labels).tolist()
    confidence = w_proba.max(axis=1)
    order = wrong[np.argsort(-confidence[wrong], kind="stable")]
    result.misclassified = [
        {
            "path": str(fs.paths[where[i]]),
            "sha256": str(fs.sha256[where[i]]),
            "source": fs.source_root_of(where[i]),
            "true": fs.class_names[w_true[i]],
            "predicted": fs.class_names[w_pred[i]],
            "probability": float(confidence[i]),
            "probability_true": float(w_proba[i, np.searchsorted(labels, w_true[i])]) if w_true[i] in labels else 0.0,
        }
        for i in order
    ]
    maps = _embedding_map(fs.X[where], seed, ("pca", "umap") if umap else ("pca",))  # UMAP is slower: asked for
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


def save_best_head(
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
    from tlpipe.pipeline.heads.persistence import save_head

    if result.estimator is None or result.holdout is None:
        raise InputError(
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
    keep_missing: bool = False,
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
    keep_missing : bool
        Keep the rows whose source file is gone or changed since extract
        (:func:`tlpipe.features.cache.read_feature_set`); left out by default.

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
    sets = _common_rows([read_feature_set(cache, k, keep_missing=keep_missing) for k in keys])
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


def compare(
    cache: str | os.PathLike,
    models: tuple[str, ...] | list[str] = HEADS,
    *,
    features: str | None = None,
    cv: int = 5,
    head: HeadSpec | None = None,
    holdout: bool = True,
    report: str | os.PathLike | None = None,
    save_best: str | os.PathLike | None = None,
    exclude: str | os.PathLike | None = None,
    keep_missing: bool = False,
    run: RunOptions | None = None,
    umap: bool = False,
) -> CompareResult:
    """``tlpipe compare``: cross-validate heads on one feature set of a cache, refit the best, score it once on
    the held-out rows; optionally write the report and save the best head.

    Parameters
    ----------
    cache : path
        HDF5 cache made by :func:`tlpipe.extract`.
    models : sequence of str
        Head types to compare (:data:`~tlpipe.pipeline.heads.estimators.HEADS`).
    features : str, optional
        Feature-set key (needed when the cache holds several).
    cv : int
        Stratified folds (>= 2).
    head : HeadSpec, optional
        The settings every compared head shares (``pca``, ``class_weight``, ``search``, ``seed``,
        ``use_augmented``); its ``model`` is ignored (``models`` names the heads).
    holdout : bool
        Cross-validate the training rows and score the refitted best once on the held-out rows (default);
        False cross-validates every labelled row and refits nothing.
    report : path, optional
        Folder for the report (:func:`tlpipe.pipeline.reports.compare.write_report`); its gallery finds each
        image from the cache's recorded sources.
    save_best : path, optional
        Save the refitted best head here (+ JSON sidecar). Needs ``holdout``.
    exclude : path, optional
        A list of paths / sha256 to leave out (``tlpipe audit --write-exclude``).
    keep_missing : bool
        Keep the rows whose source file the last extract found gone or changed (left out by default, counted).
    run : RunOptions, optional
        Parallel jobs and engine.
    umap : bool
        Also compute a UMAP map of the embeddings for the report (``tlpipe[umap]``).

    Returns
    -------
    CompareResult
        ``report_files`` names the report's files when one was written.

    Raises
    ------
    tlpipe.errors.InputError
        Bad settings (``save_best`` without ``holdout``, ``cv`` < 2, ``umap`` without ``report``...).
    tlpipe.features.cache.CacheError
        The cache or feature set cannot be read as asked.
    """
    from tlpipe.features.cache import CacheError, read_feature_set, read_views
    from tlpipe.pipeline.heads.engine import parallel_backend

    head = (head or HeadSpec()).check()
    run = (run or RunOptions()).check()
    names = list(models)
    for name in names:
        head.with_(model=name).check()
    if cv < 2:
        raise InputError(f"cv must be at least 2, not {cv}")
    if save_best is not None and not holdout:
        raise InputError("--save-best needs held-out rows to score the refitted head: drop --all-rows")
    if umap and report is None:
        raise InputError("--umap draws a map in the report: give --report DIR too")
    if umap:
        try:
            _import_umap()
        except ImportError:
            raise InputError("--umap needs umap-learn, which is not installed: pip install 'tlpipe[umap]'") from None
    fs = read_feature_set(cache, features, exclude=exclude, keep_missing=keep_missing)
    views = None
    if head.use_augmented:
        views = read_views(cache, fs)
        if views is None:
            raise CacheError(
                f"{cache}: feature set {fs.key} has no augmented views; run tlpipe extract --augment N first"
            )
    with parallel_backend(run.engine, run.address):
        result = compare_heads(
            fs,
            names,
            cv=cv,
            seed=head.seed,
            search=head.search,
            class_weight=head.class_weight,
            holdout=holdout,
            n_jobs=run.n_jobs,
            pca=head.pca,
            learning_curve=report is not None,
            views=views,
            umap=umap,
        )
    if report is not None:
        from tlpipe.pipeline.reports.compare import write_report  # rendering, only when a report is asked for

        result.report_files = write_report(result, report, umap=umap)
    if save_best is not None:
        save_best_head(result, fs, save_best, cache_path=Path(cache).resolve())
    return result
