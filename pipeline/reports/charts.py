"""Charts shared by the reports (rendering only)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["save_confusion_matrix"]


def save_confusion_matrix(
    confusion: np.ndarray, labels: list[str], path: str | os.PathLike, *, title: str = "Confusion matrix"
) -> Path:
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
                ax.text(
                    j,
                    i,
                    str(confusion[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if rates[i, j] > 0.5 else "black",
                )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
