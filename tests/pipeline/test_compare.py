import csv
import json

import numpy as np
import pytest
from rich.console import Console

from tlpipe.pipeline.compare import compare_heads, format_table, write_report
from tlpipe.pipeline.heads import HEADS, search_space


@pytest.fixture(scope="module")
def compared(tmp_path_factory, synthetic, cache_writer):
    from tlpipe.features.cache import read_feature_set

    X, y = synthetic((50, 50, 50, 50), dim=32, seed=4, spread=4.0)
    y = y.copy()
    y[:6] = -1  # a few unlabelled rows
    fs = read_feature_set(cache_writer(tmp_path_factory.mktemp("cmp") / "c.h5", X, y))
    return fs, compare_heads(fs, HEADS, cv=3, seed=0, n_jobs=2, holdout=False)


def test_compare_scores_every_head(compared):
    fs, result = compared
    assert [h.name for h in result.heads] == list(HEADS)
    assert result.rows == 194 and "6 unlabelled rows excluded" in result.setup
    for h in result.heads:
        assert h.folds == 3 and h.params == {}
        assert 0.8 <= h.accuracy <= 1 and 0 <= h.accuracy_std < 0.2 and 0.7 <= h.macro_f1 <= 1
        assert 0 < h.log_loss < 1.5 and h.fit_s > 0 and h.predict_s > 0
    best = max(result.heads, key=lambda h: (h.accuracy, h.macro_f1))
    assert result.best == best.name
    # out-of-fold predictions of the best head reproduce its accuracy
    assert np.mean(result.y_pred == result.y_true) == pytest.approx(best.accuracy, abs=0.02)
    assert result.confusion.sum() == result.rows and sorted(result.class_names) == sorted(fs.class_names)
    assert result.balance["labelled"] == 194


def test_report_files(compared, tmp_path):
    _, result = compared
    paths = write_report(result, tmp_path / "report")
    assert sorted(p.name for p in paths.values()) == sorted(
        ["report.md", "results.csv", "results.json", "comparison.png", "confusion_matrix.png"])
    report = paths["report.md"].read_text()
    assert f"Best head: **{result.best}**" in report and "Class balance" in report
    assert all(f"| {name} |" in report for name in HEADS)
    rows = list(csv.DictReader(paths["results.csv"].open()))
    assert [r["head"] for r in rows] == list(HEADS)
    assert float(rows[0]["accuracy"]) == pytest.approx(result.heads[0].accuracy)
    assert [r["best"] for r in rows].count("True") == 1
    data = json.loads(paths["results.json"].read_text())
    assert data["best"] == result.best and len(data["heads"]) == 4 and data["cv"] == 3
    for name in ("comparison.png", "confusion_matrix.png"):
        assert paths[name].read_bytes()[:4] == b"\x89PNG"


def test_format_table(compared):
    _, result = compared
    table = format_table(result)
    assert table.row_count == 4 and len(table.columns) == 7
    console = Console(record=True, width=160)
    console.print(table)
    text = console.export_text()
    assert all(name in text for name in HEADS) and f"{result.best} *" in text


def test_holdout_keeps_the_test_split_out_and_search(synthetic_cache):
    fs = synthetic_cache(n_per_class=(30, 30, 30), splits=lambda y: np.where(np.arange(len(y)) % 3 == 0, "test", "train"))
    result = compare_heads(fs, ("logreg",), cv=3, n_jobs=1, search=True)
    assert result.rows == int(np.sum(fs.split == "train")) and "'test'" in result.setup
    (head,) = result.heads
    assert len(head.grid) == len(search_space("logreg")["C"]) and head.params == head.grid[0]["params"]
    assert head.accuracy == max(row["accuracy"] for row in head.grid)


def test_parallel_equals_serial_and_too_few_rows_are_explained(synthetic_cache):
    fs = synthetic_cache(n_per_class=(20, 20, 5))
    serial = compare_heads(fs, ("logreg", "svm"), cv=3, n_jobs=1, holdout=False)
    parallel = compare_heads(fs, ("logreg", "svm"), cv=3, n_jobs=2, holdout=False)
    assert [h.accuracy for h in serial.heads] == [h.accuracy for h in parallel.heads]
    with pytest.raises(ValueError, match="only 5 labelled rows; 6-fold"):
        compare_heads(fs, ("logreg",), cv=6, n_jobs=1, holdout=False)
    with pytest.raises(ValueError, match="svm calibrate"):
        compare_heads(synthetic_cache(n_per_class=(20, 20, 4)), ("svm",), cv=3, n_jobs=1, holdout=False)
    with pytest.raises(ValueError, match="mlp holds out 10%"):
        compare_heads(synthetic_cache(n_per_class=(8, 8, 8)), ("mlp",), cv=3, n_jobs=1, holdout=False)
