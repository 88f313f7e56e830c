"""Reduced-precision variants of a stored fp32 backbone, each verified against it and stored as its own entry.

- ``int8``: static QDQ quantization with ONNX Runtime's tooling (per-channel int8 weights, uint8 activations,
  min/max calibration on the user's own images), then **GPTQ weight rounding** (Frantar et al., 2022): each
  convolution's int8 weights are re-rounded one input column at a time, and each column's rounding error is
  pushed onto the columns not yet rounded in proportion to the layer's input second moments, measured on the
  same calibration images. Round-to-nearest alone is not good enough for depthwise networks: on MobileNetV2
  it gives embeddings at mean cosine 0.967 to fp32, GPTQ rounding 0.993 at the same speed.
- ``fp16``: float16 weights and arithmetic (for GPUs), uint8 input and float32 output kept.

Each variant is refused (not stored) when its embeddings' mean cosine similarity to fp32 on held-out images,
not used for calibration, is below :data:`MIN_MEAN_COSINE`; the minimum is reported.
"""

from __future__ import annotations

import logging
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from tlpipe.errors import InputError

from .deps import distribution_version, require
from .export import INPUT_NAME, VerificationError, add_metadata, cosine_similarities
from .onnx_metadata import clear_metadata
from .store import ModelStore, StoreEntry, make_key

__all__ = [
    "CALIBRATION_BATCH",
    "GPTQ_DAMPING",
    "HESSIAN_SAMPLES",
    "MIN_MEAN_COSINE",
    "PRECISIONS",
    "QUANT_FORMAT",
    "apply_gptq",
    "check_precision",
    "compare_to_fp32",
    "conv_hessians",
    "convert_fp16",
    "find_variant",
    "gptq_round",
    "make_variant",
    "quantize_int8",
    "variant_fields",
    "variant_key",
]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8", "fp16")
MIN_MEAN_COSINE = 0.99
QUANT_FORMAT = 1  # bump when the quantization recipe changes
CALIBRATION_BATCH = 8
HESSIAN_SAMPLES = 2048  # sampled output positions per calibration batch and layer
GPTQ_DAMPING = 0.01


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


