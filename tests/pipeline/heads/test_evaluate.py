import numpy as np
import pytest

from tlpipe.features.cache import read_feature_set
from tlpipe.pipeline.heads.estimators import fit_head, select_split
from tlpipe.pipeline.heads.evaluate import LeakError, evaluate_head
from tlpipe.pipeline.heads.persistence import HeadError, load_head, save_head
from tlpipe.pipeline.reports.charts import save_confusion_matrix


def _splits(y):
    return np.where(np.arange(len(y)) % 4 == 0, "test", "train")


@pytest.fixture
def trained(synthetic_cache, tmp_path):
    fs = synthetic_cache(n_per_class=(40, 40, 40, 40), splits=_splits)
    train, _, _ = select_split(fs)
    estimator, info = fit_head(fs.X[train], fs.y[train], "logreg")
    save_head(estimator, tmp_path / "head.joblib", feature_set=fs, metrics={}, params=info)
    return (fs, *load_head(tmp_path / "head.joblib"))


def test_evaluate_on_the_test_split(trained):
    fs, estimator, metadata = trained
    result = evaluate_head(estimator, metadata, fs, split="test")
    test = (fs.split == "test") & (fs.y >= 0)
    assert result.n == test.sum()
    assert result.accuracy == pytest.approx(np.mean(estimator.predict(fs.X[test]) == fs.y[test]))
    assert result.accuracy > 0.8 and 0 < result.macro_f1 <= 1 and 0 < result.log_loss < 1
    assert sorted(result.labels) == sorted(fs.class_names)
    assert result.confusion.shape == (4, 4) and result.confusion.sum() == result.n
    assert np.trace(result.confusion) / result.n == pytest.approx(result.accuracy)
    assert {"precision", "recall", "f1-score", "support"} <= set(result.report["class_0"])
    assert sum(result.report[name]["support"] for name in fs.class_names) == result.n
    assert result.to_dict()["confusion"] == result.confusion.tolist()


def test_evaluate_all_and_missing_split(trained):
    fs, estimator, metadata = trained
    assert evaluate_head(estimator, metadata, fs, split="all").n == len(fs)
    with pytest.raises(ValueError, match=r"split 'val' has no labelled rows.*test 40, train 120"):
        evaluate_head(estimator, metadata, fs, split="val")


def test_labels_are_matched_by_name(trained, synthetic, cache_writer, tmp_path):
    fs, estimator, metadata = trained
    # The same images written in another order: the cache numbers the classes differently.
    X, y = synthetic((40, 40, 40, 40), 32, 0)
    order = np.argsort(-y, kind="stable")
    shuffled = read_feature_set(cache_writer(tmp_path / "other.h5", X, y, splits=_splits(y), order=order))
    assert shuffled.class_names != fs.class_names
    assert evaluate_head(estimator, metadata, shuffled).accuracy == evaluate_head(estimator, metadata, fs).accuracy


def test_incompatible_feature_set_is_refused(trained, synthetic_cache):
    _, estimator, metadata = trained
    with pytest.raises(HeadError, match="not 'other-key'"):
        evaluate_head(estimator, metadata, synthetic_cache(key="other-key", splits=_splits))


def test_confusion_matrix_png(trained, tmp_path):
    fs, estimator, metadata = trained
    result = evaluate_head(estimator, metadata, fs)
    path = save_confusion_matrix(result.confusion, result.labels, tmp_path / "plots" / "cm.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_recorded_hold_out_is_the_default_and_training_rows_are_refused(synthetic, cache_writer, tmp_path):
    from tlpipe.pipeline.heads.fit import train_head

    X, y = synthetic((30, 30, 30), 32, 3)
    path = cache_writer(tmp_path / "flat.h5", X, y)  # no split column: fit-head makes a stratified hold-out
    result = train_head(path, "logreg", tmp_path / "head.joblib")
    estimator, metadata = load_head(tmp_path / "head.joblib")
    fs = read_feature_set(path)
    # no test split in the cache: evaluate scores the recorded hold-out, the very rows fit-head scored
    scored = evaluate_head(estimator, metadata, fs, split=None)
    assert scored.split == "holdout" and scored.n == result.evaluation.n == metadata["evaluation"]["rows"]
    assert scored.accuracy == result.evaluation.accuracy and "the head's recorded hold-out: 18 rows" in scored.rows_used
    assert "stratified hold-out" in scored.rows_used and scored.train_rows_included == 0
    # rows the head was trained on: refused (a leak), unless asked for, and then the report says so
    with pytest.raises(LeakError, match=r"72 of the 90 rows of 'all' were used to train this head.*--allow-train-rows"):
        evaluate_head(estimator, metadata, fs, split="all")
    leaky = evaluate_head(estimator, metadata, fs, split="all", allow_train_rows=True)
    assert (
        leaky.n == 90 and leaky.train_rows_included == 72 and "72 of which the head was trained on" in leaky.rows_used
    )
    assert leaky.to_dict()["rows_used"] == leaky.rows_used
    # a cache with a test split: that split is the default
    test_cache = read_feature_set(cache_writer(tmp_path / "split.h5", X, y, splits=_splits(y)))
    with pytest.raises(LeakError):  # same images, now labelled test: 54 of its test rows were training rows
        evaluate_head(estimator, metadata, test_cache, split=None)
    assert evaluate_head(estimator, metadata, test_cache, split=None, allow_train_rows=True).split == "test"


def test_singleton_class_stays_in_training_and_an_untrained_class_is_refused(synthetic, cache_writer, tmp_path):
    from tlpipe.pipeline.heads.fit import train_head

    X, y = synthetic((30, 30, 1), 32, 5)
    path = cache_writer(tmp_path / "single.h5", X, y, class_names=["cat", "dog", "lynx"])
    with pytest.warns(UserWarning, match=r"'lynx' \(1 row\) too small for the hold-out: kept in training"):
        result = train_head(path, "logreg", tmp_path / "head.joblib")
    estimator, metadata = load_head(tmp_path / "head.joblib")
    assert metadata["labels"] == ["cat", "dog", "lynx"] and len(estimator.classes_) == 3
    assert "'lynx' (1 row) too small" in result.setup
    lynx = read_feature_set(path).sha256[y == 2][0]
    assert lynx in metadata["training"]["sha256"] and lynx not in metadata["evaluation"]["sha256"]
    # a class that only has test rows: refused by name
    splits = np.where(y == 2, "test", _splits(y))
    no_train = cache_writer(tmp_path / "untrained.h5", X, y, class_names=["cat", "dog", "lynx"], splits=splits)
    with pytest.raises(ValueError, match=r"class\(es\) 'lynx' have 'test' rows but no 'train' rows"):
        train_head(no_train, "logreg", tmp_path / "x.joblib")
