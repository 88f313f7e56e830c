import hashlib
import json
import pickle

import joblib
import numpy as np
import pytest

from tlpipe.pipeline.heads.estimators import fit_head, select_split
from tlpipe.pipeline.heads.persistence import (
    FORMAT_VERSION,
    HeadError,
    check_compatible,
    load_head,
    save_head,
    sidecar_path,
)


class _Payload:
    """Unpickling this writes a marker file: stands in for a malicious joblib file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def saved(synthetic_cache, tmp_path):
    fs = synthetic_cache(
        n_per_class=(30, 30, 30), splits=lambda y: np.where(np.arange(len(y)) % 4 == 0, "test", "train")
    )
    train, test, _ = select_split(fs)
    estimator, info = fit_head(fs.X[train], fs.y[train], "logreg")
    path = tmp_path / "heads" / "logreg.joblib"
    metadata = save_head(
        estimator, path, feature_set=fs, metrics={"accuracy": 0.97}, params=info, cache_path="cache.h5", rows=len(train)
    )
    return fs, estimator, path, metadata, test


def test_roundtrip_and_metadata(saved):
    fs, estimator, path, metadata, test = saved
    loaded, meta = load_head(path, expect_key=fs.key, expect_dim=fs.X.shape[1])
    np.testing.assert_array_equal(loaded.predict_proba(fs.X[test]), estimator.predict_proba(fs.X[test]))
    assert meta == metadata == json.loads(sidecar_path(path).read_text())
    assert meta["format_version"] == FORMAT_VERSION
    # logreg chose C from its grid by internal CV: the sidecar records the choice and the grid
    chosen = meta["head"]["params"]["params"]
    assert (
        meta["head"]["name"] == "logreg" and set(chosen) == {"C", "Cs", "C_chosen_by"} and chosen["C"] in chosen["Cs"]
    )
    assert chosen["C"] == float(np.ravel(estimator[-1].C_)[0])
    assert meta["feature_set"] == {
        "key": fs.key,
        "embedding_dim": 32,
        "backbone": "ResNet50",
        "model_sha256": "ab" * 32,
        "input_size": 224,
        "pooling": "avg",
        "layer": None,
        "resize": "squash",
        "resize_filter": "antialias",
        "colour": "none",  # a feature set written without recording colour handling: made before it was recorded
        "model_key": fs.metadata.get("key") or fs.key,
    }
    assert meta["class_names"] == fs.class_names and meta["labels"] == [fs.class_names[c] for c in meta["classes"]]
    assert meta["training"] == {
        "cache_id": fs.cache_id,
        "cache_path": "cache.h5",
        "rows": len(fs) - len(test),
        "sha256": None,
    }
    assert meta["evaluation"] is None  # rows not given: nothing recorded (evaluate then cannot rule out a leak)
    assert meta["metrics"] == {"accuracy": 0.97}
    assert set(meta["versions"]) == {"sklearn", "numpy", "joblib", "python"}
    assert meta["joblib_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sorted(p.name for p in path.parent.iterdir()) == ["logreg.joblib", "logreg.joblib.json"]  # no temp files


def test_tampered_joblib_is_refused_before_unpickling(saved, tmp_path):
    fs, _, path, _, _ = saved
    marker = tmp_path / "code-ran"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(HeadError, match="does not match its sidecar"):
        load_head(path)
    assert not marker.exists()


def test_missing_sidecar_is_refused_unless_trusted(saved):
    fs, estimator, path, _, test = saved
    sidecar_path(path).unlink()
    with pytest.raises(HeadError, match="missing.*trust=True"):
        load_head(path)
    loaded, meta = load_head(path, trust=True)
    assert meta == {}
    np.testing.assert_array_equal(loaded.predict(fs.X[test]), estimator.predict(fs.X[test]))


def test_trust_loads_a_modified_head(saved):
    fs, estimator, path, _, test = saved
    other, _ = fit_head(fs.X, fs.y, "logreg", seed=1)
    joblib.dump(other, path)
    with pytest.raises(HeadError):
        load_head(path)
    loaded, meta = load_head(path, trust=True)
    assert meta["head"]["name"] == "logreg"
    np.testing.assert_array_equal(loaded.predict(fs.X), other.predict(fs.X))


def test_wrong_key_or_dimension_is_refused(saved, synthetic_cache):
    fs, _, path, metadata, _ = saved
    with pytest.raises(HeadError, match=f"trained on feature set '{fs.key}', not 'efficientnetb0-224'"):
        load_head(path, expect_key="efficientnetb0-224")
    with pytest.raises(HeadError, match="expects 32-dimensional embeddings, these have 64"):
        load_head(path, expect_dim=64)
    with pytest.raises(HeadError, match="expects 32-dimensional embeddings, these have 48"):
        check_compatible(metadata, synthetic_cache(dim=48))
    with pytest.raises(HeadError, match="not 'mobilenet'"):
        check_compatible(metadata, synthetic_cache(key="mobilenet"))
    with pytest.raises(HeadError, match="same key, different weights"):
        check_compatible(metadata, synthetic_cache(metadata={"model_sha256": "cd" * 32}))
    check_compatible(metadata, synthetic_cache())


def test_damaged_or_future_sidecar_is_refused(saved):
    _, _, path, metadata, _ = saved
    sidecar_path(path).write_text(json.dumps(metadata | {"format_version": FORMAT_VERSION + 1}))
    with pytest.raises(HeadError, match="format version"):
        load_head(path)
    sidecar_path(path).write_text("{not json")
    with pytest.raises(HeadError, match="cannot read"):
        load_head(path)


def test_training_and_evaluation_rows_are_recorded_by_sha256(synthetic_cache, tmp_path):
    fs = synthetic_cache(n_per_class=(20, 20), splits=lambda y: np.where(np.arange(len(y)) % 4 == 0, "test", "train"))
    train, test, setup = select_split(fs)
    estimator, info = fit_head(fs.X[train], fs.y[train], "logreg")
    meta = save_head(
        estimator,
        tmp_path / "h.joblib",
        feature_set=fs,
        metrics={},
        params=info,
        train_rows=train,
        evaluation_rows=test,
        evaluation_setup=setup,
    )
    assert meta["training"]["rows"] == len(train) and meta["training"]["sha256"] == sorted(fs.sha256[train])
    assert meta["evaluation"] == {"rows": len(test), "setup": setup, "sha256": sorted(fs.sha256[test])}
    assert load_head(tmp_path / "h.joblib")[1] == meta


def test_fit_head_saves_a_head_that_predicts_class_names_and_older_index_heads_still_work(
    synthetic, cache_writer, tmp_path
):
    from tlpipe.features.cache import read_feature_set
    from tlpipe.pipeline.heads.evaluate import evaluate_head
    from tlpipe.pipeline.heads.fit import train_head
    from tlpipe.pipeline.heads.persistence import head_labels
    from tlpipe.pipeline.scoring.score import head_predictor

    X, y = synthetic((30, 30, 30), dim=16, seed=2, spread=5.0)
    # class names whose alphabetical order is not the label order: names must be mapped, not assumed sorted
    names = ["zebra", "ant", "moth"]
    cache = cache_writer(tmp_path / "c.h5", X, y, class_names=names)
    fs = read_feature_set(cache)
    trained = train_head(cache, "svm", tmp_path / "svm.joblib")
    head, meta = load_head(tmp_path / "svm.joblib")
    assert sorted(head.classes_) == sorted(fs.class_names) and meta["head"]["predicts"] == "class names"
    assert meta["labels"] == list(head.classes_) and meta["classes"] == [fs.class_names.index(c) for c in head.classes_]
    predicted = head.predict(fs.X)
    truth = np.asarray(fs.class_names)[fs.y]
    assert predicted.dtype.kind == "U" and np.mean(predicted == truth) > 0.9
    result = evaluate_head(head, meta, fs)  # the recorded hold-out
    assert result.accuracy == pytest.approx(trained.evaluation.accuracy) and result.accuracy > 0.9
    # score's predictor labels columns by the sidecar: the same names, in the head's column order
    predictor = head_predictor(tmp_path / "svm.joblib", backbone=False)
    assert list(predictor.labels) == list(head.classes_)
    # a head saved before (fitted on label indices) loads and is named through its sidecar
    train = np.flatnonzero(np.isin(fs.sha256, meta["training"]["sha256"]))
    old, _ = fit_head(fs.X[train], fs.y[train], "svm")
    old_meta = save_head(
        old,
        tmp_path / "old.joblib",
        feature_set=fs,
        metrics={},
        params={},
        train_rows=train,
        evaluation_rows=np.setdiff1d(np.arange(len(fs)), train),
    )
    loaded, old_meta = load_head(tmp_path / "old.joblib")
    assert old_meta["head"]["predicts"] == "label indices" and list(loaded.classes_) == [0, 1, 2]
    assert head_labels(loaded, old_meta) == list(fs.class_names) == old_meta["labels"]
    assert evaluate_head(loaded, old_meta, fs).accuracy == pytest.approx(result.accuracy, abs=0.05)
    with pytest.raises(HeadError, match="nothing names them"):
        head_labels(loaded, {})
