"""Reports built from real computed results whose class and file names need escaping, over real image files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

# names a page must escape or re-encode: quotes, <, &, non-ASCII
NASTY_CLASSES = ['say "cheese"', "<b>bold</b> & co", "café ünïcode", "it's"]


def nasty_file_name(k: int) -> str:
    """A file name with quotes, <, &, non-ASCII and (where the file system takes it) a non-UTF-8 byte,
    as Python reads it from disk (``surrogateescape``)."""
    stems = ['q"uote', "<lt>&amp", "naïve-日本", "bad\udcff-byte"]
    return f"{stems[k % 4]}-{k}.png"


def write_images(root: Path, items: list[dict]) -> None:
    """Give each misclassified item a real image file under ``root`` (its colour from its index)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for k, item in enumerate(items):
        name = nasty_file_name(k)
        data = os.fsencode(name)  # the surrogate becomes the raw byte 0xff
        target = os.path.join(os.fsencode(root), data)
        rng = np.random.default_rng(k)
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(target, format="PNG")
        item["path"], item["source"] = name, str(root)
        item["sha256"] = hashlib.sha256(Path(os.fsdecode(target)).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def compare_report(tmp_path_factory):
    """(CompareResult, report folder): compare_heads on a real cache with nasty class names; every
    misclassified row given a real image file with a nasty name, one of them made unreadable."""
    from tlpipe.features.cache import read_feature_set
    from tlpipe.pipeline.heads.selection import compare_heads
    from tlpipe.pipeline.reports.compare import write_report

    from ..conftest import embeddings, write_cache

    tmp = tmp_path_factory.mktemp("html")
    X, y = embeddings((30, 30, 30, 30), dim=16, seed=1, spread=1.2)
    splits = np.where(np.arange(len(y)) % 3 == 0, "test", "train")
    fs = read_feature_set(write_cache(tmp / "c.h5", X, y, class_names=NASTY_CLASSES, splits=splits))
    result = compare_heads(fs, ("logreg",), cv=3, n_jobs=1)
    assert len(result.misclassified) >= 3, "the fixture needs mistakes to show"
    write_images(tmp / "photos", result.misclassified)
    result.misclassified[-1]["sha256"] = "0" * 64  # its file no longer holds the embedded bytes
    return result, write_report(result, tmp / "report")


@pytest.fixture(scope="module")
def evaluate_report(tmp_path_factory):
    """(EvalResult, report folder): a logreg head fitted on the train rows of a cache with nasty class names,
    evaluated on its test rows; every misclassified row given a real image file with a nasty name."""
    from tlpipe.features.cache import read_feature_set
    from tlpipe.pipeline.heads.estimators import fit_head
    from tlpipe.pipeline.heads.evaluate import evaluate_head
    from tlpipe.pipeline.reports.evaluate import write_html

    from ..conftest import embeddings, write_cache

    tmp = tmp_path_factory.mktemp("eval")
    X, y = embeddings((30, 30, 30, 30), dim=16, seed=2, spread=1.2)
    splits = np.where(np.arange(len(y)) % 3 == 0, "test", "train")
    fs = read_feature_set(write_cache(tmp / "c.h5", X, y, class_names=NASTY_CLASSES, splits=splits))
    train = fs.split == "train"
    estimator, _ = fit_head(fs.X[train], np.asarray(fs.class_names)[fs.y[train]], "logreg")
    result = evaluate_head(estimator, {}, fs, "test")
    assert len(result.misclassified) >= 2, "the fixture needs mistakes to show"
    write_images(tmp / "photos", result.misclassified)
    (tmp / "report").mkdir()
    return result, {"index.html": write_html(result, tmp / "report", head='head "<1>".joblib')}
