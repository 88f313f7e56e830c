"""A TensorFlow Lite classifier for phones: the same classifier as the fused ONNX model, converted by TensorFlow.

:func:`export_tflite` rebuilds the head's backbone as the verified Keras wrapper the ONNX backbone was exported from
(:func:`tlpipe.backbones.keras_build.build_embedding_model`: uint8 RGB in, preprocessing inside, the same weights,
checked by their tensor digest), puts the head's weights after it as Keras layers
(:mod:`tlpipe.pipeline.scoring.keras_head`) and converts the whole with TensorFlow's own ``tf.lite.TFLiteConverter``:

- ``fp32``: float32 throughout;
- ``fp16``: float16 weights (half the file), dequantized to float32 when the interpreter loads them;
- ``int8``: full-integer post-training quantization calibrated on the user's photos (``--images``): int8 weights
  and activations where TFLite has int8 kernels, float elsewhere; the uint8 image input and the float32 outputs
  are kept.

Before anything is written the model runs in the TFLite interpreter on real photos and is compared with the Python
path (the ONNX backbone, then the head's ``predict_proba``): fp32 within :data:`FP32_TOLERANCE`, fp16 within
:data:`FP16_TOLERANCE`; int8 is checked on held-out photos not used for calibration, against the Python head,
with at least :data:`INT8_MIN_AGREEMENT` of the labels and a mean |diff| of at most :data:`INT8_MAX_MEAN_DIFF`.

The model has one input, ``images`` (N, S, S, 3) uint8 RGB, and two outputs, ``probabilities`` (N, C) float32
and ``label`` (N,) int64 (an index into the class names). The class names, input size, pixel settings and the
verification figures go in a JSON file beside it (``classifier.tflite.json``), which ``tlpipe score`` reads.

The interpreter is LiteRT's (``ai-edge-litert``, which needs no TensorFlow) when installed, else
``tf.lite.Interpreter``; both are imported only when a TFLite model is run.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from tlpipe.backbones.atomic import atomic_write
from tlpipe.backbones.deps import distribution_version, require
from tlpipe.backbones.export import INPUT_NAME
from tlpipe.backbones.store import ModelStore
from tlpipe.errors import InputError
from tlpipe.features.stream import Runner, StageModel
from tlpipe.pipeline.scoring.fuse import LABEL, PROBABILITIES, FuseError, HeadToExport, compare, load_for_export

__all__ = [
    "FORMAT",
    "FP16_TOLERANCE",
    "FP32_TOLERANCE",
    "INT8_MAX_MEAN_DIFF",
    "INT8_MIN_AGREEMENT",
    "PRECISIONS",
    "SIDECAR_SUFFIX",
    "TfliteModel",
    "TfliteSession",
    "VERIFY_IMAGES",
    "build_keras_classifier",
    "convert",
    "export_tflite",
    "keras_backbone",
    "read_sidecar",
    "sidecar_path",
    "verify",
]

PRECISIONS = ("fp32", "fp16", "int8")
FP32_TOLERANCE = 1e-4
# fp16 weights move every probability by the rounding of every weight: on cats_vs_dogs (MobileNetV2 1.0 + logreg,
# 63 held-out photos) max |diff| 0.035, mean 7e-4, labels all equal. Argmax changes are allowed only where the
# Python head's two best classes are within this tolerance.
FP16_TOLERANCE = 0.05
# int8 activations move more (same photos: max |diff| 0.036, mean 0.004, labels all equal): checked on held-out
# photos not used for calibration.
INT8_MIN_AGREEMENT = 0.95
INT8_MAX_MEAN_DIFF = 0.03
SIDECAR_SUFFIX = ".json"
VERIFY_IMAGES = 32
FORMAT = 1


def sidecar_path(model: str | os.PathLike) -> Path:
    """The metadata file beside a TFLite classifier: ``<model>.json``."""
    return Path(str(model) + SIDECAR_SUFFIX)


def read_sidecar(model: str | os.PathLike) -> dict:
    """The record written beside a TFLite classifier.

    Raises
    ------
    FuseError
        No readable record, or not a tlpipe classifier's.
    """
    path = sidecar_path(model)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FuseError(
            f"{model}: its metadata file {path.name} is missing or unreadable ({exc}); a tlpipe TFLite classifier "
            f"is written with it by `tlpipe export-model --format tflite`"
        ) from None
    if record.get("kind") != "classifier" or "class_names" not in record or "input_size" not in record:
        raise FuseError(f"{path} is not the record of a tlpipe TFLite classifier")
    return record


# -- the interpreter ---------------------------------------------------------------------------------------
def _interpreter_class():
    """LiteRT's interpreter, or TensorFlow's where TensorFlow is already loaded in this process (the export) or
    LiteRT is not installed: two TFLite runtimes in one process corrupt each other's memory (measured: a crash)."""
    if "tensorflow" not in sys.modules:
        try:
            from ai_edge_litert.interpreter import Interpreter

            return Interpreter, "ai-edge-litert " + (distribution_version("ai-edge-litert") or "")
        except ImportError:
            pass
    tf = require("tensorflow")
    return tf.lite.Interpreter, "tf.lite " + tf.__version__


