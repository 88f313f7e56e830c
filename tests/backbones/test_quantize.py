"""Reduced-precision variants: GPTQ rounding, int8 and fp16 store entries verified against fp32, refusal."""

import numpy as np
import pytest

from tests.conftest import shared_path
from tlpipe.backbones.export import VerificationError
from tlpipe.backbones.quantize import (
    compare_to_fp32,
    cosine_similarities,
    find_variant,
    gptq_round,
    make_variant,
    quantize_int8,
)


def _calibration(size: int, count: int, seed: int) -> np.ndarray:
    """Real photos: random crops of scikit-learn's sample images at ``size``."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng, photos, out = np.random.default_rng(seed), load_sample_images().images, []
    for i in range(count):
        photo = photos[i % 2]
        side = int(rng.integers(100, 420))
        top, left = int(rng.integers(0, photo.shape[0] - side)), int(rng.integers(0, photo.shape[1] - side))
        out.append(np.asarray(Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size))))
    return np.stack(out)


def test_gptq_rounding_beats_round_to_nearest_on_correlated_inputs():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(64, 64))
    x = rng.normal(size=(4000, 64)) @ mixing  # strongly correlated input channels, as in real feature maps
    w = rng.normal(size=(16, 64))
    scale = np.abs(w).max(axis=1) / 127
    rtn = np.clip(np.round(w / scale[:, None]), -127, 127)
    gptq = gptq_round(w, x.T @ x, scale)
    assert np.array_equal(gptq, np.round(gptq)) and np.abs(gptq).max() <= 127
    error = lambda q: np.linalg.norm(x @ (q * scale[:, None] - w).T)  # noqa: E731
    assert error(gptq) < 0.8 * error(rtn)  # measured 0.72


def test_cosine_similarities():
    a = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    b = np.array([[2.0, 0.0], [0.0, 0.0], [-1.0, -1.0]])
    assert cosine_similarities(a, b).tolist() == pytest.approx([1.0, 1.0, -1.0])


def test_int8_and_fp16_variants_are_verified_and_stored(tiny_entry, model_store):
    images = _calibration(64, 24, seed=1)
    int8 = make_variant(tiny_entry, "int8", model_store, calibration=images[:16], held=images[16:], calibration_id="t1")
    meta = int8.metadata
    assert meta["precision"] == "int8" and meta["base_key"] == tiny_entry.key and "int8" in int8.key
    assert meta["verification_vs_fp32"]["mean_cosine"] >= 0.99 and meta["calibration"] == {"images": 16, "id": "t1"}
    assert meta["quantization"]["gptq_layers"] > 0 and meta["embedding_dim"] == tiny_entry.embedding_dim
    int8.verify()
    import onnx

    graph = onnx.load(str(int8.model_path)).graph
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert find_variant(model_store, tiny_entry, "int8").key == int8.key
    # the same request is a store hit
    assert (
        make_variant(
            tiny_entry, "int8", model_store, calibration=images[:16], held=images[16:], calibration_id="t1"
        ).key
        == int8.key
    )

    fp16 = make_variant(tiny_entry, "fp16", model_store, held=images[16:])
    assert fp16.metadata["verification_vs_fp32"]["mean_cosine"] > 0.999
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in onnx.load(str(fp16.model_path)).graph.initializer)
    out = compare_to_fp32(fp16.model_path.read_bytes(), tiny_entry.model_path, images[:4])
    assert out["images"] == 4


def test_variant_below_threshold_is_refused_and_not_stored(tiny_entry, model_store):
    images = _calibration(64, 20, seed=2)
    before = {e.key for e in model_store.entries()}
    with pytest.raises(VerificationError, match="mean cosine"):
        make_variant(
            tiny_entry,
            "int8",
            model_store,
            calibration=images[:12],
            held=images[12:],
            calibration_id="t2",
            min_mean_cosine=1.01,
        )
    assert {e.key for e in model_store.entries()} == before


def test_bad_requests(tiny_entry, model_store):
    with pytest.raises(ValueError, match="precision"):
        make_variant(tiny_entry, "int4", model_store, held=np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="calibration"):
        make_variant(tiny_entry, "int8", model_store, held=np.zeros((2, 64, 64, 3), np.uint8), calibration_id="x")


@pytest.mark.shared
def test_gptq_recovers_what_round_to_nearest_loses_on_real_weights(model_store):
    """Real ImageNet MobileNetV2 0.35 at 96 px: round-to-nearest int8 drifts from fp32; GPTQ rounding keeps it."""
    from tlpipe.backbones.export import export_backbone

    weights = shared_path("weights", "mobilenet_v2_0.35_224_no_top.h5")
    entry = export_backbone("mobilenet_v2_0.35", weights=weights, size=96, store=model_store)
    images = _calibration(96, 48, seed=3)
    calibration, held = images[:32], images[32:]
    rtn = compare_to_fp32(quantize_int8(entry.model_path, calibration, gptq=False)[0], entry.model_path, held)
    gptq = compare_to_fp32(quantize_int8(entry.model_path, calibration, gptq=True)[0], entry.model_path, held)
    assert gptq["mean_cosine"] >= 0.99
    assert 1 - gptq["mean_cosine"] < 0.7 * (1 - rtn["mean_cosine"])


def _has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.gpu
@pytest.mark.skipif("not _has_cuda()", reason="no CUDA provider in this ONNX Runtime (CI has no GPU)")
def test_fp16_runs_on_cuda_and_matches_fp32(tiny_entry, model_store):
    from tlpipe.backbones.runtime import OnnxEmbedder

    images = _calibration(64, 8, seed=4)
    fp16 = make_variant(tiny_entry, "fp16", model_store, held=images)
    gpu = OnnxEmbedder(fp16.model_path, device="cuda")
    assert gpu.provider == "CUDAExecutionProvider"
    cos = cosine_similarities(gpu(images), OnnxEmbedder(tiny_entry.model_path, device="cpu")(images))
    assert cos.mean() >= 0.999
