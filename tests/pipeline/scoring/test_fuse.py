"""Fused classifiers (backbone + head in one ONNX model): parity with the Python head for every head type,
two and three classes, refusal when parity fails or a head cannot be converted, and scoring with them."""

import dataclasses
import json
import shutil
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import score_with_head_and_fused, write_photo_folder
from tlpipe.features.cache import read_feature_set
from tlpipe.features.extract import extract
from tlpipe.pipeline.heads.estimators import HEADS, make_head
from tlpipe.pipeline.heads.persistence import save_head
from tlpipe.pipeline.scoring.fuse import FuseError, export_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_entry, model_store):
    root = tmp_path_factory.mktemp("fuse")
    photos = write_photo_folder(root / "photos", per_class=9)
    cache = root / "cache.h5"
    extract(photos, cache, model=str(tiny_entry.directory), batch_size=8)
    fs = read_feature_set(cache)
    # A third class for the multiclass paths: every other china photo (the heads only need separable-ish data).
    y3 = np.where((fs.y == 0) & (np.arange(len(fs.y)) % 2 == 1), 2, fs.y).astype(np.int32)
    fs3 = dataclasses.replace(fs, y=y3, class_names=[*fs.class_names, "china_b"])
    return SimpleNamespace(root=root, photos=photos, fs={2: fs, 3: fs3}, store=model_store, entry=tiny_entry)


def saved_head(setup, name: str, classes: int = 2, estimator=None):
    fs = setup.fs[classes]
    estimator = estimator if estimator is not None else make_head(name).fit(fs.X, fs.y)
    path = setup.root / f"{name}-{classes}.joblib"
    save_head(estimator, path, feature_set=fs, metrics={"accuracy": 1.0}, params={})
    return path, estimator


@pytest.mark.filterwarnings("ignore:Got `batch_size`:UserWarning")  # MLPClassifier on 18 rows
@pytest.mark.parametrize("classes", [2, 3])
@pytest.mark.parametrize("name", HEADS)
def test_fused_model_reproduces_the_head(tmp_path, setup, name, classes):
    head_path, estimator = saved_head(setup, name, classes)
    out = tmp_path / "classifier.onnx"
    photos = sorted(setup.photos.rglob("*.jpg"))
    record = export_model(head_path, out, store=setup.store, verify_images=photos)
    figures = record["verification"]
    print(f"{name}, {classes} classes: max |p_onnx - p_python| = {figures['max_abs_diff']:.2e}")
    assert figures["images"] == 18 and figures["max_abs_diff"] <= 1e-4 and figures["argmax_mismatch"] == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [("images", "tensor(uint8)")]
    outputs = [(o.name, o.type) for o in session.get_outputs()]
    assert outputs == [("probabilities", "tensor(float)"), ("label", "tensor(int64)")]
    meta = session.get_modelmeta().custom_metadata_map
    labels = json.loads(meta["tlpipe.class_names"])
    assert labels == [setup.fs[classes].class_names[c] for c in estimator.classes_] and len(labels) == classes
    assert meta["tlpipe.key"] == setup.entry.key and json.loads(meta["tlpipe"])["head"]["name"] == name
    # default verification images (crops of scikit-learn's sample photos) pass too
    assert export_model(head_path, tmp_path / "again.onnx", store=setup.store)["verification"]["argmax_mismatch"] == 0


def test_scoring_with_the_fused_model_equals_scoring_with_the_head(tmp_path, setup):
    head_path, _ = saved_head(setup, "svm", 3)
    model = tmp_path / "svm.onnx"
    export_model(head_path, model, store=setup.store)
    photos = shutil.copytree(setup.photos, tmp_path / "photos")
    (photos / "china" / "broken.jpg").write_bytes(b"not an image")
    python, fused, b, a = score_with_head_and_fused(photos, head_path, model, setup.store, tmp_path, top_k=3)
    assert (fused.scored, fused.failed) == (18, 1)
    for path, row in a.items():
        assert row["label"] == b[path]["label"] and row["error"] == b[path]["error"]
        top = lambda r: {r[f"top{i}_label"]: r[f"top{i}_prob"] for i in (1, 2, 3) if r[f"top{i}_label"]}  # noqa: E731
        assert top(row) == pytest.approx(top(b[path]), abs=1e-4)


def test_refuses_to_write_a_model_that_differs_from_the_head(tmp_path, setup, monkeypatch):
    import tlpipe.pipeline.scoring.fuse as fuse

    head_path, _ = saved_head(setup, "logreg")
    fs = setup.fs[2]
    other = make_head("logreg").fit(fs.X, 1 - fs.y)  # the opposite answers
    real_convert = fuse.convert_head
    monkeypatch.setattr(fuse, "convert_head", lambda estimator, *a: real_convert(other, *a))
    out = tmp_path / "bad.onnx"
    with pytest.raises(FuseError, match="differs from the Python head"):
        export_model(head_path, out, store=setup.store)
    assert list(tmp_path.iterdir()) == []


def test_a_head_without_a_standard_form_is_refused_clearly_and_skl2onnx_is_asked_only_with_ml(tmp_path, setup):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.semi_supervised import LabelSpreading

    fs = setup.fs[2]
    spreading = make_pipeline(StandardScaler(), LabelSpreading()).fit(fs.X, fs.y)
    head_path, _ = saved_head(setup, "spreading", estimator=spreading)
    with pytest.raises(
        FuseError, match="'labelspreading' .LabelSpreading. has no standard-operator form.*--operators ml"
    ):
        export_model(head_path, tmp_path / "m.onnx", store=setup.store)
    with pytest.raises(FuseError, match="skl2onnx cannot convert head 'labelspreading' .LabelSpreading."):
        export_model(head_path, tmp_path / "m.onnx", store=setup.store, operators="ml")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.filterwarnings("ignore:Got `batch_size`:UserWarning")  # MLPClassifier on 18 rows
@pytest.mark.parametrize("name", HEADS)
def test_a_head_fitted_on_class_names_fuses_with_label_indices_into_its_names(tmp_path, setup, name):
    # fit-head and compare --save-best fit on class names: predict returns names; the fused model's label
    # output stays an index into the class names of its metadata
    fs = setup.fs[3]
    named = make_head(name).fit(fs.X, np.asarray(fs.class_names)[fs.y])
    head_path, estimator = saved_head(setup, f"{name}-named", 3, estimator=named)
    assert estimator.classes_.dtype.kind == "U"
    out = tmp_path / "classifier.onnx"
    photos = sorted(setup.photos.rglob("*.jpg"))
    record = export_model(head_path, out, store=setup.store, verify_images=photos)
    assert record["verification"]["argmax_mismatch"] == 0 and record["verification"]["max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    labels = json.loads(session.get_modelmeta().custom_metadata_map["tlpipe.class_names"])
    assert labels == list(estimator.classes_)
    from tlpipe.backbones.runtime import OnnxEmbedder
    from tlpipe.features.images import load_image

    pixels = np.stack([load_image(p, setup.entry.input_size, "squash")[0] for p in photos])
    _, label = session.run(["probabilities", "label"], {"images": pixels})
    python = estimator.predict(OnnxEmbedder(setup.entry.model_path, device="cpu")(pixels))
    assert [labels[i] for i in label] == list(python)