class TfliteSession:
    """``streams`` TFLite interpreters of one model, each used by one caller at a time; the interface of
    :class:`tlpipe.backbones.runtime.OnnxEmbedder` that the streaming stage uses (``run_outputs``, ``streams``,
    ``provider``).

    Parameters
    ----------
    model : path or bytes
        The ``.tflite`` file, or its bytes.
    threads : int, optional
        Threads per interpreter (default: the cores split over ``streams``).
    streams : int
        Interpreters (concurrent calls).
    """

    def __init__(self, model: str | os.PathLike | bytes, threads: int | None = None, streams: int = 1):
        from tlpipe.backbones.runtime import physical_cores

        interpreter, self.runtime = _interpreter_class()
        content = model if isinstance(model, bytes) else Path(model).read_bytes()
        per_stream = threads or max(1, physical_cores() // max(1, streams))
        with warnings.catch_warnings():  # tf.lite.Interpreter announces its move to ai-edge-litert
            warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated", category=UserWarning)
            self._free = [
                interpreter(model_content=content, num_threads=per_stream).get_signature_runner()
                for _ in range(max(1, streams))
            ]
        self.streams = len(self._free)
        self._lock = threading.Condition()
        self.provider = f"TFLite ({self.runtime.strip()}, CPU)"
        self.output_names = sorted(self._free[0].get_output_details())

    def run_outputs(self, images: np.ndarray, names: list[str] | None = None) -> list[np.ndarray]:
        """The outputs ``names`` (default: all, sorted) on uint8 (N, S, S, 3) ``images``."""
        with self._lock:
            self._lock.wait_for(lambda: bool(self._free))
            runner = self._free.pop()
        try:
            outputs = runner(**{INPUT_NAME: np.ascontiguousarray(images, np.uint8)})
        finally:
            with self._lock:
                self._free.append(runner)
                self._lock.notify()
        return [np.asarray(outputs[n]) for n in (names or self.output_names)]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.run_outputs(images, [PROBABILITIES])[0]


@dataclass(frozen=True)
class TfliteModel(StageModel):
    """A TFLite classifier as the streaming stage's model: uint8 (N, S, S, 3) -> probabilities (N, C)."""

    def load(
        self, device: str = "auto", threads: int | None = None, streams: int = 1, path: Path | None = None
    ) -> Runner:
        """Interpreters for this model on the CPU (``device`` "cuda" is refused: TFLite runs here on the CPU)."""
        if device == "cuda":
            raise FuseError("--device cuda: a TFLite classifier runs on the CPU here; use the ONNX classifier on a GPU")
        session = TfliteSession(path or self.path, threads=threads, streams=streams)
        return Runner([(session, list(self.outputs) or [PROBABILITIES])], self.then)


# -- building and converting -------------------------------------------------------------------------------
def keras_backbone(entry):
    """The Keras model the store entry ``entry`` was exported from, rebuilt with the same weights.

    Raises
    ------
    FuseError
        A reduced-precision variant, a weights file that is gone or changed, or weights whose tensor digest differs
        from the one recorded at export.
    """
    from tlpipe.backbones import keras_build
    from tlpipe.backbones.registry import get_backbone
    from tlpipe.backbones.weights import ResolvedWeights, sha256_file

    meta = entry.metadata
    if meta.get("precision", "fp32") != "fp32":
        raise FuseError(
            f"the head was trained on the {meta['precision']} variant {entry.key}; the TFLite classifier is built "
            f"from fp32 Keras weights: fit the head on fp32 embeddings and use --precision {meta['precision']} here"
        )
    w = meta.get("weights") or {}
    if not meta.get("backbone") or "source" not in w:
        raise FuseError(f"store entry {entry.key} does not record how its Keras model was built")
    if w["source"] == "file":
        path = Path(w.get("path") or "")
        if not path.is_file():
            raise FuseError(f"the backbone's weights file {path} (sha256 {str(w.get('sha256'))[:12]}) is not there")
        if w.get("sha256") and sha256_file(path) != w["sha256"]:
            raise FuseError(f"the backbone's weights file {path} changed since the export (sha256 differs)")
    weights = ResolvedWeights(w["source"], w.get("path"), w.get("sha256"), int(w.get("seed") or 0))
    spec = get_backbone(meta["backbone"])
    model = keras_build.build_embedding_model(
        spec,
        int(meta.get("backbone_size") or meta["input_size"]),
        weights,
        meta.get("layer"),
        meta.get("pooling", "avg"),
        tta=meta.get("tta") or "none",
    )
    recorded = w.get("tensor_digest")
    if recorded and "derived_from" not in meta and keras_build.weights_digest(model) != recorded:
        raise FuseError(
            f"the rebuilt Keras backbone's weights differ from those {entry.key} was exported with (tensor digest)"
        )
    return model


def build_keras_classifier(head: HeadToExport):
    """uint8 images -> {probabilities, label}: the backbone, then the head's layers.

    Raises
    ------
    FuseError
        The head has no Keras form (the rbf-svm head: a kernel against its support vectors), or its backbone cannot
        be rebuilt.
    """
    keras = require("keras")
    from tlpipe.pipeline.scoring import keras_head
    from tlpipe.pipeline.scoring.portable_head import UnsupportedHead, head_ops, uses_kernel

    try:
        ops = head_ops(head.estimator)
        if uses_kernel(ops):
            raise UnsupportedHead("a kernel SVM (against its support vectors) has no Keras layer here")
    except UnsupportedHead as exc:
        raise FuseError(
            f"head {head.name!r} cannot be written as Keras layers for TFLite: {exc}. Ship it as the ONNX classifier "
            f"(export-model --format onnx: ONNX Runtime, OpenCV DNN, onnxruntime-mobile), or fit a logreg, svm or "
            f"mlp head for TFLite"
        ) from exc
    backbone = keras_backbone(head.entry)
    images = keras.Input(backbone.input_shape[1:], dtype="uint8", name=INPUT_NAME)
    probabilities = keras_head.apply_head(ops, backbone(images))
    return keras.Model(images, probabilities, name="tlpipe_classifier")


def convert(model, input_size: int, precision: str, calibration: np.ndarray | None = None) -> bytes:
    """``tf.lite.TFLiteConverter`` on ``model`` with a uint8 (None, S, S, 3) input signature; outputs
    ``probabilities`` and ``label``. ``calibration`` (uint8, int8 only): the representative images."""
    tf = require("tensorflow")
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")

    keras = require("keras")

    def classify(images):
        probabilities = model(images, training=False)
        return {PROBABILITIES: probabilities, LABEL: tf.argmax(probabilities, axis=1, output_type=tf.int64)}

    # Through a SavedModel written by Keras' ExportArchive (which tracks the Keras 3 variables; a plain tf.Module
    # does not), so the converter freezes them and keeps the signature's input and output names.
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        classify,
        input_signature=[tf.TensorSpec((None, input_size, input_size, 3), tf.uint8, name=INPUT_NAME)],
    )
    with tempfile.TemporaryDirectory(prefix="tlpipe-tflite-") as tmp:
        archive.write_out(tmp, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        return _convert(tf, converter, precision, calibration)


def _convert(tf, converter, precision: str, calibration: np.ndarray | None) -> bytes:
    if precision == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif precision == "int8":
        if calibration is None or not len(calibration):
            raise FuseError("int8 is calibrated on your own photos: give a folder or manifest of them (--images)")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([calibration[i : i + 1]] for i in range(len(calibration)))
        # int8 kernels where TFLite has them, float for the rest
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
        return _int8_float_head(tf, converter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return converter.convert()


def _int8_float_head(tf, converter) -> bytes:
    """int8 for the backbone, float for the head: TensorFlow's selective quantization
    (``tf.lite.experimental.QuantizationDebugger`` with ``denylisted_nodes``, as its quantization-debugging guide
    shows), the head's nodes found by the Keras layer names' prefix. Quantizing the head too gained no speed (a few
    small matrices) and cost accuracy: the svm head's calibrated softmax on int8 logits moved probabilities by up
    to 0.26 on 63 cats_vs_dogs photos (mean 0.011); with the head in float, 0.077 (mean 0.004)."""
    from tlpipe.pipeline.scoring.keras_head import HEAD_PREFIX

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=converter.representative_dataset
        )
        calibrated = tf.lite.Interpreter(model_content=debugger.calibrated_model)
        nodes = [t["name"] for t in calibrated.get_tensor_details() if HEAD_PREFIX in t["name"]]
        nodes += [t["name"] for t in calibrated.get_output_details()]
        debugger.options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=nodes)
        return debugger.get_nondebug_quantized_model()


