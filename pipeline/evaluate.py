"""Scoring a fitted head on a split of a feature set."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score, log_loss

from tlpipe.features.cache import FeatureSet
from tlpipe.pipeline.artifacts import check_compatible


@dataclass
class EvalResult:
    split: str
    n: int
    accuracy: float
    macro_f1: float
    log_loss: float | None  # None when the split holds a class the head never saw
    report: dict  # classification_report(output_dict=True): per-class precision/recall/f1-score/support
    confusion: np.ndarray  # rows: true class, columns: predicted class, in the order of ``labels``
    labels: list[str]

    def to_dict(self) -> dict:
        return {"split": self.split, "n": self.n, "accuracy": self.accuracy, "macro_f1": self.macro_f1,
                "log_loss": self.log_loss, "per_class": self.report, "confusion": self.confusion.tolist(),
                "labels": self.labels}


def split_rows(fs: FeatureSet, split: str) -> np.ndarray:
    """Labelled rows of ``split`` (``"all"``: every labelled row); ValueError naming the splits there are."""
    labelled = fs.y >= 0
    rows = np.flatnonzero(labelled if split == "all" else labelled & (fs.split == split))
    if not len(rows):
        names, counts = np.unique(fs.split[labelled], return_counts=True)
        there = ", ".join(f"{n or '(none)'} {c}" for n, c in zip(names, counts)) or "no labelled rows at all"
        raise ValueError(f"feature set {fs.key}: split {split!r} has no labelled rows (labelled rows per split: "
                         f"{there}); choose another split or 'all'")
    return rows


def evaluate_head(estimator, metadata: dict, fs: FeatureSet, split: str = "test") -> EvalResult:
    """Accuracy, macro-F1, log-loss, per-class report and confusion matrix of a head on one split.

    Labels are matched by class name, so a cache whose classes were numbered differently still scores
    correctly. ``metadata`` is the head's sidecar (``{}`` for a trusted head without one: the feature
    set's class names are then assumed).
    """
    if metadata:
        check_compatible(metadata, fs)
    rows = split_rows(fs, split)
    head_names = metadata.get("class_names", fs.class_names)
    head_labels = [head_names[int(c)] for c in estimator.classes_]
    proba = estimator.predict_proba(fs.X[rows])
    true = np.array([fs.class_names[i] for i in fs.y[rows]], dtype=object)
    pred = np.array(head_labels, dtype=object)[proba.argmax(axis=1)]
    labels = head_labels + sorted(set(true) - set(head_labels))
    index = {name: i for i, name in enumerate(head_labels)}
    loss = None
    if set(true) <= set(head_labels):
        loss = float(log_loss([index[t] for t in true], proba, labels=list(range(len(head_labels)))))
    return EvalResult(
        split=split, n=len(rows), accuracy=float(accuracy_score(true, pred)),
        macro_f1=float(f1_score(true, pred, labels=labels, average="macro", zero_division=0)), log_loss=loss,
        report=classification_report(true, pred, labels=labels, output_dict=True, zero_division=0),
        confusion=confusion_matrix(true, pred, labels=labels), labels=labels)


def save_confusion_matrix(confusion: np.ndarray, labels: list[str], path: str | os.PathLike, *,
                          title: str = "Confusion matrix") -> Path:
    """A PNG of the confusion matrix (counts, shaded by row-normalised recall)."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state: safe in threads and without a display

    confusion = np.asarray(confusion)
    k = len(labels)
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.45 * k, 24)
    fig = Figure(figsize=(size, size * 0.85))
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(labels, rotation=45, ha="right")
    ax.set_yticklabels(labels)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
