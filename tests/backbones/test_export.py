"""Export parity against Keras, metadata, the store's cache hits and atomicity, the ../shared golden check."""

import json

import numpy as np
import pytest

from tests.conftest import shared_path
from tlpipe.backbones.export import (
    INPUT_NAME,
    VerificationError,
    compare_embeddings,
    export_backbone,
    plan_export,
    verification_images,
)
from tlpipe.backbones.store import ModelStore

pytestmark = pytest.mark.slow


def run_onnx(entry, images):
    import onnxruntime as ort

    session = ort.InferenceSession(str(entry.model_path), providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT_NAME: images})[0]


@pytest.mark.parametrize(
    "backbone,size,layer,pooling,dim",
    [
        ("mobilenet_v2", 96, None, "avg", 1280),
        ("vgg16", 64, "block1_pool", "avg", 64),
        ("resnet50", 64, None, "max", 2048),
        ("efficientnet_b0", 64, None, "avg", 1280),  # rescaling built into the Keras model
        ("densenet121", 64, "pool2_pool", "none", 8 * 8 * 128),  # torch mode; flatten
    ],
)
def test_export_matches_keras(model_store, backbone, size, layer, pooling, dim):
    import onnx

    entry = export_backbone(backbone, weights="none", size=size, layer=layer, pooling=pooling, store=model_store)
    meta = entry.metadata
    assert meta["embedding_dim"] == dim and meta["input_size"] == size and meta["layer"] == layer
    v = meta["verification"]
    assert v["min_cosine"] >= 0.9999 and v["rel_diff"] <= 1e-3
    # the ONNX file carries the same metadata; the input is uint8 NHWC with a dynamic batch
    model = onnx.load(str(entry.model_path))
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["tlpipe"])["key"] == entry.key
    assert props["tlpipe.preprocessing"] == meta["preprocessing"]
    tensor = model.graph.input[0].type.tensor_type
    assert tensor.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value for d in tensor.shape.dim[1:]] == [size, size, 3] and tensor.shape.dim[0].dim_param
    out = run_onnx(entry, verification_images(size, count=3))
    assert out.shape == (3, dim) and out.dtype == np.float32


def test_second_export_is_a_cache_hit(model_store, tiny_entry, monkeypatch):
    import tlpipe.backbones.export as export

    monkeypatch.setattr(export, "export_plan", lambda *a, **k: pytest.fail("converted again"))
    again = export_backbone("mobilenet_v2_0.35", weights="none", size=64, store=model_store)
    assert again.key == tiny_entry.key
    other_seed = plan_export("mobilenet_v2_0.35", weights="none", size=64, seed=1)
    assert other_seed.key != tiny_entry.key


def test_failed_export_leaves_no_entry(tmp_path, monkeypatch):
    import tlpipe.backbones.export as export

    store = ModelStore(tmp_path)
    monkeypatch.setattr(export, "verify", lambda *a: (_ for _ in ()).throw(VerificationError("differs")))
    with pytest.raises(VerificationError):
        export_backbone("vgg16", weights="none", size=32, layer="block1_pool", store=store)
    assert store.entries() == [] and list(tmp_path.iterdir()) == []


def test_interrupted_store_write_is_invisible(tmp_path, monkeypatch):
    """A crash between writing the model and renaming the folder leaves nothing that looks valid."""
    import os

    store = ModelStore(tmp_path)
    monkeypatch.setattr(os, "rename", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        store.put("k", b"model", {"embedding_dim": 1})
    assert store.get("k") is None and store.entries() == []


def test_tampered_entry_is_refused(tmp_path):
    from tlpipe.backbones.store import StoreError

    store = ModelStore(tmp_path)
    entry = store.put("k", b"model-bytes", {"embedding_dim": 1})
    entry.verify()
    entry.model_path.write_bytes(b"evil")
    with pytest.raises(StoreError, match="corrupt"):
        store.get("k", verify=True)


def test_offline_imagenet_names_the_local_options(tmp_path, monkeypatch):
    from tlpipe.backbones.weights import WeightsUnavailable

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # empty Keras cache: a download is attempted
    monkeypatch.delenv("TLPIPE_WEIGHTS_DIR", raising=False)
    try:
        entry = export_backbone("mobilenet_0.25", weights="imagenet", size=128, store=ModelStore(tmp_path / "s"))
    except WeightsUnavailable as exc:
        assert "--weights PATH" in str(exc) and "TLPIPE_WEIGHTS_DIR" in str(exc)
    else:  # a machine with a network: the real download path worked
        assert entry.metadata["weights"]["source"] == "imagenet"


def test_golden_against_keras_preprocess_input(model_store):
    """ONNX(uint8 photo) == keras preprocess_input + model, on real photos with real weights."""
    import keras
    from PIL import Image

    weights = shared_path("weights", "mobilenet_v2_1.0_224_no_top.h5")
    photos = (
        sorted(shared_path("datasets", "cats_vs_dogs", "cats").glob("*.jpg"))[:3]
        + sorted(shared_path("datasets", "cats_vs_dogs", "dogs").glob("*.jpg"))[:3]
    )
    images = np.stack(
        [np.asarray(Image.open(p).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)) for p in photos]
    )
    entry = export_backbone("mobilenet_v2", weights=weights, store=model_store)
    ours = run_onnx(entry, images)
    base = keras.applications.MobileNetV2(
        include_top=False, weights=str(weights), input_shape=(224, 224, 3), pooling="avg"
    )
    reference = base.predict(keras.applications.mobilenet_v2.preprocess_input(images.astype("float32")), verbose=0)
    figures = compare_embeddings(ours, reference)
    assert figures["min_cosine"] > 0.9999 and figures["rel_diff"] < 1e-3, figures
    # real features: different for cats and dogs, and not the random-init scale
    assert np.linalg.norm(ours[0] - ours[-1]) > 0.1
