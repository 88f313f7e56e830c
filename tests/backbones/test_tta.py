"""TTA inside the exported model and multi-output exports: real Keras models converted to real ONNX sessions."""

import json

import numpy as np
import pytest

from tlpipe.backbones.export import (
    INPUT_NAME,
    export_backbone,
    export_layers,
    obtain_layers,
    plan_export,
    verification_images,
)
from tlpipe.backbones.tta import CROP_FRACTION, crop_offsets, decode_size, make_views, view_count

TINY = dict(weights="none", size=64)


def run(entry, images, names=None):
    import onnxruntime as ort

    session = ort.InferenceSession(str(entry.model_path), providers=["CPUExecutionProvider"])
    return session.run(names, {INPUT_NAME: images})


def test_views_reference():
    assert decode_size(224, "flip+crops") == 256 and decode_size(224, "flip") == 224 == decode_size(224, "none")
    assert round(224 / CROP_FRACTION) == 256 and [view_count(m) for m in ("none", "flip", "flip+crops")] == [1, 2, 10]
    assert crop_offsets(224, "flip+crops") == [(16, 16), (0, 0), (0, 32), (32, 0), (32, 32)]
    images = np.arange(2 * 8 * 8 * 3, dtype=np.uint8).reshape(2, 8, 8, 3)
    views = make_views(images, 8, "flip")
    assert views.shape == (2, 2, 8, 8, 3)
    np.testing.assert_array_equal(views[0], images)
    np.testing.assert_array_equal(views[1][:, :, 0], images[:, :, -1])  # mirrored along the width
    big = np.arange(2 * 9 * 9 * 3, dtype=np.uint8).reshape(2, 9, 9, 3)
    ten = make_views(big, 8, "flip+crops")
    assert ten.shape == (10, 2, 8, 8, 3)
    np.testing.assert_array_equal(ten[4], big[:, 1:, 1:])  # bottom-right crop
    np.testing.assert_array_equal(ten[9], big[:, 1:, 1:][:, :, ::-1])
    with pytest.raises(ValueError, match="takes 9 x 9"):
        make_views(images, 8, "flip+crops")
    with pytest.raises(ValueError, match="unknown TTA mode"):
        plan_export("mobilenet_v2_0.35", tta="flips", **TINY)


def test_tta_changes_the_key_and_none_keeps_the_old_one():
    none = plan_export("mobilenet_v2_0.35", **TINY)
    assert "tta" not in none.key_fields()  # keys of exports made before TTA existed stay valid
    flip = plan_export("mobilenet_v2_0.35", tta="flip", **TINY)
    crops = plan_export("mobilenet_v2_0.35", tta="flip+crops", **TINY)
    assert len({none.key, flip.key, crops.key}) == 3
    assert "-flip-" in flip.key and "-flip_crops-" in crops.key and crops.input_size == 73


@pytest.mark.slow
@pytest.mark.parametrize("tta", ["flip", "flip+crops"])
def test_tta_model_is_the_mean_over_its_views(model_store, tiny_entry, tta):
    """The exported graph makes the views itself: its output equals the plain model's embeddings of the
    NumPy views, averaged; verification against Keras (same wrapper) is recorded."""
    entry = export_backbone("mobilenet_v2_0.35", store=model_store, tta=tta, **TINY)
    meta = entry.metadata
    assert meta["tta"] == tta and meta["views"] == view_count(tta) and meta["backbone_size"] == 64
    assert entry.input_size == decode_size(64, tta) and meta["verification"]["min_cosine"] >= 0.9999
    images = verification_images(entry.input_size, 3)
    ours = run(entry, images)[0]
    reference = np.mean([run(tiny_entry, view)[0] for view in make_views(images, 64, tta)], axis=0)
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-6 * np.abs(reference).max())
    plain = run(tiny_entry, images[:, :64, :64])[0]
    assert np.abs(ours - plain).max() > 0.01 * np.abs(plain).max()  # not the plain embedding
    import onnx

    props = {p.key: p.value for p in onnx.load(str(entry.model_path)).metadata_props}
    assert props["tlpipe.tta"] == tta and json.loads(props["tlpipe"])["key"] == entry.key


@pytest.mark.slow
def test_multi_output_export_verifies_and_stores_each_layer(model_store, tiny_entry, monkeypatch):
    layers = ["block_12_add", None]
    found = export_layers("mobilenet_v2_0.35", layers, store=model_store, **TINY)
    assert [name for name, _ in found.outputs] == ["embeddings/block_12_add", "embeddings/full"]
    figures = found.entry.metadata["verification"]
    assert set(figures) == {"embeddings/block_12_add", "embeddings/full"}
    assert all(f["min_cosine"] >= 0.9999 for f in figures.values())
    singles = [entry for _, entry in found.outputs]
    # each output is stored under the key a one-layer export of it has
    assert [s.key for s in singles] == [plan_export("mobilenet_v2_0.35", layer=x, **TINY).key for x in layers]
    assert singles[1].key == tiny_entry.key and singles[0].embedding_dim == 32
    images = verification_images(64, 4)
    both = run(found.entry, images, ["embeddings/block_12_add", "embeddings/full"])
    np.testing.assert_allclose(run(singles[0], images)[0], both[0], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(run(tiny_entry, images)[0], both[1], rtol=1e-4, atol=1e-9)
    # a second request is a store hit
    import tlpipe.backbones.export as export

    monkeypatch.setattr(export, "export_multi", lambda *a, **k: pytest.fail("exported again"))
    again = obtain_layers("mobilenet_v2_0.35", layers, store=model_store, **TINY)
    assert again.entry.key == found.entry.key
