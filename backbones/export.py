"""Keras -> ONNX export with the preprocessing inside the graph, verified against Keras, stored by key.

Route (Keras 3 + TF 2.16+): wrap the Keras Applications model as ``uint8 Input -> [TTA views] ->
ImagePreprocessing -> base -> pooling -> [view mean]`` and convert with ``tf2onnx.convert.from_keras`` at a
pinned opset, with a uint8 ``(None, R, R, 3)`` input signature (dynamic batch; ``R`` is the input size, or
the larger decode of :mod:`backbones.tta` for ``flip+crops``).

Several cut points at one size export as one model with one output per layer (the trunk runs once);
each output is verified against Keras, and each is also stored as a one-output model of its own (the
multi-output graph pruned to that output) under the key a single export of that layer would have: the
feature set's identity does not depend on how many layers were extracted together.

A concatenated cut point ``a+b`` (:func:`backbones.registry.layer_parts`) is one output: the parts pooled and
concatenated inside the Keras model before conversion, so it is verified and stored like any one-output
export; its layer spec is in the key fields (``"layer": "a+b"``) and the key (``…-a_plus_b-…``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from tlpipe.errors import InputError, TlpipeError

from .deps import distribution_version, require
from .registry import CONCAT, BackboneSpec, get_backbone, layer_parts
from .store import ModelStore, StoreEntry, make_key
from .tta import check_tta, decode_size, slug, view_count
from .weights import ResolvedWeights, resolve_weights

__all__ = [
    "DEFAULT_OPSET",
    "EXPORT_FORMAT",
    "ExportPlan",
    "FeatureModel",
    "MAX_REL_DIFF",
    "MIN_COSINE",
    "MultiExportPlan",
    "VerificationError",
    "add_metadata",
    "compare_embeddings",
    "convert",
    "converter_versions",
    "cosine_similarities",
    "export_backbone",
    "export_layers",
    "export_multi",
    "export_plan",
    "layer_slug",
    "obtain_backbone",
    "obtain_layers",
    "plan_export",
    "rename_output",
    "verification_images",
    "verify",
]

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
EXPORT_FORMAT = 1  # bump when the exported graph changes for the same inputs
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"
MAX_REL_DIFF = 1e-3  # max |onnx - keras| / max |keras|
MIN_COSINE = 0.9999


class VerificationError(TlpipeError, RuntimeError):
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
    tta: str = "none"

    def key_fields(self) -> dict:
        fields = {
            "format": EXPORT_FORMAT,
            "backbone": self.spec.name,
            "constructor": self.spec.constructor,
            "kwargs": self.spec.kwargs,
            "size": self.size,
            "layer": self.layer,
            "pooling": self.pooling,
            "weights": self.weights.identity,
            "opset": self.opset,
            "precision": "fp32",
            "versions": converter_versions(),
        }
        if self.tta != "none":  # absent for none: keys of exports made before TTA existed stay valid
            fields["tta"] = self.tta
        return fields

    @property
    def key(self) -> str:
        parts = [self.spec.name, str(self.size), layer_slug(self.layer), self.pooling]
        if self.tta != "none":
            parts.append(slug(self.tta))
        return make_key("-".join(parts), self.key_fields())

    @property
    def input_size(self) -> int:
        """The side of the uint8 images the model takes (larger than ``size`` for flip+crops)."""
        return decode_size(self.size, self.tta)

    def embedding_dim(self) -> int | None:
        if self.pooling != "none":
            return self.spec.embedding_dim(self.pooling, self.layer)
        if self.size == self.spec.default_size:
            return self.spec.embedding_dim("none", self.layer)
        return None


def layer_slug(layer: str | None) -> str:
    """The layer as it appears in a model-store key: ``full`` for the last output, a concatenation's ``+``
    spelled ``_plus_`` (no ``+`` in keys, as for TTA modes)."""
    return "full" if layer is None else layer.replace(CONCAT, "_plus_")


def converter_versions() -> dict:
    return {m: distribution_version(m) for m in ("tensorflow", "keras", "tf2onnx", "onnx")}


def plan_export(
    backbone: str,
    weights="imagenet",
    size: int | None = None,
    layer: str | None = None,
    pooling: str = "avg",
    weights_dir=None,
    opset: int = DEFAULT_OPSET,
    seed: int = 0,
    tta: str = "none",
) -> ExportPlan:
    """Validate the request and resolve weights; cheap (no TensorFlow)."""
    spec = get_backbone(backbone)
    size = size or spec.default_size
    check_tta(tta)
    if layer is not None:
        layer = CONCAT.join(layer_parts(layer))  # "a + b" -> "a+b": one spelling, one key
        spec.cut_point(layer)
    spec.embedding_dim(pooling, layer)  # validates pooling
    resolved = resolve_weights(spec, weights, size=size, weights_dir=weights_dir, seed=seed)
    spec.check_size(size, pretrained=resolved.source == "imagenet")
    return ExportPlan(spec, size, layer, pooling, resolved, opset, tta)


@dataclass(frozen=True)
class MultiExportPlan:
    """Several cut points of one backbone at one size and TTA, exported as one model with one output each."""

    plans: tuple[ExportPlan, ...]

    def __post_init__(self):
        if len(self.plans) < 2:
            raise InputError("a multi-output export needs at least two layers")
        first = self.plans[0]
        same = {(p.spec.name, p.size, p.pooling, p.weights, p.opset, p.tta) for p in self.plans}
        if len(same) != 1:
            raise InputError("the layers of a multi-output export share backbone, size, pooling, weights and TTA")
        layers = [p.layer for p in self.plans]
        if len(set(layers)) != len(layers):
            raise InputError(f"layer named twice in {[first.spec.name if x is None else x for x in layers]}")

    @property
    def spec(self) -> BackboneSpec:
        return self.plans[0].spec

    @property
    def input_size(self) -> int:
        return self.plans[0].input_size

    @property
    def layers(self) -> list[str | None]:
        return [p.layer for p in self.plans]

    @property
    def output_names(self) -> list[str]:
        """ONNX output names, one per layer in order: ``embeddings/<layer>`` (``embeddings/full`` for None)."""
        return [f"{OUTPUT_NAME}/{layer or 'full'}" for layer in self.layers]

    def key_fields(self) -> dict:
        return {"format": EXPORT_FORMAT, "outputs": [p.key_fields() for p in self.plans]}

    @property
    def key(self) -> str:
        first = self.plans[0]
        parts = [first.spec.name, str(first.size), f"{len(self.plans)}layers", first.pooling]
        if first.tta != "none":
            parts.append(slug(first.tta))
        return make_key("-".join(parts), self.key_fields())


@dataclass(frozen=True)
class FeatureModel:
    """The model an extraction runs and the feature set each of its outputs fills.

    ``entry`` is the model to run; ``outputs`` pairs each ONNX output name with the store entry that
    identifies its feature set (the one-output model of that layer; for a one-output model, ``entry`` itself).
    """

    entry: StoreEntry
    outputs: tuple[tuple[str, StoreEntry], ...]

    @property
    def input_size(self) -> int:
        return self.entry.input_size


def export_backbone(
    backbone: str,
    weights="imagenet",
    size: int | None = None,
    layer: str | None = None,
    pooling: str = "avg",
    weights_dir=None,
    store: ModelStore | None = None,
    opset: int = DEFAULT_OPSET,
    seed: int = 0,
    force: bool = False,
    tta: str = "none",
) -> StoreEntry:
    """Export ``backbone`` to the model store (a cache hit returns the stored entry at once)."""
    plan = plan_export(backbone, weights, size, layer, pooling, weights_dir, opset, seed, tta)
    store = store or ModelStore()
    if not force and (entry := store.get(plan.key)) is not None:
        log.info("model store hit: %s", plan.key)
        return entry
    return export_plan(plan, store)


def export_layers(
    backbone: str,
    layers: list[str | None],
    weights="imagenet",
    size: int | None = None,
    pooling: str = "avg",
    weights_dir=None,
    store: ModelStore | None = None,
    opset: int = DEFAULT_OPSET,
    seed: int = 0,
    force: bool = False,
    tta: str = "none",
) -> FeatureModel:
    """Export several cut points of ``backbone`` (``None`` = its last output) as one multi-output model.

    Parameters
    ----------
    backbone, weights, size, pooling, weights_dir, opset, seed, tta
        As for :func:`export_backbone`; shared by every layer.
    layers : list of str or None
        Cut points from the registry (``tlpipe backbones --cuts``), in output order. One layer gives a
        plain one-output export.
    store : ModelStore, optional
        Where the multi-output model and each layer's one-output model are stored.
    force : bool
        Export again even when the store holds the models.

    Returns
    -------
    FeatureModel
        The model to run (outputs ``embeddings/<layer>``, float32 (N, D_layer)) and, per output, the
        store entry of that layer's one-output model, whose key is the feature set's key.

    Raises
    ------
    VerificationError
        Any output differs from Keras beyond tolerance (nothing is stored).
    """
    store = store or ModelStore()
    plans = [plan_export(backbone, weights, size, layer, pooling, weights_dir, opset, seed, tta) for layer in layers]
    if len(plans) == 1:
        entry = export_backbone(
            backbone, weights, size, layers[0], pooling, weights_dir, store, opset, seed, force, tta
        )
        return FeatureModel(entry, ((OUTPUT_NAME, entry),))
    multi = MultiExportPlan(tuple(plans))
    if not force:
        found = _stored_multi(multi, store)
        if found is not None:
            return found
    return export_multi(multi, store)


def _stored_multi(multi: MultiExportPlan, store: ModelStore, any_versions: bool = False) -> FeatureModel | None:
    """The stored multi-output model and its per-layer entries, or None when any is missing."""
    entry = store.get(multi.key)
    if entry is None and any_versions:
        entry = _match_unversioned(store, multi.key_fields())
    if entry is None:
        return None
    singles = [store.get(o["key"]) for o in entry.metadata.get("outputs", [])]
    present = [s for s in singles if s is not None]
    if len(singles) != len(multi.plans) or len(present) != len(singles):
        return None
    return FeatureModel(entry, tuple(zip(multi.output_names, present)))


def _unversioned(fields):
    if isinstance(fields, dict):
        return {k: _unversioned(v) for k, v in fields.items() if k != "versions"}
    if isinstance(fields, list):
        return [_unversioned(v) for v in fields]
    return fields


def _match_unversioned(store: ModelStore, key_fields: dict) -> StoreEntry | None:
    """The newest entry whose key fields equal ``key_fields`` but for converter versions."""
    wanted = _unversioned(key_fields)
    matches = [e for e in store.entries() if _unversioned(e.metadata.get("key_fields", {})) == wanted]
    return max(matches, key=lambda e: e.metadata.get("created", ""), default=None)


def export_plan(
    plan: ExportPlan, store: ModelStore, keras_model=None, extra_metadata: dict | None = None
) -> StoreEntry:
    """Build (or take) the Keras model, convert, verify, and store it under ``plan.key``."""
    require("tensorflow")
    require("tf2onnx")
    from . import keras_build

    started = time.perf_counter()
    model = (
        keras_model
        if keras_model is not None
        else keras_build.build_embedding_model(
            plan.spec, plan.size, plan.weights, plan.layer, plan.pooling, tta=plan.tta
        )
    )
    built = time.perf_counter()
    onnx_model = convert(model, plan.input_size, plan.opset)
    converted = time.perf_counter()
    images = verification_images(plan.input_size)
    reference = np.asarray(model(images, training=False))
    figures = verify(onnx_model.SerializeToString(), images, reference)
    verified = time.perf_counter()
    metadata = {
        **_plan_metadata(plan, int(reference.shape[1]), keras_build.weights_digest(model)),
        "verification": figures,
        "timings_s": {
            "build": round(built - started, 2),
            "convert": round(converted - built, 2),
            "verify": round(verified - converted, 2),
        },
        **(extra_metadata or {}),
    }
    add_metadata(onnx_model, {**metadata, "key": plan.key})
    return store.put(plan.key, onnx_model.SerializeToString(), metadata)


def _plan_metadata(plan: ExportPlan, dim: int, tensor_digest: str) -> dict:
    """The metadata record of a one-output export of ``plan`` (before verification figures)."""
    return {
        "backbone": plan.spec.name,
        "constructor": plan.spec.constructor,
        "kwargs": plan.spec.kwargs,
        "input_size": plan.input_size,
        "backbone_size": plan.size,
        "tta": plan.tta,
        "views": view_count(plan.tta),
        "layer": plan.layer,
        "pooling": plan.pooling,
        "embedding_dim": dim,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "channels": "RGB"},
        "output": OUTPUT_NAME,
        "preprocessing": plan.spec.preprocessing,
        "weights": {
            "source": plan.weights.source,
            "path": plan.weights.path,
            "sha256": plan.weights.sha256,
            "seed": plan.weights.seed if plan.weights.source == "none" else None,
            "tensor_digest": tensor_digest,
        },
        "opset": plan.opset,
        "precision": "fp32",
        "versions": converter_versions(),
        "key_fields": plan.key_fields(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def export_multi(multi: MultiExportPlan, store: ModelStore) -> FeatureModel:
    """Build the multi-output Keras model, convert, verify every output, store it and each layer's
    one-output model (the converted graph pruned to that output, verified again on its own)."""
    require("tensorflow")
    require("tf2onnx")
    import onnx
    from onnx.utils import Extractor

    from . import keras_build

    first = multi.plans[0]
    started = time.perf_counter()
    model = keras_build.build_multi_output_model(
        first.spec, first.size, first.weights, multi.layers, first.pooling, tta=first.tta
    )
    built = time.perf_counter()
    onnx_model = convert(model, multi.input_size, first.opset, multi.output_names)
    converted = time.perf_counter()
    images = verification_images(multi.input_size)
    references = [np.asarray(r) for r in model(images, training=False)]
    model_bytes = onnx_model.SerializeToString()
    figures = verify(model_bytes, images, references, multi.output_names)
    verified = time.perf_counter()
    digest = keras_build.weights_digest(model)
    singles = []
    for plan, name, reference in zip(multi.plans, multi.output_names, references):
        pruned = Extractor(onnx_model).extract_model([INPUT_NAME], [name])
        rename_output(pruned, OUTPUT_NAME)
        single_bytes = pruned.SerializeToString()
        single_figures = verify(single_bytes, images, reference)
        meta = {
            **_plan_metadata(plan, int(reference.shape[1]), digest),
            "verification": single_figures,
            "derived_from": {
                "key": multi.key,
                "output": name,
                "how": "the multi-output graph pruned to this output (onnx.utils.Extractor)",
            },
        }
        del pruned.metadata_props[:]
        add_metadata(pruned, {**meta, "key": plan.key})
        singles.append(store.put(plan.key, pruned.SerializeToString(), meta))
    outputs = [
        {"name": name, "layer": plan.layer, "key": plan.key, "embedding_dim": int(ref.shape[1])}
        for plan, name, ref in zip(multi.plans, multi.output_names, references)
    ]
    metadata = {
        **{
            k: v
            for k, v in _plan_metadata(first, 0, digest).items()
            if k not in ("layer", "embedding_dim", "output", "key_fields")
        },
        "layers": multi.layers,
        "outputs": outputs,
        "key_fields": multi.key_fields(),
        "verification": figures,
        "timings_s": {
            "build": round(built - started, 2),
            "convert": round(converted - built, 2),
            "verify": round(verified - converted, 2),
        },
    }
    add_metadata(onnx_model, {**metadata, "key": multi.key})
    entry = store.put(multi.key, onnx_model.SerializeToString(), metadata)
    onnx.checker.check_model(onnx.load(str(entry.model_path)))
    return FeatureModel(entry, tuple(zip(multi.output_names, singles)))


def convert(model, size: int, opset: int = DEFAULT_OPSET, output_names: list[str] | None = None):
    """tf2onnx conversion of a uint8-input Keras model; input ``images`` (None, size, size, 3), outputs
    ``embeddings`` (or ``output_names``, one per Keras output in order)."""
    tf = require("tensorflow")
    tf2onnx = require("tf2onnx")
    signature = (tf.TensorSpec((None, size, size, 3), tf.uint8, name=INPUT_NAME),)
    onnx_model, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=opset)
    names = output_names or [OUTPUT_NAME]
    if len(names) != len(onnx_model.graph.output):
        raise VerificationError(
            f"the converted model has {len(onnx_model.graph.output)} outputs, {len(names)} expected"
        )
    for index, name in enumerate(names):
        rename_output(onnx_model, name, index)
    return onnx_model


def rename_output(onnx_model, name: str, index: int = 0) -> None:
    """Rename graph output ``index`` (and every reference to it) to ``name``."""
    graph = onnx_model.graph
    old = graph.output[index].name
    if old == name:
        return
    for node in graph.node:
        node.output[:] = [name if o == old else o for o in node.output]
        node.input[:] = [name if i == old else i for i in node.input]
    graph.output[index].name = name


def add_metadata(onnx_model, metadata: dict) -> None:
    """Flat keys for quick reading plus the whole record as JSON under ``tlpipe``."""
    from .onnx_metadata import write_metadata

    keys = ("key", "backbone", "input_size", "embedding_dim", "preprocessing", "pooling", "layer", "tta")
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
        crop = Image.fromarray(photo[top : top + side, left : left + side])
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
    return {
        "max_abs_diff": diff,
        "rel_diff": diff / scale if scale > 0 else diff,
        "min_cosine": float(np.min(cosine_similarities(actual, reference))),
        "images": int(len(reference)),
    }


def verify(model_bytes: bytes, images: np.ndarray, reference, output_names: list[str] | None = None) -> dict:
    """Run the ONNX model on CPU and compare with Keras; raise VerificationError above tolerance.

    With ``output_names``, ``reference`` is a list (one Keras output per name) and every output is
    checked; the figures are then per output name.
    """
    ort = require("onnxruntime")
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    if output_names is None:
        return _check(session.run(None, {INPUT_NAME: images})[0], reference)
    actual = session.run(output_names, {INPUT_NAME: images})
    return {name: _check(a, r, name) for name, a, r in zip(output_names, actual, reference, strict=True)}


def _check(actual: np.ndarray, reference: np.ndarray, name: str = OUTPUT_NAME) -> dict:
    if actual.shape != reference.shape:
        raise VerificationError(f"ONNX output {name} has shape {actual.shape}, Keras' {reference.shape}")
    figures = compare_embeddings(actual, reference)
    if figures["rel_diff"] > MAX_REL_DIFF or figures["min_cosine"] < MIN_COSINE:
        raise VerificationError(
            f"ONNX output {name} differs from Keras: {figures} (tolerance rel_diff <= "
            f"{MAX_REL_DIFF}, cosine >= {MIN_COSINE}); the export was not stored"
        )
    return {**figures, "tolerance": {"rel_diff": MAX_REL_DIFF, "min_cosine": MIN_COSINE}}


def obtain_backbone(
    backbone: str | None = None,
    weights="imagenet",
    size: int | None = None,
    layer: str | None = None,
    pooling: str = "avg",
    weights_dir=None,
    store: ModelStore | None = None,
    model=None,
    seed: int = 0,
    tta: str = "none",
) -> StoreEntry:
    """The stored export for a request, exporting it first if needed.

    ``model`` names a store key or a folder holding an export (e.g. a fine-tune's output) and wins over
    ``backbone``. Without TensorFlow, a stored entry made by other converter versions is accepted.
    """
    store = store or ModelStore()
    if model is not None:
        resolved = store.resolve(model)
        resolved.verify()
        return resolved
    if backbone is None:
        raise InputError("name a backbone (or a stored model)")
    plan = plan_export(backbone, weights, size, layer, pooling, weights_dir, seed=seed, tta=tta)
    entry = store.get(plan.key)
    if entry is None and distribution_version("tensorflow") is None:
        entry = _match_unversioned(store, plan.key_fields())
    if entry is None:
        entry = export_plan(plan, store)
    entry.verify()
    return entry


def obtain_layers(
    backbone: str,
    layers: list[str | None],
    weights="imagenet",
    size: int | None = None,
    pooling: str = "avg",
    weights_dir=None,
    store: ModelStore | None = None,
    seed: int = 0,
    tta: str = "none",
) -> FeatureModel:
    """:func:`obtain_backbone` for several cut points at once: the stored multi-output model (exported
    first if needed; without TensorFlow, one made by other converter versions is accepted) and each
    layer's feature-set entry. One layer gives the plain one-output model."""
    store = store or ModelStore()
    if len(layers) == 1:
        entry = obtain_backbone(backbone, weights, size, layers[0], pooling, weights_dir, store, seed=seed, tta=tta)
        return FeatureModel(entry, ((OUTPUT_NAME, entry),))
    plans = [plan_export(backbone, weights, size, layer, pooling, weights_dir, seed=seed, tta=tta) for layer in layers]
    multi = MultiExportPlan(tuple(plans))
    found = _stored_multi(multi, store, any_versions=distribution_version("tensorflow") is None)
    if found is None:
        found = export_multi(multi, store)
    found.entry.verify()
    for _, single in found.outputs:
        single.verify()
    return found
