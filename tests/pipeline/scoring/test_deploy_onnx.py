"""Deploy anywhere, ONNX side: every head written in the default ONNX domain only, and a second runtime (OpenCV's
DNN module) that runs every fused classifier on real photos and agrees with ONNX Runtime.

Small random-init backbones keep the per-head tests fast; the real MobileNetV2 weights and cats_vs_dogs photos of
../shared check the same on a real classifier (skipped without ../shared), with its fp16 and int8 variants."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC

from tests.conftest import SHARED, opencv_classify, shared_path, write_photo_folder
from tests.pipeline.conftest import embeddings
from tlpipe.features.cache import read_feature_set
from tlpipe.features.extract import extract
from tlpipe.features.images import load_image
from tlpipe.pipeline.heads.estimators import HEADS, make_head
from tlpipe.pipeline.heads.persistence import save_head
from tlpipe.pipeline.scoring.fuse import export_model
from tlpipe.pipeline.scoring.portable_head import UnsupportedHead, evaluate, head_ops, onnx_head

OPENCV_TOLERANCE = 1e-4  # probabilities, OpenCV DNN against ONNX Runtime (fp32)
# fp16: both runtimes round to float16, each in its own order; measured on 64 cats_vs_dogs photos: see the test
OPENCV_FP16_TOLERANCE = 1e-2


def variants() -> dict:
    """The four heads as tlpipe makes them, and the variants a user can make of them."""
    heads = {name: make_head(name) for name in HEADS}
    heads["rbf-svm-pca"] = make_head("rbf-svm", pca=10)
    heads["logreg-whitened-pca"] = make_pipeline(StandardScaler(), PCA(8, whiten=True), make_head("logreg")[-1])
    heads["svm-sigmoid"] = make_pipeline(
        StandardScaler(), CalibratedClassifierCV(LinearSVC(C=0.01), method="sigmoid", cv=3)
    )
    heads["svc-linear-kernel"] = make_pipeline(
        StandardScaler(), CalibratedClassifierCV(SVC(kernel="linear"), method="temperature", cv=3)
    )
    heads["mlp-tanh-2-layers"] = make_pipeline(
        Normalizer(), StandardScaler(), MLPClassifier((16, 8), activation="tanh", max_iter=300, random_state=0)
    )
    heads["svc-ensemble-false"] = make_pipeline(StandardScaler(), CalibratedClassifierCV(SVC(), ensemble=False))
    heads["mlp-logistic"] = make_pipeline(StandardScaler(), MLPClassifier((8,), activation="logistic", max_iter=300))
    return heads


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("classes", [2, 3, 5])
@pytest.mark.parametrize("name", list(variants()))
def test_the_plain_form_of_every_head_is_its_predict_proba_in_three_runtimes(tmp_path, name, classes):
    X, y = embeddings((30,) * classes, dim=40, seed=classes)
    X_new, _ = embeddings((10,) * classes, dim=40, seed=classes + 10)
    head = variants()[name].fit(X, np.asarray([f"class {c}" for c in range(classes)])[y])
    expected = head.predict_proba(X_new)
    ops = head_ops(head)
    np.testing.assert_allclose(evaluate(ops, X_new), expected, atol=1e-6)  # the arithmetic, in float64
    model = onnx_head(ops, 17)
    assert {node.domain for node in model.graph.node} == {""}
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "head.onnx"
    onnx.save(model, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (in_ort,) = session.run(["probabilities"], {"embeddings": X_new})
    np.testing.assert_allclose(in_ort, expected, atol=1e-5)  # float32
    net = cv2.dnn.readNetFromONNX(str(path))
    net.setInput(X_new, "embeddings")
    in_opencv = net.forward("probabilities")
    np.testing.assert_allclose(in_opencv, in_ort, atol=1e-5)


@pytest.mark.filterwarnings("ignore:The `probability` parameter was deprecated:FutureWarning")
def test_heads_without_an_exact_plain_form_are_refused_by_name():
    X, y = embeddings((20, 20), dim=8)
    isotonic = make_pipeline(StandardScaler(), CalibratedClassifierCV(LinearSVC(), method="isotonic", cv=3)).fit(X, y)
    with pytest.raises(UnsupportedHead, match="isotonic calibration"):
        head_ops(isotonic)
    platt = make_pipeline(StandardScaler(), SVC(probability=True, random_state=0)).fit(X, y)
    with pytest.raises(UnsupportedHead, match="svc .SVC.*pairwise coupling"):
        head_ops(platt)
    poly = CalibratedClassifierCV(SVC(kernel="poly"), method="temperature", cv=3).fit(X, y)
    with pytest.raises(UnsupportedHead, match="kernel 'poly'"):
        head_ops(poly)


# -- fused with a real (small, random-init) backbone, on real photos -----------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_entry, model_store):
    root = tmp_path_factory.mktemp("deploy-onnx")
    photos = write_photo_folder(root / "photos", per_class=9)
    cache = root / "cache.h5"
    extract(photos, cache, model=str(tiny_entry.directory), batch_size=8)
    fs = read_feature_set(cache)
    y3 = np.where((fs.y == 0) & (np.arange(len(fs.y)) % 2 == 1), 2, fs.y).astype(np.int32)
    fs3 = dataclasses.replace(fs, y=y3, class_names=[*fs.class_names, "china_b"])
    paths = sorted(photos.rglob("*.jpg"))
    pixels = np.stack([load_image(p, tiny_entry.input_size)[0] for p in paths])
    return SimpleNamespace(root=root, paths=paths, pixels=pixels, fs={2: fs, 3: fs3}, store=model_store)


def saved(setup, name: str, classes: int, estimator=None):
    fs = setup.fs[classes]
    estimator = estimator if estimator is not None else make_head(name)
    estimator.fit(fs.X, np.asarray(fs.class_names)[fs.y])  # on class names, as fit-head fits
    path = setup.root / f"{name}-{classes}.joblib"
    save_head(estimator, path, feature_set=fs, metrics={}, params={})
    return path


@pytest.mark.filterwarnings("ignore:Got `batch_size`:UserWarning", "ignore:mlp. early stopping off:UserWarning")
@pytest.mark.parametrize("classes", [2, 3])
@pytest.mark.parametrize("name", HEADS)
def test_every_fused_head_is_default_domain_only_and_opencv_runs_it_as_onnx_runtime_does(
    tmp_path, setup, name, classes
):
    head = saved(setup, name, classes)
    out = tmp_path / "classifier.onnx"
    record = export_model(head, out, store=setup.store, verify_images=setup.paths)
    assert record["verification"]["max_abs_diff"] <= 1e-4 and record["verification"]["argmax_mismatch"] == 0
    assert record["operators"] == "standard" and record["domains"] == ["ai.onnx"]
    model = onnx.load(str(out))
    assert {node.domain for node in model.graph.node} == {""}
    assert "ai.onnx.ml" not in {imp.domain for imp in model.opset_import}
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    proba, label = session.run(["probabilities", "label"], {"images": setup.pixels})
    cv_proba, cv_label = opencv_classify(out, setup.pixels)
    diff = float(np.abs(cv_proba - proba).max())
    print(f"{name}, {classes} classes: OpenCV DNN vs ONNX Runtime max |diff| {diff:.1e}")
    assert cv_label.dtype == np.int64 and np.array_equal(cv_label, label) and diff <= OPENCV_TOLERANCE


def test_the_ml_domain_form_is_there_when_asked_and_verified_the_same_way(tmp_path, setup):
    head = saved(setup, "svm", 3)
    out = tmp_path / "ml.onnx"
    record = export_model(head, out, store=setup.store, verify_images=setup.paths, operators="ml")
    assert record["operators"] == "ml" and "ai.onnx.ml" in record["domains"]
    assert record["verification"]["max_abs_diff"] <= 1e-4 and record["verification"]["argmax_mismatch"] == 0
    meta = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert meta["tlpipe.operators"] == "ml" and json.loads(meta["tlpipe"])["versions"]["skl2onnx"]
    with pytest.raises(ValueError, match="operators must be one of standard, ml"):
        export_model(head, tmp_path / "x.onnx", store=setup.store, operators="onnx-ml")


# -- real weights and photos (../shared) -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cats_dogs(cats_dogs_cache, model_store, tmp_path_factory):
    """Heads fitted on cats_vs_dogs' training split (real MobileNetV2 1.0 embeddings) and 64 test photos."""
    fs = read_feature_set(cats_dogs_cache)
    root = tmp_path_factory.mktemp("cats-dogs-deploy")
    train = fs.split == "train"
    names = np.asarray(fs.class_names)[fs.y]
    heads = {}
    for name in HEADS:
        estimator = make_head(name).fit(fs.X[train], names[train])
        heads[name] = root / f"{name}.joblib"
        save_head(estimator, heads[name], feature_set=fs, metrics={}, params={})
    manifest = shared_path("datasets", "cats_vs_dogs", "manifest.csv")
    from tlpipe.features.sources import discover

    records = [r for r in discover(manifest).records if r.split == "test"]
    paths = [r.abspath for r in records[:: max(1, len(records) // 64)]][:64]
    pixels = np.stack([load_image(p, 224)[0] for p in paths])
    return SimpleNamespace(root=root, heads=heads, paths=paths, pixels=pixels, store=model_store, fs=fs)


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize("name", HEADS)
def test_real_classifiers_run_in_opencv_dnn_as_in_onnx_runtime(tmp_path, cats_dogs, name):
    out = tmp_path / f"{name}.onnx"
    record = export_model(cats_dogs.heads[name], out, store=cats_dogs.store, verify_images=cats_dogs.paths[:32])
    assert record["verification"]["max_abs_diff"] <= 1e-4 and record["domains"] == ["ai.onnx"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    proba, label = session.run(["probabilities", "label"], {"images": cats_dogs.pixels})
    cv_proba, cv_label = opencv_classify(out, cats_dogs.pixels)
    diff = float(np.abs(cv_proba - proba).max())
    print(f"{name} on 64 cats_vs_dogs photos: OpenCV DNN vs ONNX Runtime max |diff| {diff:.1e}")
    assert np.array_equal(cv_label, label) and diff <= OPENCV_TOLERANCE


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_classifiers_in_opencv_dnn(tmp_path, cats_dogs, precision):
    """A head fitted on the fp16 / int8 backbone's embeddings, fused with that backbone. OpenCV DNN 5.0 runs both;
    fp16 agrees with ONNX Runtime within OPENCV_FP16_TOLERANCE; int8 is run and its figures reported, but OpenCV
    does not reproduce ONNX Runtime's int8 arithmetic, so agreement is not claimed (a named skip)."""
    manifest = shared_path("datasets", "cats_vs_dogs", "manifest.csv")
    weights = shared_path("weights", "mobilenet_v2_1.0_224_no_top.h5")
    cache = tmp_path / "cache.h5"
    summary = extract(
        manifest, cache, backbone="mobilenet_v2", weights=weights, precision=precision, store=cats_dogs.store
    )
    fs = read_feature_set(cache, summary.key)
    train = fs.split == "train"
    head = tmp_path / "logreg.joblib"
    estimator = make_head("logreg").fit(fs.X[train], np.asarray(fs.class_names)[fs.y[train]])
    save_head(estimator, head, feature_set=fs, metrics={}, params={})
    out = tmp_path / f"{precision}.onnx"
    export_model(head, out, store=cats_dogs.store, verify_images=cats_dogs.paths[:32])
    assert {node.domain for node in onnx.load(str(out)).graph.node} == {""}
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    proba, label = session.run(["probabilities", "label"], {"images": cats_dogs.pixels})
    cv_proba, cv_label = opencv_classify(out, cats_dogs.pixels)
    diff, agree = float(np.abs(cv_proba - proba).max()), float(np.mean(cv_label == label))
    print(f"{precision}: OpenCV DNN vs ONNX Runtime on 64 photos: max |diff| {diff:.1e}, labels equal {agree:.3f}")
    if precision == "fp16":
        assert agree == 1.0 and diff <= OPENCV_FP16_TOLERANCE
        return
    pytest.skip(
        f"OpenCV DNN 5.0 runs the int8 (QDQ) classifier but not with ONNX Runtime's int8 arithmetic: max |diff| "
        f"{diff:.2f}, labels equal {agree:.3f} on 64 photos; agreement within {OPENCV_TOLERANCE} is not claimed"
    )


@pytest.mark.slow
def test_the_demos_classifier_runs_in_opencv_dnn(tmp_path, model_store):
    """`tlpipe demo`'s own route (digits, compare, fit-head, export-model): its classifier.onnx in OpenCV DNN.
    ImageNet weights from ../shared when present, else the demo's random-init backbone (it says so)."""
    from rich.console import Console

    from tlpipe.pipeline.demo import run_demo

    weights_dir = SHARED / "weights" if (SHARED / "weights").is_dir() else None
    summary = run_demo(
        tmp_path / "demo",
        backbone="mobilenet_v2_0.35",
        weights_dir=weights_dir,
        store=model_store,
        console=Console(quiet=True),
    )
    classifier = summary["classifier"]
    assert {node.domain for node in onnx.load(classifier).graph.node} == {""}
    paths = sorted((tmp_path / "demo" / "digits" / "test").rglob("*.png"))[::10]
    pixels = np.stack([load_image(p, 224)[0] for p in paths])
    session = ort.InferenceSession(classifier, providers=["CPUExecutionProvider"])
    proba, label = session.run(["probabilities", "label"], {"images": pixels})
    cv_proba, cv_label = opencv_classify(classifier, pixels)
    assert np.array_equal(cv_label, label) and float(np.abs(cv_proba - proba).max()) <= OPENCV_TOLERANCE
