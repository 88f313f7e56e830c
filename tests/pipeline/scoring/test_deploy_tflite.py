"""Deploy anywhere, TensorFlow Lite side: `export-model --format tflite` builds the classifier as Keras layers,
converts it with TensorFlow's TFLiteConverter and checks it in the TFLite interpreter against the Python head;
`score --classifier *.tflite` runs it and gives the ONNX classifier's labels.

A small random-init backbone checks the mechanics (fp32); the real MobileNetV2 weights and cats_vs_dogs photos of
../shared check fp32 within 1e-4, fp16 and int8 within their stated tolerances (skipped without ../shared)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import ROOT, shared_path, write_photo_folder
from tlpipe.features.cache import read_feature_set
from tlpipe.features.extract import extract
from tlpipe.features.images import load_image
from tlpipe.pipeline.heads.estimators import make_head
from tlpipe.pipeline.heads.persistence import save_head
from tlpipe.pipeline.scoring.fuse import FuseError, export_classifier, export_model
from tlpipe.pipeline.scoring.tflite import (
    FP16_TOLERANCE,
    INT8_MAX_MEAN_DIFF,
    INT8_MIN_AGREEMENT,
    TfliteSession,
    export_tflite,
    read_sidecar,
)

pytestmark = pytest.mark.slow  # each conversion builds and converts a Keras model (seconds)
TFLITE_HEADS = ("logreg", "svm", "mlp")


def score_both(photos, first, second, out):
    """Score ``photos`` with two classifiers (JSON Lines under ``out``); assert the same images scored, failed and
    got the same labels. Returns both outputs as {path: row}."""
    from tlpipe.pipeline.scoring.score import score

    a = score(photos, out / "first.jsonl", model=first, device="cpu")
    b = score(photos, out / "second.jsonl", model=second, device="cpu")
    assert (a.scored, a.failed) == (b.scored, b.failed) and a.scored > 0
    rows = [
        {r["path"]: r for r in map(json.loads, (out / name).read_text().splitlines())}
        for name in ("first.jsonl", "second.jsonl")
    ]
    assert {k: r["label"] for k, r in rows[0].items()} == {k: r["label"] for k, r in rows[1].items()}
    return a, rows[0], rows[1]


@pytest.fixture(scope="module")
def small(tmp_path_factory, tiny_entry, model_store):
    root = tmp_path_factory.mktemp("tflite")
    photos = write_photo_folder(root / "photos", per_class=8)
    cache = root / "cache.h5"
    extract(photos, cache, model=str(tiny_entry.directory), batch_size=8)
    fs = read_feature_set(cache)
    heads = {}
    for name in (*TFLITE_HEADS, "rbf-svm"):
        estimator = make_head(name).fit(fs.X, np.asarray(fs.class_names)[fs.y])
        heads[name] = root / f"{name}.joblib"
        save_head(estimator, heads[name], feature_set=fs, metrics={}, params={})
    paths = sorted(photos.rglob("*.jpg"))
    return SimpleNamespace(root=root, photos=photos, paths=paths, heads=heads, store=model_store, entry=tiny_entry)


@pytest.mark.filterwarnings("ignore:mlp. early stopping off:UserWarning", "ignore:Got `batch_size`:UserWarning")
@pytest.mark.parametrize("name", TFLITE_HEADS)
def test_a_tflite_classifier_reproduces_the_python_head_and_records_what_a_phone_needs(tmp_path, small, name):
    out = tmp_path / "classifier.tflite"
    record = export_classifier(small.heads[name], out, images=small.paths, store=small.store)
    figures = record["verification"]
    print(
        f"{name}: TFLite fp32 vs the Python head on {figures['images']} photos: max |diff| "
        f"{figures['max_abs_diff']:.1e}"
    )
    assert figures["images"] == 16 and figures["max_abs_diff"] <= 1e-4 and figures["argmax_mismatch"] == 0
    assert out.stat().st_size == record["bytes"] and read_sidecar(out) == json.loads(json.dumps(record))
    assert record["precision"] == "fp32" and record["input_size"] == small.entry.input_size
    assert record["input"] == {"name": "images", "dtype": "uint8", "layout": "NHWC", "channels": "RGB"}
    assert record["class_names"] == ["china", "flower"] and record["head"]["name"] == name
    session = TfliteSession(out)
    runner = session._free[0]
    (input_detail,) = runner.get_input_details().values()
    assert input_detail["dtype"] == np.uint8 and list(input_detail["shape"][1:]) == [64, 64, 3]
    pixels = np.stack([load_image(p, 64)[0] for p in small.paths[:5]])
    proba, label = session.run_outputs(pixels, ["probabilities", "label"])
    assert proba.dtype == np.float32 and proba.shape == (5, 2) and label.dtype == np.int64
    assert np.array_equal(label, proba.argmax(axis=1))


def test_scoring_with_the_tflite_classifier_gives_the_onnx_classifiers_labels(tmp_path, small):
    tflite, onnx_model = tmp_path / "svm.tflite", tmp_path / "svm.onnx"
    export_classifier(small.heads["svm"], tflite, format="tflite", store=small.store)
    export_model(small.heads["svm"], onnx_model, store=small.store)
    _, by_onnx, by_tflite = score_both(small.photos, onnx_model, tflite, tmp_path)
    for path, row in by_onnx.items():
        assert row["probability"] == pytest.approx(by_tflite[path]["probability"], abs=1e-4)


def test_score_runs_a_tflite_classifier_in_a_process_without_tensorflow(tmp_path, small):
    pytest.importorskip("ai_edge_litert", reason="LiteRT (tlpipe[litert]) runs a .tflite without TensorFlow")
    model = tmp_path / "logreg.tflite"
    export_tflite(small.heads["logreg"], model, store=small.store)
    code = (
        "import sys, json; from tlpipe.pipeline.scoring.score import score; "
        f"s = score({str(small.photos)!r}, {str(tmp_path / 'out.csv')!r}, model={str(model)!r}); "
        "print(json.dumps([s.scored, s.provider, 'tensorflow' in sys.modules]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    scored, provider, tensorflow = json.loads(proc.stdout.strip().splitlines()[-1])
    print(provider)
    assert scored == 16 and not tensorflow and provider.startswith("TFLite (")


def test_the_cli_writes_a_tflite_classifier_and_scores_with_it(tmp_path, small):
    def tlpipe(*args):
        return subprocess.run(
            [sys.executable, "-m", "tlpipe.pipeline.cli", *map(str, args)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
        )

    model = tmp_path / "classifier.tflite"
    store = ["--store", small.store.root]
    made = tlpipe("export-model", small.heads["mlp"], "--format", "tflite", "--out", model, "--json", *store)
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["precision"] == "fp32" and (tmp_path / "classifier.tflite.json").is_file()
    scored = tlpipe("score", small.photos, "--classifier", model, "--out", tmp_path / "p.csv", "--json")
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["processed"] == 16
    mismatch = tlpipe("export-model", small.heads["mlp"], "--format", "tflite", "--out", tmp_path / "c.onnx", *store)
    assert mismatch.returncode == 2 and "--format tflite but --out" in mismatch.stderr + mismatch.stdout


def test_refusals_name_the_reason_and_the_alternative(tmp_path, small):
    with pytest.raises(
        FuseError, match="'rbf-svm' cannot be written as Keras layers.*--format onnx.*logreg, svm or mlp"
    ):
        export_tflite(small.heads["rbf-svm"], tmp_path / "rbf.tflite", store=small.store)
    with pytest.raises(FuseError, match="int8 is calibrated on your own photos"):
        export_tflite(small.heads["logreg"], tmp_path / "q.tflite", precision="int8", store=small.store)
    with pytest.raises(ValueError, match="--precision fp16 is for --format tflite"):
        export_classifier(small.heads["logreg"], tmp_path / "c.onnx", precision="fp16", store=small.store)
    with pytest.raises(ValueError, match="--operators is for --format onnx"):
        export_classifier(small.heads["logreg"], tmp_path / "c.tflite", operators="ml", store=small.store)
    assert list(tmp_path.iterdir()) == []


# -- real weights and photos (../shared) -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cats_dogs(cats_dogs_cache, model_store, tmp_path_factory):
    from tlpipe.features.sources import discover

    fs = read_feature_set(cats_dogs_cache)
    root = tmp_path_factory.mktemp("cats-dogs-tflite")
    train = fs.split == "train"
    heads = {}
    for name in TFLITE_HEADS:
        estimator = make_head(name).fit(fs.X[train], np.asarray(fs.class_names)[fs.y[train]])
        heads[name] = root / f"{name}.joblib"
        save_head(estimator, heads[name], feature_set=fs, metrics={}, params={})
    manifest = shared_path("datasets", "cats_vs_dogs", "manifest.csv")
    test = [r.abspath for r in discover(manifest).records if r.split == "test"]
    return SimpleNamespace(root=root, heads=heads, test=test, store=model_store)


@pytest.mark.shared
@pytest.mark.parametrize("name", TFLITE_HEADS)
def test_real_tflite_classifiers_fp32_within_1e4_and_int8_within_its_tolerance(tmp_path, cats_dogs, name):
    fp32 = export_tflite(cats_dogs.heads[name], tmp_path / "fp32.tflite", images=cats_dogs.test, store=cats_dogs.store)
    v = fp32["verification"]
    print(f"{name} fp32 on {v['images']} test photos: max |diff| {v['max_abs_diff']:.1e}")
    assert v["images"] == 32 and v["max_abs_diff"] <= 1e-4 and v["argmax_mismatch"] == 0
    int8 = export_tflite(
        cats_dogs.heads[name], tmp_path / "int8.tflite", precision="int8", images=cats_dogs.test, store=cats_dogs.store
    )
    v = int8["verification"]
    print(
        f"{name} int8 on {v['images']} held-out test photos: labels {v['label_agreement']:.3f}, "
        f"mean |diff| {v['mean_abs_diff']:.4f}, max {v['max_abs_diff']:.3f}; {fp32['bytes']} -> {int8['bytes']} bytes"
    )
    assert int8["calibration"]["images"] == 64 and v["images"] == 64
    assert v["label_agreement"] >= INT8_MIN_AGREEMENT and v["mean_abs_diff"] <= INT8_MAX_MEAN_DIFF
    assert int8["bytes"] < fp32["bytes"] / 2  # int8 backbone weights; the head stays float (1.3 MB for the mlp)


@pytest.mark.shared
def test_real_tflite_fp16_is_half_the_size_within_its_tolerance(tmp_path, cats_dogs):
    head = cats_dogs.heads["logreg"]
    fp16 = export_tflite(head, tmp_path / "fp16.tflite", precision="fp16", images=cats_dogs.test, store=cats_dogs.store)
    v = fp16["verification"]
    print(f"fp16 on {v['images']} photos: max |diff| {v['max_abs_diff']:.1e}; {fp16['bytes']} bytes")
    assert v["max_abs_diff"] <= FP16_TOLERANCE and v["argmax_mismatch"] == 0


@pytest.mark.shared
def test_real_score_with_tflite_gives_the_onnx_classifiers_labels(tmp_path, cats_dogs):
    import shutil

    photos = tmp_path / "photos"
    for path in cats_dogs.test[:120]:
        target = photos / os.path.basename(os.path.dirname(path)) / os.path.basename(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    tflite, onnx_model = tmp_path / "svm.tflite", tmp_path / "svm.onnx"
    export_tflite(cats_dogs.heads["svm"], tflite, images=cats_dogs.test, store=cats_dogs.store)
    export_model(cats_dogs.heads["svm"], onnx_model, store=cats_dogs.store, verify_images=cats_dogs.test[:32])
    a, by_onnx, by_tflite = score_both(photos, onnx_model, tflite, tmp_path)
    assert a.scored == 120
    diff = max(abs(r["probability"] - by_tflite[p]["probability"]) for p, r in by_onnx.items())
    print(f"score: TFLite vs ONNX classifier on 120 photos: labels equal, max |diff| of the top probability {diff:.1e}")
    assert diff <= 1e-4