def _run(model_bytes: bytes, pixels: np.ndarray, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    try:
        session = TfliteSession(model_bytes)
        parts = [
            session.run_outputs(pixels[i : i + batch], [PROBABILITIES, LABEL]) for i in range(0, len(pixels), batch)
        ]
    except (RuntimeError, ValueError) as exc:  # the interpreter's own errors (a delegate that cannot prepare...)
        raise FuseError(f"the TFLite interpreter cannot run the converted model: {' '.join(str(exc).split())}") from exc
    return np.concatenate([p for p, _ in parts]), np.concatenate([lab for _, lab in parts])


def verify(model_bytes: bytes, pixels: np.ndarray, reference: np.ndarray, precision: str) -> dict:
    """The TFLite model against the Python head's probabilities ``reference`` on ``pixels``.

    Raises
    ------
    FuseError
        Beyond the tolerance of ``precision``; nothing is written.
    """
    proba, label = _run(model_bytes, pixels)
    if precision == "int8":
        agreement = float(np.mean(label == reference.argmax(axis=1))) if len(reference) else 1.0
        diff = np.abs(proba.astype(np.float64) - reference)
        figures = {
            "images": int(len(reference)),
            "label_agreement": agreement,
            "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
            "max_abs_diff": float(diff.max()) if diff.size else 0.0,
            "min_label_agreement": INT8_MIN_AGREEMENT,
            "max_mean_abs_diff": INT8_MAX_MEAN_DIFF,
        }
        if agreement < INT8_MIN_AGREEMENT or figures["mean_abs_diff"] > INT8_MAX_MEAN_DIFF:
            raise FuseError(
                f"the int8 TFLite classifier is too far from the Python head on {len(reference)} held-out photos: "
                f"{figures}; nothing was written. Calibrate on more (and more typical) photos, or use fp16 / fp32"
            )
        return figures
    tolerance = FP32_TOLERANCE if precision == "fp32" else FP16_TOLERANCE
    figures = compare(proba, label, reference, tolerance)
    if figures["argmax_mismatch"] or figures["max_abs_diff"] > tolerance:
        raise FuseError(
            f"the {precision} TFLite classifier differs from the Python head: {figures}; nothing was written"
        )
    return figures


def export_tflite(
    head_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    precision: str = "fp32",
    images: list[str | os.PathLike] | None = None,
    trust: bool = False,
    store: ModelStore | str | os.PathLike | None = None,
) -> dict:
    """Write the saved head ``head_path`` with its backbone as the TFLite classifier ``out`` and its record
    ``<out>.json``.

    Parameters
    ----------
    precision : str
        ``fp32`` | ``fp16`` | ``int8`` (see the module).
    images : list of path, optional
        Photos like the ones to classify: fp32 / fp16 are verified on up to 32 of them (default: crops of
        scikit-learn's sample photos); int8 needs them: calibrated on a sample, verified on others.

    Returns
    -------
    dict
        The record written beside the model (class names, input, head, backbone, verification, sizes).

    Raises
    ------
    FuseError
        The head has no Keras form (rbf-svm), its backbone cannot be rebuilt, int8 without images, or the model
        is beyond its precision's tolerance (nothing is written).
    """
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    out = Path(out)
    if out.is_dir():
        raise FuseError(f"{out} is a folder; give the model file's path, e.g. {out / 'classifier.tflite'}")
    if not out.parent.is_dir():
        raise FuseError(f"cannot write {out}: folder {out.parent} does not exist")
    if precision == "int8" and not images:
        raise FuseError("int8 is calibrated on your own photos: give a folder or manifest of them (--images)")
    tf = require("tensorflow")
    head = load_for_export(head_path, trust=trust, store=store)
    started = time.perf_counter()
    model = build_keras_classifier(head)
    calibration = None
    if precision == "int8":
        from tlpipe.features.calibration import sample_images
        from tlpipe.features.sources import ImageRecord

        records = [ImageRecord(str(p), os.path.abspath(p), None, None) for p in images or []]
        sample = sample_images(records, head.entry.input_size, head.resize, resize_filter=head.resize_filter)
        calibration, pixels = sample.calibration, sample.held
    else:
        pixels = head.pixels(list(images)[:VERIFY_IMAGES] if images else None)
    built = time.perf_counter()
    model_bytes = convert(model, head.entry.input_size, precision, calibration)
    converted = time.perf_counter()
    figures = verify(model_bytes, pixels, head.reference(pixels), precision)
    record = head.record() | {
        "format": FORMAT,
        "runtime": "tflite",
        "precision": precision,
        "outputs": {
            PROBABILITIES: "float32 (N, C), columns in class_names order",
            LABEL: "int64 (N,), index into class_names",
        },
        "calibration": {"images": int(len(calibration))} if calibration is not None else None,
        "verification": figures,
        "bytes": len(model_bytes),
        "timings_s": {"build": round(built - started, 2), "convert": round(converted - built, 2)},
        "versions": {"tensorflow": tf.__version__, "keras": distribution_version("keras")},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write(out, model_bytes)
    atomic_write(sidecar_path(out), json.dumps(record, indent=2, sort_keys=True))
    return record
