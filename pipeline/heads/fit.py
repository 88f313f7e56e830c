"""`tlpipe fit-head` as a library function: cache -> split -> fit -> held-out metrics -> saved head."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlpipe.errors import InputError
from tlpipe.features.cache import CacheError, FeatureSet, missing_note, read_feature_set, read_views, writing
from tlpipe.pipeline.heads.estimators import check_pca, class_balance, finite_only, fit_head, name_labels, select_split
from tlpipe.pipeline.heads.evaluate import EvalResult, evaluate_head
from tlpipe.pipeline.heads.persistence import HeadError, save_head

__all__ = ["IMBALANCE_WARNING", "TrainResult", "subset", "train_head"]

IMBALANCE_WARNING = 3.0  # largest / smallest class above this: suggest --class-weight balanced


@dataclass
class TrainResult:
    path: Path
    metadata: dict
    evaluation: EvalResult | None
    setup: str
    balance: dict
    info: dict

    @property
    def imbalanced(self) -> bool:
        ratio = self.balance.get("imbalance_ratio")
        return bool(ratio and ratio > IMBALANCE_WARNING)


def subset(fs: FeatureSet, rows: np.ndarray, split: str) -> FeatureSet:
    """The rows ``rows`` of a feature set, all marked as split ``split``."""
    return dataclasses.replace(
        fs, X=fs.X[rows], y=fs.y[rows], split=np.full(len(rows), split), paths=fs.paths[rows], sha256=fs.sha256[rows]
    )


def train_head(
    cache: str | os.PathLike,
    model: str = "logreg",
    out: str | os.PathLike = "head.joblib",
    *,
    features: str | None = None,
    search: bool = False,
    cv: int = 5,
    seed: int = 0,
    class_weight: str | None = None,
    pca: int | float | str | None = "auto",
    n_jobs: int | None = None,
    exclude: str | os.PathLike | None = None,
    use_augmented: bool = False,
    keep_missing: bool = False,
) -> TrainResult:
    """Fit head ``model`` on the training rows of the cache's feature set, score it on the evaluation rows
    (the cache's test/val split, else a stratified hold-out) and save it with its metadata.

    With too few labelled rows for a hold-out with a row of every class (:func:`~tlpipe.pipeline.heads.estimators.select_split`),
    nothing is held out: the head is fitted on every labelled row, ``evaluation`` is None, and the saved metrics
    carry no accuracy (only ``--search``'s cross-validation figures, when asked for): never figures measured on
    training rows. ``setup`` says so, and gives the mlp's own early-stopping hold-out.

    The defaults (``pca="auto"``...) are :func:`~tlpipe.pipeline.heads.estimators.fit_head`'s, the ones ``compare``
    scores. The sidecar records the sha256 of every training and evaluation row, so ``tlpipe evaluate``
    later scores the same hold-out and refuses training rows. ``exclude``: an exclude list
    (``tlpipe audit --write-exclude``) whose rows are left out of both. ``use_augmented``: also train on the
    augmented views (``extract --augment N``) of the training images, never of the evaluation images.
    ``keep_missing``: keep the rows whose source file is gone or changed since extract (left out by default, the
    count in ``setup``; :func:`tlpipe.features.cache.read_feature_set`). Rows whose
    embedding holds a NaN or an infinity are left out of both, counted in ``setup``. ``pca``: see
    :func:`~tlpipe.pipeline.heads.estimators.check_pca`; ``info["dimensions"]`` states the dimensions kept.

    ``out`` is held by one run at a time, whatever name reaches it (a second run is refused with
    :class:`~tlpipe.pipeline.heads.persistence.HeadError`: ``<out> is being written by pid N; wait for it to finish``).
    """
    check_pca(pca)  # before anything is read or fitted
    with writing(out, HeadError):  # one writer of the head, whatever name reaches it, for the whole run
        return _train_head(
            cache,
            model,
            out,
            features,
            search,
            cv,
            seed,
            class_weight,
            pca,
            n_jobs,
            exclude,
            use_augmented,
            keep_missing,
        )


def _train_head(
    cache, model, out, features, search, cv, seed, class_weight, pca, n_jobs, exclude, use_augmented, keep_missing
):
    fs = read_feature_set(cache, features, exclude=exclude, keep_missing=keep_missing)
    train, test, setup = select_split(fs, seed=seed)
    (train, test), left_out = finite_only(fs.X, train, test)  # rows with NaN / inf: no head can train on them
    if left_out:
        setup += f"; {left_out}"
    if fs.excluded:
        setup += f"; {fs.excluded} rows left out by the exclude list {exclude}"
    if fs.excluded_missing:
        setup += f"; {missing_note(fs.excluded_missing)}"
    if len(np.unique(fs.y[train])) < 2:
        raise InputError(f"{cache}: a head needs labelled training images of at least two classes")
    views = None
    if use_augmented:
        from tlpipe.pipeline.heads.estimators import views_within

        found = read_views(cache, fs)
        if found is None:
            raise CacheError(
                f"{cache}: feature set {fs.key} has no augmented views; run tlpipe extract --augment N "
                f"with the same options first"
            )
        views = views_within(found, train)
        setup += f"; plus {len(views[0])} augmented views of the training images as extra training rows"
    # Fitted on class names: the saved head's predict() returns them (its sidecar still records the indices).
    estimator, info = fit_head(
        fs.X[train],
        name_labels(fs.y[train], fs.class_names),
        model,
        search=search,
        cv=cv,
        seed=seed,
        class_weight=class_weight,
        n_jobs=n_jobs,
        pca=pca,
        class_names=fs.class_names,
        views=views,
    )
    if "early_stopping" in info:  # the mlp's own hold-out, inside the training rows
        setup += f"; {info['early_stopping']['note']}"
    if not len(test) and search:
        setup += f"; the figures are --search's {cv}-fold cross-validation on the training rows"
    evaluation = evaluate_head(estimator, {}, subset(fs, test, "evaluation"), split="evaluation") if len(test) else None
    if evaluation is not None:
        evaluation.rows_used = f"{len(test)} held-out rows: {setup.split(';')[0]}"
    metrics = {"setup": setup}
    if evaluation is not None:
        metrics |= {k: v for k, v in evaluation.to_dict().items() if k in ("n", "accuracy", "macro_f1", "log_loss")}
    if search:
        metrics |= {k: info[k] for k in ("cv", "cv_accuracy", "cv_accuracy_std", "cv_macro_f1")}
    params = {k: v for k, v in info.items() if k != "cv_results"}
    metadata = save_head(
        estimator,
        out,
        feature_set=fs,
        metrics=metrics,
        params=params,
        cache_path=Path(cache).resolve(),
        train_rows=train,
        evaluation_rows=test,
        evaluation_setup=setup.split(";")[0],
    )
    return TrainResult(Path(out), metadata, evaluation, setup, class_balance(fs.y[train], fs.class_names), info)