def _embed(model, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """Embeddings of ``images`` from a model path or serialized bytes, on the CPU."""
    ort = require("onnxruntime")
    session = ort.InferenceSession(
        model if isinstance(model, bytes) else str(model), providers=["CPUExecutionProvider"]
    )
    return np.concatenate(
        [session.run(None, {INPUT_NAME: images[i : i + batch]})[0] for i in range(0, len(images), batch)]
    )


def compare_to_fp32(model_bytes: bytes, fp32_path: Path, held: np.ndarray) -> dict:
    """Mean and minimum cosine of the variant's embeddings to fp32 on ``held``."""
    cos = cosine_similarities(_embed(model_bytes, held), _embed(fp32_path, held))
    return {
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "images": int(len(held)),
        "threshold_mean_cosine": MIN_MEAN_COSINE,
    }


# --- int8 -------------------------------------------------------------------------------------------------------


def _attribute(node, name: str, default):
    import onnx

    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _patches(x: np.ndarray, node, rng: np.random.Generator, samples: int) -> np.ndarray:
    """Sampled im2col rows of a Conv input ``x`` (N, C, H, W): (P, C, kh*kw), ordered like the weight's (C, kh, kw)."""
    kh, kw = _attribute(node, "kernel_shape", [1, 1])
    sh, sw = _attribute(node, "strides", [1, 1])
    dh, dw = _attribute(node, "dilations", [1, 1])
    pads = _attribute(node, "pads", [0, 0, 0, 0])
    if _attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise InputError("auto_pad convolutions are not supported")  # tf2onnx writes explicit pads
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    n, _, h, w = x.shape
    oh, ow = (h - (kh - 1) * dh - 1) // sh + 1, (w - (kw - 1) * dw - 1) // sw + 1
    count = min(samples, n * oh * ow)
    ni, yi, xi = rng.integers(0, n, count), rng.integers(0, oh, count), rng.integers(0, ow, count)
    taps = [x[ni, :, yi * sh + a * dh, xi * sw + b * dw] for a in range(kh) for b in range(kw)]
    return np.stack(taps, axis=2)


def conv_hessians(model_path: Path, calibration: np.ndarray) -> dict[str, np.ndarray]:
    """Per Conv node: the second-moment matrix of its inputs over the calibration images, as GPTQ needs.
    (K, K) for ordinary convolutions (K = in-channels/group * kh * kw; group 1 only); (C, kh*kw, kh*kw) for
    depthwise ones. Other grouped convolutions are left out (and keep round-to-nearest weights)."""
    onnx = require("onnx")
    ort = require("onnxruntime")
    model = onnx.load(str(model_path))
    weights = {i.name: i for i in model.graph.initializer}
    wanted = {
        n.name: n
        for n in model.graph.node
        if n.op_type == "Conv"
        and n.input[1] in weights
        and (_attribute(n, "group", 1) == 1 or weights[n.input[1]].dims[1] == 1)
    }
    inputs = sorted({node.input[0] for node in wanted.values()})
    existing = {o.name for o in model.graph.output}
    for name in inputs:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(0)
    hessians: dict[str, np.ndarray] = {}
    for start in range(0, len(calibration), CALIBRATION_BATCH):
        outputs = dict(zip(names, session.run(None, {INPUT_NAME: calibration[start : start + CALIBRATION_BATCH]})))
        for name, node in wanted.items():
            p = _patches(outputs[node.input[0]].astype(np.float64), node, rng, HESSIAN_SAMPLES)
            if _attribute(node, "group", 1) == 1:
                flat = p.reshape(len(p), -1)
                h = flat.T @ flat
            else:
                h = np.einsum("pci,pcj->cij", p, p)
            hessians[name] = hessians[name] + h if name in hessians else h
        del outputs
    return hessians


def gptq_round(
    weights: np.ndarray,
    hessian: np.ndarray,
    scale: np.ndarray,
    qmin: int = -127,
    qmax: int = 127,
    damping: float = GPTQ_DAMPING,
) -> np.ndarray:
    """Integer weights for ``weights`` (O, K) at per-row ``scale`` (O,) that keep ``weights @ x`` close for inputs
    with second moments ``hessian`` (K, K): round a column, spread its error over the columns left (GPTQ)."""
    w = weights.astype(np.float64).copy()
    k = w.shape[1]
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h += damping * np.mean(np.diag(h)) * np.eye(k)
    upper = np.linalg.cholesky(np.linalg.inv(h)).T
    scale = np.asarray(scale, dtype=np.float64)
    q = np.zeros_like(w)
    for i in range(k):
        q[:, i] = np.clip(np.round(w[:, i] / scale), qmin, qmax)
        error = (w[:, i] - q[:, i] * scale) / upper[i, i]
        w[:, i + 1 :] -= np.outer(error, upper[i, i + 1 :])
    return q


def apply_gptq(qdq_model, float_weights: dict[str, np.ndarray], hessians: dict[str, np.ndarray]) -> int:
    """Replace the int8 weights of the QDQ model's Conv nodes by GPTQ-rounded ones at the scales ONNX Runtime
    chose; returns how many layers were re-rounded."""
    from onnx import numpy_helper

    initializers = {i.name: i for i in qdq_model.graph.initializer}
    producer = {o: n for n in qdq_model.graph.node for o in n.output}
    done = 0
    for node in qdq_model.graph.node:
        if node.op_type != "Conv" or node.name not in hessians or node.name not in float_weights:
            continue
        dq = producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in initializers:
            continue
        stored = numpy_helper.to_array(initializers[dq.input[0]])
        if stored.dtype != np.int8:
            continue
        scale = numpy_helper.to_array(initializers[dq.input[1]]).astype(np.float64).reshape(-1)
        zero = (
            numpy_helper.to_array(initializers[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] in initializers else 0
        )
        if np.any(zero != 0) or scale.size != stored.shape[0]:
            continue  # per-channel symmetric weights only
        w = float_weights[node.name]
        hessian = hessians[node.name]
        if hessian.ndim == 2:
            q = gptq_round(w.reshape(len(w), -1), hessian, scale)
        else:  # depthwise: one small problem per channel
            q = np.stack([gptq_round(w[c].reshape(1, -1), hessian[c], scale[c : c + 1])[0] for c in range(len(w))])
        initializers[dq.input[0]].CopyFrom(
            numpy_helper.from_array(q.reshape(stored.shape).astype(np.int8), dq.input[0])
        )
        done += 1
    return done


class _Batches:
    """ONNX Runtime's CalibrationDataReader protocol over an image array."""

    def __init__(self, images: np.ndarray, batch: int = CALIBRATION_BATCH):
        self._batches = iter([{INPUT_NAME: images[i : i + batch]} for i in range(0, len(images), batch)])

    def get_next(self):
        return next(self._batches, None)


def quantize_int8(fp32_path: Path, calibration: np.ndarray, gptq: bool = True) -> tuple[bytes, dict]:
    """Static QDQ int8 of ``fp32_path`` calibrated on ``calibration`` (uint8 NHWC); returns (model bytes, facts)."""
    onnx = require("onnx")
    require("onnxruntime")
    from onnx import numpy_helper
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tlpipe-int8-") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(quantized),
            _Batches(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        calibrated = time.perf_counter()
        model = onnx.load(str(quantized))
        layers = 0
        if gptq:
            prepared_model = onnx.load(str(prepared))
            initializers = {i.name: i for i in prepared_model.graph.initializer}
            float_weights = {
                n.name: numpy_helper.to_array(initializers[n.input[1]])
                for n in prepared_model.graph.node
                if n.op_type == "Conv" and n.input[1] in initializers
            }
            layers = apply_gptq(model, float_weights, conv_hessians(prepared, calibration))
    facts = {
        "method": "onnxruntime static QDQ, per-channel int8 weights, uint8 activations, min/max calibration"
        + (", GPTQ weight rounding" if gptq else ""),
        "gptq_layers": layers,
        "timings_s": {"calibrate": round(calibrated - started, 2), "gptq": round(time.perf_counter() - calibrated, 2)},
    }
    clear_metadata(model)
    return model.SerializeToString(), facts


# --- fp16 -------------------------------------------------------------------------------------------------------


def convert_fp16(fp32_path: Path) -> tuple[bytes, dict]:
    """float16 weights and arithmetic; the uint8 input and float32 output are kept."""
    onnx = require("onnx")
    require("onnxruntime")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    clear_metadata(model)
    return model.SerializeToString(), {"method": "onnxruntime.transformers.float16, io types kept"}


# --- store entries ----------------------------------------------------------------------------------------------


def variant_fields(base: StoreEntry, precision: str, calibration_id: str | None) -> dict:
    return {
        "base": base.key,
        "precision": precision,
        "calibration": calibration_id,
        "format": QUANT_FORMAT,
        "onnxruntime": distribution_version("onnxruntime"),
    }


def variant_key(base: StoreEntry, precision: str, calibration_id: str | None) -> str:
    return make_key(f"{base.key.rsplit('-', 1)[0]}-{precision}", variant_fields(base, precision, calibration_id))


def find_variant(store: ModelStore, base: StoreEntry, precision: str) -> StoreEntry | None:
    """The newest stored ``precision`` variant of ``base``, or None."""
    found = store.find(base_key=base.key, precision=precision)
    return found[0] if found else None


def make_variant(
    base: StoreEntry,
    precision: str,
    store: ModelStore,
    *,
    held: np.ndarray,
    calibration: np.ndarray | None = None,
    calibration_id: str | None = None,
    min_mean_cosine: float = MIN_MEAN_COSINE,
) -> StoreEntry:
    """Build the ``precision`` variant of the fp32 entry ``base``, verify it on ``held`` and store it.

    int8 needs ``calibration`` images (uint8 NHWC at the model's input size) disjoint from ``held``, and
    ``calibration_id`` naming them (it is part of the store key)."""
    check_precision(precision)
    if base.metadata.get("precision", "fp32") != "fp32":
        raise InputError(f"{base.key} is already {base.metadata['precision']}; start from an fp32 export")
    if precision == "fp32":
        return base
    calibration_id = calibration_id if precision == "int8" else None
    key = variant_key(base, precision, calibration_id)
    if (entry := store.get(key)) is not None:
        return entry
    if precision == "int8":
        if calibration is None or len(calibration) == 0:
            raise InputError("int8 needs calibration images (a folder or manifest of your own photos)")
        model_bytes, facts = quantize_int8(base.model_path, calibration)
    else:
        model_bytes, facts = convert_fp16(base.model_path)
    verification = compare_to_fp32(model_bytes, base.model_path, held)
    verification["threshold_mean_cosine"] = min_mean_cosine
    if verification["mean_cosine"] < min_mean_cosine:
        raise VerificationError(
            f"{precision} embeddings are too far from fp32 on {len(held)} held-out images: mean cosine "
            f"{verification['mean_cosine']:.4f} (min {verification['min_cosine']:.4f}), needs >= {min_mean_cosine}; "
            f"not stored. Calibrate on more (and more typical) images, or keep fp32"
        )
    metadata = {k: v for k, v in base.metadata.items() if k not in ("key", "model_sha256", "timings_s", "created")}
    metadata.update(
        {
            "precision": precision,
            "base_key": base.key,
            "key_fields": variant_fields(base, precision, calibration_id),
            "quantization": facts,
            "verification_vs_fp32": verification,
            "calibration": {"images": int(len(calibration)), "id": calibration_id}
            if precision == "int8" and calibration is not None
            else None,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )
    onnx = require("onnx")
    model = onnx.load_from_string(model_bytes)
    add_metadata(model, {**metadata, "key": key})
    log.info("%s variant of %s: mean cosine %.4f", precision, base.key, verification["mean_cosine"])
    return store.put(key, model.SerializeToString(), metadata)
