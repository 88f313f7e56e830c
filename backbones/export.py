"""Keras -> ONNX export with the preprocessing inside the graph, verified against Keras, stored by key.

Route (Keras 3 + TF 2.16+): wrap the Keras Applications model as ``uint8 Input -> ImagePreprocessing
-> base -> pooling`` and convert with ``tf2onnx.convert.from_keras`` at a pinned opset, with a uint8
``(None, S, S, 3)`` input signature (dynamic batch).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from .deps import distribution_version, require
from .registry import BackboneSpec, get_backbone
from .store import ModelStore, StoreEntry, make_key
from .weights import ResolvedWeights, resolve_weights

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
EXPORT_FORMAT = 1  # bump when the exported graph changes for the same inputs
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"
MAX_REL_DIFF = 1e-3  # max |onnx - keras| / max |keras|
MIN_COSINE = 0.9999


class VerificationError(RuntimeError):
    """The ONNX model does not reproduce Keras within tolerance."""


@dataclass(frozen=True)
class ExportPlan:
    """Everything that determines an export's output, known before TensorFlow is imported."""

    spec: BackboneSpec
    size: int
    layer: str | None
    pooling: str
    weights: ResolvedWeights
    opset: int = DEFAULT_OPSET

    def key_fields(self) -> dict:
        return {
            "format": EXPORT_FORMAT, "backbone": self.spec.name, "constructor": self.spec.constructor,
            "kwargs": self.spec.kwargs, "size": self.size, "layer": self.layer, "pooling": self.pooling,
            "weights": self.weights.identity, "opset": self.opset, "precision": "fp32",
            "versions": converter_versions(),
        }

    @property
    def key(self) -> str:
        parts = [self.spec.name, str(self.size), self.layer or "full", self.pooling]
        return make_key("-".join(parts), self.key_fields())

    def embedding_dim(self) -> int | None:
        if self.pooling != "none":
            return self.spec.embedding_dim(self.pooling, self.layer)
        if self.size == self.spec.default_size:
            return self.spec.embedding_dim("none", self.layer)
        return None


def converter_versions() -> dict:
    return {m: distribution_version(m) for m in ("tensorflow", "keras", "tf2onnx", "onnx")}


def plan_export(backbone: str, weights="imagenet", size: int | None = None, layer: str | None = None,
                pooling: str = "avg", weights_dir=None, opset: int = DEFAULT_OPSET, seed: int = 0) -> ExportPlan:
    """Validate the request and resolve weights; cheap (no TensorFlow)."""
    spec = get_backbone(backbone)
    size = size or spec.default_size
    if layer is not None:
        spec.cut_point(layer)
    spec.embedding_dim(pooling, layer)  # validates pooling
    resolved = resolve_weights(spec, weights, size=size, weights_dir=weights_dir, seed=seed)
    spec.check_size(size, pretrained=resolved.source == "imagenet")
    return ExportPlan(spec, size, layer, pooling, resolved, opset)


def export_backbone(backbone: str, weights="imagenet", size: int | None = None, layer: str | None = None,
                    pooling: str = "avg", weights_dir=None, store: ModelStore | None = None,
                    opset: int = DEFAULT_OPSET, seed: int = 0, force: bool = False) -> StoreEntry:
    """Export ``backbone`` to the model store (a cache hit returns the stored entry at once)."""
    plan = plan_export(backbone, weights, size, layer, pooling, weights_dir, opset, seed)
    store = store or ModelStore()
    if not force and (entry := store.get(plan.key)) is not None:
        log.info("model store hit: %s", plan.key)
        return entry
    return export_plan(plan, store)


def export_plan(plan: ExportPlan, store: ModelStore, keras_model=None, extra_metadata: dict | None = None) -> StoreEntry:
    """Build (or take) the Keras model, convert, verify, and store it under ``plan.key``."""
    require("tensorflow")
    require("tf2onnx")
    from . import keras_build

    started = time.perf_counter()
    model = keras_model if keras_model is not None else keras_build.build_embedding_model(
        plan.spec, plan.size, plan.weights, plan.layer, plan.pooling)
    built = time.perf_counter()
    onnx_model = convert(model, plan.size, plan.opset)
    converted = time.perf_counter()
    images = verification_images(plan.size)
    reference = np.asarray(model(images, training=False))
    figures = verify(onnx_model.SerializeToString(), images, reference)
    verified = time.perf_counter()
    metadata = {
        "backbone": plan.spec.name, "constructor": plan.spec.constructor, "kwargs": plan.spec.kwargs,
        "input_size": plan.size, "layer": plan.layer, "pooling": plan.pooling,
        "embedding_dim": int(reference.shape[1]), "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "channels": "RGB"},
        "output": OUTPUT_NAME, "preprocessing": plan.spec.preprocessing,
        "weights": {"source": plan.weights.source, "path": plan.weights.path, "sha256": plan.weights.sha256,
                    "seed": plan.weights.seed if plan.weights.source == "none" else None,
                    "tensor_digest": keras_build.weights_digest(model)},
        "opset": plan.opset, "precision": "fp32", "versions": converter_versions(), "key_fields": plan.key_fields(),
        "verification": figures, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "timings_s": {"build": round(built - started, 2), "convert": round(converted - built, 2),
                      "verify": round(verified - converted, 2)},
        **(extra_metadata or {}),
    }
    add_metadata(onnx_model, {**metadata, "key": plan.key})
    return store.put(plan.key, onnx_model.SerializeToString(), metadata)


