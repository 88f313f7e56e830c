"""A concatenated cut point (``--layer out_relu+block_13_expand_relu``): one ONNX output that is the pooled
embeddings of both layers side by side, verified against Keras, keyed as its own feature set, and treated by
extract, score and the fused classifier like any one-output model."""

import numpy as np
import onnxruntime as ort
import pytest

from tlpipe.backbones.export import export_backbone, export_layers, plan_export, verification_images
from tlpipe.backbones.registry import get_backbone, layer_parts

CONCAT = "out_relu+block_13_expand_relu"
MID = "block_13_expand_relu"


def run_onnx(path, images):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": images})[0]


def test_layer_spec_grammar_and_identity():
    spec = get_backbone("mobilenet_v2_0.35")
    assert layer_parts(CONCAT) == ["out_relu", MID] and layer_parts(MID) == [MID] and layer_parts(None) == [None]
    assert spec.embedding_dim("avg", CONCAT) == 1280 + 192
    assert spec.embedding_dim("none", CONCAT) == 7 * 7 * 1280 + 14 * 14 * 192
    plan = plan_export("mobilenet_v2_0.35", "none", 64, CONCAT)
    # one spelling, one key; the order of the blocks, each part and the last layer alone are other feature sets
    assert plan_export("mobilenet_v2_0.35", "none", 64, " out_relu + block_13_expand_relu ").key == plan.key
    others = {
        plan_export("mobilenet_v2_0.35", "none", 64, layer).key for layer in (f"{MID}+out_relu", "out_relu", MID, None)
    }
    assert plan.key not in others and len(others) == 4
    assert plan.key.startswith("mobilenet_v2_0.35-64-out_relu_plus_block_13_expand_relu-avg-")
    assert plan.key_fields()["layer"] == CONCAT and plan.embedding_dim() == 1472
    with pytest.raises(ValueError, match="no cut point 'nope'"):
        plan_export("mobilenet_v2_0.35", "none", 64, "out_relu+nope")
    with pytest.raises(ValueError, match="twice"):
        plan_export("mobilenet_v2_0.35", "none", 64, "out_relu+out_relu")
    with pytest.raises(ValueError, match="empty part"):
        plan_export("mobilenet_v2_0.35", "none", 64, "out_relu+")


@pytest.mark.slow
def test_concatenated_export_is_the_parts_side_by_side(model_store, tiny_entry):
    entry = export_backbone("mobilenet_v2_0.35", weights="none", size=64, layer=CONCAT, store=model_store)
    meta = entry.metadata
    assert meta["layer"] == CONCAT and meta["embedding_dim"] == 1472 and meta["output"] == "embeddings"
    assert meta["verification"]["min_cosine"] >= 0.9999 and meta["verification"]["rel_diff"] <= 1e-3
    # a multi-output export with the concatenation as one of its outputs stores the same feature set
    found = export_layers("mobilenet_v2_0.35", [CONCAT, MID], weights="none", size=64, store=model_store)
    assert [single.key for _, single in found.outputs] == [
        entry.key,
        plan_export("mobilenet_v2_0.35", "none", 64, MID).key,
    ]
    images = verification_images(64, count=4)
    concatenated = run_onnx(entry.model_path, images)
    last = run_onnx(tiny_entry.model_path, images)  # the full backbone ends at out_relu
    mid = run_onnx(found.outputs[1][1].model_path, images)
    assert concatenated.shape == (4, 1472)
    np.testing.assert_allclose(concatenated, np.hstack([last, mid]), rtol=1e-5, atol=1e-6 * np.abs(last).max())
    np.testing.assert_array_equal(run_onnx(found.outputs[0][1].model_path, images), concatenated)


@pytest.mark.slow
def test_extract_fit_fuse_and_score_a_concatenated_feature_set(tmp_path, model_store):
    from tests.conftest import score_with_head_and_fused, write_photo_folder
    from tlpipe.features.cache import feature_set_key, read_feature_set
    from tlpipe.features.extract import extract
    from tlpipe.pipeline.heads.estimators import make_head
    from tlpipe.pipeline.heads.persistence import save_head
    from tlpipe.pipeline.scoring.fuse import export_model

    photos = write_photo_folder(tmp_path / "photos", per_class=8)
    cache = tmp_path / "cache.h5"
    summary = extract(
        photos, cache, backbone="mobilenet_v2_0.35", weights="none", size=64, layer=CONCAT, store=model_store
    )
    plan = plan_export("mobilenet_v2_0.35", "none", 64, CONCAT)
    assert summary.key == feature_set_key(plan.key) and summary.embedded == 16
    fs = read_feature_set(cache)
    assert fs.X.shape == (16, 1472) and fs.metadata["layer"] == CONCAT
    head = tmp_path / "logreg.joblib"
    estimator = make_head("logreg", C=1.0).fit(fs.X, fs.y)
    save_head(estimator, head, feature_set=fs, metrics={}, params={})
    fused = tmp_path / "classifier.onnx"
    record = export_model(head, fused, store=model_store)
    assert record["verification"]["argmax_mismatch"] == 0
    a, _, ra, _ = score_with_head_and_fused(photos, head, fused, model_store, tmp_path)
    assert a.scored == 16
    # scoring with the head equals the head on the cached (concatenated) embeddings
    cached = dict(zip(fs.paths, estimator.predict(fs.X)))
    names = fs.class_names
    assert {k: r["label"] for k, r in ra.items()} == {p: names[c] for p, c in cached.items() if p in ra}
