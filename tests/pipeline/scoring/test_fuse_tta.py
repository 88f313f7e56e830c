"""A head on a TTA feature set: score and the fused classifier apply the same views (they are in the graph)."""

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import score_with_head_and_fused, write_photo_folder
from tlpipe.backbones.tta import make_views
from tlpipe.features.cache import read_feature_set
from tlpipe.features.extract import extract
from tlpipe.features.images import load_image
from tlpipe.pipeline.heads.estimators import make_head
from tlpipe.pipeline.heads.persistence import save_head
from tlpipe.pipeline.scoring.fuse import export_model

pytestmark = pytest.mark.slow


def test_fused_classifier_and_score_apply_the_tta_views(tmp_path, model_store, tiny_entry):
    photos = write_photo_folder(tmp_path / "photos", per_class=8)
    cache = tmp_path / "cache.h5"
    summary = extract(
        photos, cache, backbone="mobilenet_v2_0.35", weights="none", size=64, tta="flip+crops", store=model_store
    )
    fs = read_feature_set(cache)
    assert "flip_crops" in fs.key and fs.metadata["input_size"] == 73 and summary.embedded == 16
    head = tmp_path / "logreg.joblib"
    estimator = make_head("logreg", C=1.0).fit(fs.X, fs.y)
    save_head(estimator, head, feature_set=fs, metrics={}, params={})
    out = tmp_path / "classifier.onnx"
    record = export_model(head, out, store=model_store)
    assert record["input_size"] == 73 and record["verification"]["argmax_mismatch"] == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [73, 73, 3]
    # the fused model's probabilities are the head's on the mean of the ten views' plain embeddings
    paths = sorted(photos.rglob("*.jpg"))[:4]
    pixels = np.stack([load_image(p, 73)[0] for p in paths])
    plain = ort.InferenceSession(str(tiny_entry.model_path), providers=["CPUExecutionProvider"])
    mean = np.mean([plain.run(None, {"images": v})[0] for v in make_views(pixels, 64, "flip+crops")], axis=0)
    fused = session.run(["probabilities"], {"images": pixels})[0]
    np.testing.assert_allclose(fused, estimator.predict_proba(mean), atol=1e-4)
    # scoring with the head (its backbone from the store) and with the fused model agree
    a, _, ra, rb = score_with_head_and_fused(photos, head, out, model_store, tmp_path)
    assert a.scored == 16
