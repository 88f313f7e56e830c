"""Scoring a fitted head on a split of a feature set."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score, log_loss

from tlpipe.errors import InputError, TlpipeError
from tlpipe.features.cache import FeatureSet
from tlpipe.pipeline.heads.persistence import check_compatible, head_labels

__all__ = ["EvalResult", "LeakError", "evaluate", "evaluate_head", "evaluation_rows", "split_rows"]


@dataclass
class EvalResult:
    split: str  # the split scored, or "holdout" for the head's recorded evaluation rows
    n: int
    accuracy: float
    macro_f1: float
    log_loss: float | None  # None when the split holds a class the head never saw
    report: dict  # classification_report(output_dict=True): per-class precision/recall/f1-score/support
    confusion: np.ndarray  # rows: true class, columns: predicted class, in the order of ``labels``
    labels: list[str]
    rows_used: str = ""  # which rows were scored and why, in words (every report states it)
    train_rows_included: int = 0  # rows the head was trained on among them (only with allow_train_rows)
    excluded: int = 0  # rows left out by an exclude list
    excluded_missing: int = 0  # rows left out because their source file is gone or changed
    report_files: dict = field(default_factory=dict)  # file name -> path, when a report was written
    # path, sha256, source, true, predicted, probability of each wrong prediction, most confident first
    misclassified: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "split": self.split,
            "rows_used": self.rows_used,
            "train_rows_included": self.train_rows_included,
            "n": self.n,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "log_loss": self.log_loss,
            "per_class": self.report,
            "confusion": self.confusion.tolist(),
            "labels": self.labels,
        }


def split_rows(fs: FeatureSet, split: str) -> np.ndarray:
    """Labelled rows of ``split`` (``"all"``: every labelled row); ValueError naming the splits there are."""
    labelled = fs.y >= 0
    rows = np.flatnonzero(labelled if split == "all" else labelled & (fs.split == split))
    if not len(rows):
        names, counts = np.unique(fs.split[labelled], return_counts=True)
        there = ", ".join(f"{n or '(none)'} {c}" for n, c in zip(names, counts)) or "no labelled rows at all"
        raise InputError(
            f"feature set {fs.key}: split {split!r} has no labelled rows (labelled rows per split: "
            f"{there}); choose another split or 'all'"
        )
    return rows


class LeakError(TlpipeError, ValueError):
    """Evaluation rows include rows the head was trained on."""


def _sha_rows(fs: FeatureSet, hashes) -> np.ndarray:
    wanted = set(hashes)
    return np.flatnonzero(np.fromiter((h in wanted for h in fs.sha256), bool, len(fs.sha256)) & (fs.y >= 0))


def evaluation_rows(
    metadata: dict, fs: FeatureSet, split: str | None = None, *, allow_train_rows: bool = False
) -> tuple[np.ndarray, str, str, int]:
    """The rows of ``fs`` to score a head on, and why.

    ``split=None``: the cache's labelled ``test`` rows when it has them, else the head's recorded
    evaluation rows (its sidecar's ``evaluation.sha256``, written by ``fit-head`` / ``compare
    --save-best``). Any split name (or ``"all"``) picks those rows; names are mapped as ``extract`` maps split
    folders (:func:`tlpipe.features.names.normalize_split`: ``validation`` is ``val``). Rows whose image sha256
    the head was trained on (sidecar ``training.sha256``) are refused unless ``allow_train_rows``.

    Returns
    -------
    rows : (n,) int row indices; split : the split name used (``"holdout"`` for recorded rows);
    rows_used : a sentence for reports; train_rows : how many of the rows the head was trained on.

    Raises
    ------
    LeakError
        When rows the head was trained on would be scored and ``allow_train_rows`` is False.
    ValueError
        When no rows qualify.
    """
    recorded = (metadata.get("evaluation") or {}).get("sha256")
    if split not in (None, "all", "holdout"):
        from tlpipe.features.names import normalize_split

        split = normalize_split(split)
    if split is None:
        has_test = bool(np.any((fs.y >= 0) & (fs.split == "test")))
        split = "test" if has_test or not recorded else "holdout"
    if split == "holdout":
        if not recorded:
            raise InputError(
                "the head's sidecar records no evaluation rows (a head saved before tlpipe recorded "
                "them, or without a hold-out); choose a split with --split"
            )
        rows = _sha_rows(fs, recorded)
        if not len(rows):
            raise InputError(f"none of the head's {len(recorded)} recorded evaluation rows is in feature set {fs.key}")
        missing = len(set(recorded)) - len(set(fs.sha256[rows].tolist()))
        rows_used = (
            f"the head's recorded hold-out: {len(rows)} rows ({metadata['evaluation'].get('setup') or 'fit-head'})"
            + (f"; {missing} recorded rows are not in this cache" if missing else "")
        )
    else:
        rows = split_rows(fs, split)
        rows_used = (
            f"{len(rows)} labelled rows of split {split!r}" if split != "all" else f"all {len(rows)} labelled rows"
        )
    trained = (metadata.get("training") or {}).get("sha256")
    overlap = 0
    if trained:
        overlap = int(len(_sha_rows(_take(fs, rows), trained)))
    if overlap and not allow_train_rows:
        raise LeakError(
            f"{overlap} of the {len(rows)} rows of {rows_used.split(':')[0] if split == 'holdout' else repr(split)} "
            f"were used to train this head: its score on them would be optimistic (a leak); evaluate on "
            f"held-out rows, or pass --allow-train-rows (allow_train_rows=True) to score them anyway"
        )
    if overlap:
        rows_used += f", {overlap} of which the head was trained on (allowed: the score is optimistic)"
    elif not trained and metadata:
        rows_used += " (the sidecar records no training rows: a leak cannot be ruled out)"
    return rows, split, rows_used, overlap


def _take(fs: FeatureSet, rows: np.ndarray) -> FeatureSet:
    import dataclasses

    return dataclasses.replace(
        fs, X=fs.X[rows], y=fs.y[rows], split=fs.split[rows], paths=fs.paths[rows], sha256=fs.sha256[rows]
    )


def evaluate_head(
    estimator, metadata: dict, fs: FeatureSet, split: str | None = None, *, allow_train_rows: bool = False
) -> EvalResult:
    """Accuracy, macro-F1, log-loss, per-class report and confusion matrix of a head on one split.

    Labels are matched by class name, so a cache whose classes were numbered differently still scores
    correctly. ``metadata`` is the head's sidecar (``{}`` for a trusted head without one: the feature
    set's class names are then assumed). Which rows: :func:`evaluation_rows` (``split=None``: the test
    split, else the head's recorded hold-out); rows the head was trained on are refused unless
    ``allow_train_rows``. Rows whose embedding holds a NaN or an infinity are left out, counted in ``rows_used``.
    The result's ``rows_used`` says which rows were scored.
    """
    if metadata:
        check_compatible(metadata, fs)
    rows, split, rows_used, overlap = evaluation_rows(metadata, fs, split, allow_train_rows=allow_train_rows)
    from tlpipe.pipeline.heads.estimators import finite_only

    (rows,), left_out = finite_only(fs.X, rows)  # a NaN / inf embedding has no prediction: left out, counted
    if left_out:
        rows_used += f"; {left_out}"
        if not len(rows):
            raise InputError(f"feature set {fs.key}: no row to evaluate has a finite embedding ({left_out})")
    labels_of_head = head_labels(estimator, metadata, list(fs.class_names))  # names; older heads: mapped indices
    proba = estimator.predict_proba(fs.X[rows])
    true = np.array([fs.class_names[i] for i in fs.y[rows]], dtype=object)
    pred = np.array(labels_of_head, dtype=object)[proba.argmax(axis=1)]
    labels = labels_of_head + sorted(set(true) - set(labels_of_head))
    index = {name: i for i, name in enumerate(labels_of_head)}
    loss = None
    if set(true) <= set(labels_of_head):
        loss = float(log_loss([index[t] for t in true], proba, labels=list(range(len(labels_of_head)))))
    confidence = proba.max(axis=1)
    wrong = np.flatnonzero(pred != true)
    misclassified = [
        {
            "path": str(fs.paths[rows[i]]),
            "sha256": str(fs.sha256[rows[i]]),
            "source": fs.source_root_of(rows[i]),
            "true": str(true[i]),
            "predicted": str(pred[i]),
            "probability": float(confidence[i]),
        }
        for i in wrong[np.argsort(-confidence[wrong], kind="stable")]
    ]
    return EvalResult(
        misclassified=misclassified,
        split=split,
        n=len(rows),
        accuracy=float(accuracy_score(true, pred)),
        macro_f1=float(f1_score(true, pred, labels=labels, average="macro", zero_division=0)),
        log_loss=loss,
        report=classification_report(true, pred, labels=labels, output_dict=True, zero_division=0),
        confusion=confusion_matrix(true, pred, labels=labels),
        labels=labels,
        rows_used=rows_used,
        train_rows_included=overlap,
    )


def evaluate(
    head: str | os.PathLike,
    cache: str | os.PathLike,
    *,
    split: str | None = None,
    features: str | None = None,
    report: str | os.PathLike | None = None,
    allow_train_rows: bool = False,
    exclude: str | os.PathLike | None = None,
    keep_missing: bool = False,
    trust: bool = False,
) -> EvalResult:
    """``tlpipe evaluate``: a saved head scored on held-out rows of a cache, with the leak check.

    Parameters
    ----------
    head : path
        A head saved by :func:`tlpipe.fit_head` (or ``compare --save-best``); its sidecar is checked first.
    cache : path
        The HDF5 cache holding the head's feature set.
    split : str, optional
        ``train`` | ``val`` | ``test`` | ``all`` | ``holdout``; default: ``test``, else the head's recorded hold-out.
    features : str, optional
        Feature-set key; default: the one the head was fitted on.
    report : path, optional
        Folder for ``evaluation.json`` and ``confusion_matrix.png``.
    allow_train_rows : bool
        Score rows the head was trained on too (an optimistic score); refused otherwise (:class:`LeakError`).
    exclude : path, optional
        A list of paths / sha256 to leave out.
    keep_missing : bool
        Keep the rows whose source file the last extract found gone or changed (left out by default, counted).
    trust : bool
        Load a head whose checksum or metadata cannot be verified (unpickling runs its code).

    Returns
    -------
    EvalResult
        ``report_files`` names the report's files when one was written.

    Raises
    ------
    LeakError, tlpipe.pipeline.heads.persistence.HeadError, tlpipe.features.cache.CacheError
    """
    import json

    from tlpipe.features.cache import read_feature_set
    from tlpipe.pipeline.heads.persistence import load_head

    estimator, metadata = load_head(head, trust=trust)
    key = features or (metadata.get("feature_set") or {}).get("key")
    fs = read_feature_set(cache, key, exclude=exclude, keep_missing=keep_missing)
    result = evaluate_head(estimator, metadata, fs, split=split, allow_train_rows=allow_train_rows)
    result.excluded, result.excluded_missing = fs.excluded, fs.excluded_missing
    if report is not None:
        from tlpipe.pipeline.reports.charts import save_confusion_matrix  # rendering, only when asked for

        folder = Path(report)
        folder.mkdir(parents=True, exist_ok=True)
        files = {"evaluation.json": folder / "evaluation.json", "confusion_matrix.png": folder / "confusion_matrix.png"}
        files["evaluation.json"].write_text(json.dumps(result.to_dict() | {"excluded": fs.excluded}, indent=2))
        save_confusion_matrix(
            result.confusion, result.labels, files["confusion_matrix.png"], title=f"{Path(head).name} on {result.split}"
        )
        from tlpipe.pipeline.reports.evaluate import write_html

        files["index.html"] = write_html(result, folder, head=Path(head).name)
        result.report_files = files
    return result
