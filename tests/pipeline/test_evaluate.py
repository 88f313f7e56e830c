import numpy as np
import pytest

from tlpipe.features.cache import read_feature_set
from tlpipe.pipeline.artifacts import HeadError, load_head, save_head
from tlpipe.pipeline.evaluate import evaluate_head, save_confusion_matrix
from tlpipe.pipeline.heads import fit_head, select_split


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