def convert(model, size: int, opset: int = DEFAULT_OPSET):
    """tf2onnx conversion of a uint8-input Keras model; input ``images``, output ``embeddings``."""
    tf = require("tensorflow")
    tf2onnx = require("tf2onnx")
    signature = (tf.TensorSpec((None, size, size, 3), tf.uint8, name=INPUT_NAME),)
    onnx_model, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=opset)
    rename_output(onnx_model, OUTPUT_NAME)
    return onnx_model


def rename_output(onnx_model, name: str) -> None:
    graph = onnx_model.graph
    old = graph.output[0].name
    if old == name:
        return
    for node in graph.node:
        node.output[:] = [name if o == old else o for o in node.output]
        node.input[:] = [name if i == old else i for i in node.input]
    graph.output[0].name = name


def add_metadata(onnx_model, metadata: dict) -> None:
    """Flat keys for quick reading plus the whole record as JSON under ``tlpipe``."""
    from .onnx_metadata import write_metadata

    keys = ("key", "backbone", "input_size", "embedding_dim", "preprocessing", "pooling", "layer")
    write_metadata(onnx_model, metadata, **{k: str(metadata.get(k)) for k in keys})


def verification_images(size: int, count: int = 8) -> np.ndarray:
    """A fixed batch of real photographs: crops of scikit-learn's bundled sample images, resized."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427x640 photos, shipped with scikit-learn
    rng = np.random.default_rng(0)
    batch = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w)))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(photo[top:top + side, left:left + side])
        batch.append(np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR)))
    return np.stack(batch).astype(np.uint8)


def cosine_similarities(actual: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity (1.0 where both rows are zero)."""
    a, r = actual.astype(np.float64), reference.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(r, axis=1)
    return np.where(norms > 0, np.sum(a * r, axis=1) / np.maximum(norms, 1e-300), 1.0)


def compare_embeddings(actual: np.ndarray, reference: np.ndarray) -> dict:
    """Max abs difference, relative difference and minimum cosine similarity between two batches."""
    diff = float(np.max(np.abs(actual.astype(np.float64) - reference)))
    scale = float(np.max(np.abs(reference)))
    return {"max_abs_diff": diff, "rel_diff": diff / scale if scale > 0 else diff,
            "min_cosine": float(np.min(cosine_similarities(actual, reference))), "images": int(len(reference))}


def verify(model_bytes: bytes, images: np.ndarray, reference: np.ndarray) -> dict:
    """Run the ONNX model on CPU and compare with Keras; raise VerificationError above tolerance."""
    ort = require("onnxruntime")
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    actual = session.run(None, {INPUT_NAME: images})[0]
    if actual.shape != reference.shape:
        raise VerificationError(f"ONNX output shape {actual.shape} differs from Keras' {reference.shape}")
    figures = compare_embeddings(actual, reference)
    if figures["rel_diff"] > MAX_REL_DIFF or figures["min_cosine"] < MIN_COSINE:
        raise VerificationError(f"ONNX differs from Keras: {figures} (tolerance rel_diff <= {MAX_REL_DIFF}, "
                                f"cosine >= {MIN_COSINE}); the export was not stored")
    return {**figures, "tolerance": {"rel_diff": MAX_REL_DIFF, "min_cosine": MIN_COSINE}}


def obtain_backbone(backbone: str | None = None, weights="imagenet", size: int | None = None, layer: str | None = None,
                    pooling: str = "avg", weights_dir=None, store: ModelStore | None = None, model=None,
                    seed: int = 0) -> StoreEntry:
    """The stored export for a request, exporting it first if needed.

    ``model`` names a store key or a folder holding an export (e.g. a fine-tune's output) and wins over
    ``backbone``. Without TensorFlow, a stored entry made by other converter versions is accepted.
    """
    store = store or ModelStore()
    if model is not None:
        entry = store.resolve(model)
        entry.verify()
        return entry
    if backbone is None:
        raise ValueError("name a backbone (or a stored model)")
    plan = plan_export(backbone, weights, size, layer, pooling, weights_dir, seed=seed)
    entry = store.get(plan.key)
    if entry is None and distribution_version("tensorflow") is None:
        wanted = {k: v for k, v in plan.key_fields().items() if k != "versions"}
        matches = [e for e in store.entries() if {k: v for k, v in e.metadata.get("key_fields", {}).items() if k != "versions"} == wanted]
        entry = max(matches, key=lambda e: e.metadata.get("created", ""), default=None)
    if entry is None:
        entry = export_plan(plan, store)
    entry.verify()
    return entry
