"""The Keras side: a backbone as one model, uint8 RGB in, embeddings out.

Imports Keras/TensorFlow at module level: import this module lazily (export, fine-tune).
"""

from __future__ import annotations

import os

from tlpipe.errors import InputError

__all__ = [
    "CAFFE_MEAN_BGR",
    "ImagePreprocessing",
    "TORCH_MEAN",
    "TORCH_STD",
    "TestTimeViews",
    "ViewMean",
    "add_pooling",
    "build_base",
    "build_embedding_model",
    "build_multi_output_model",
    "weights_digest",
]

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from .registry import BackboneSpec, layer_parts  # noqa: E402
from .tta import check_tta, crop_offsets, decode_size, view_count  # noqa: E402
from .weights import ResolvedWeights, WeightsUnavailable, offline_hint  # noqa: E402

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="tlpipe")
class ImagePreprocessing(keras.layers.Layer):
    """uint8 RGB -> what the backbone expects, per the registry's preprocessing contract."""

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("tf", "caffe", "torch", "builtin", "unit"):
            raise InputError(f"unknown preprocessing mode {mode!r}")
        self.mode = mode

    def call(self, images):
        x = ops.cast(images, "float32")
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(CAFFE_MEAN_BGR, "float32")
        if self.mode == "torch":
            mean = ops.convert_to_tensor(TORCH_MEAN, "float32")
            std = ops.convert_to_tensor(TORCH_STD, "float32")
            return (x / 255.0 - mean) / std
        if self.mode == "unit":
            return x / 255.0
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="tlpipe")
class TestTimeViews(keras.layers.Layer):
    """(N, R, R, C) -> (V * N, size, size, C): the TTA views of :mod:`backbones.tta`, view-major
    (all images' first view, then all images' second view...). Slices and a reverse along the width only."""

    def __init__(self, mode: str, size: int, **kwargs):
        super().__init__(**kwargs)
        self.mode, self.size = check_tta(mode), int(size)

    def call(self, images):
        s = self.size
        views = [images[:, t : t + s, left : left + s, :] for t, left in crop_offsets(s, self.mode)]
        if self.mode != "none":
            views += [ops.flip(v, axis=2) for v in views]
        return views[0] if len(views) == 1 else ops.concatenate(views, axis=0)

    def compute_output_shape(self, input_shape):
        return (None, self.size, self.size, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "size": self.size}


@keras.saving.register_keras_serializable(package="tlpipe")
class ViewMean(keras.layers.Layer):
    """(V * N, D) view-major embeddings -> (N, D), the mean over each image's ``views`` views."""

    def __init__(self, views: int, **kwargs):
        super().__init__(**kwargs)
        self.views = int(views)

    def call(self, x):
        return ops.mean(ops.reshape(x, (self.views, -1, x.shape[-1])), axis=0)

    def compute_output_shape(self, input_shape):
        return (None, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "views": self.views}


def build_base(
    spec: BackboneSpec,
    size: int,
    weights: ResolvedWeights,
    layer: str | None = None,
    layers: list[str | None] | None = None,
) -> keras.Model:
    """The Keras Applications model (include_top=False), truncated at ``layer`` when given.

    ``layers`` instead of ``layer``: one output per entry (a cut point, or None for the model's last
    output), in that order.
    """
    spec.check_size(size, pretrained=weights.source == "imagenet")
    for name in [layer, *(layers or [])]:
        if name is not None:
            spec.cut_point(name)  # validates the name
    keras.utils.set_random_seed(weights.seed)
    constructor = getattr(keras.applications, spec.constructor)
    try:
        base = constructor(include_top=False, weights=weights.keras_arg, input_shape=(size, size, 3), **spec.kwargs)
    except Exception as exc:  # Keras raises plain Exception/ValueError for both cases below
        if weights.source == "imagenet" and ("fetch" in str(exc).lower() or isinstance(exc, OSError)):
            raise WeightsUnavailable(offline_hint(spec)) from exc
        if weights.source == "file":
            raise WeightsUnavailable(f"{weights.path} does not fit {spec.name}: {exc}") from exc
        raise
    if layers is not None:
        outputs = [base.output if name is None else base.get_layer(name).output for name in layers]
        return keras.Model(base.inputs, outputs, name=f"{base.name}_{len(layers)}_outputs")
    if layer is not None:
        base = keras.Model(base.inputs, base.get_layer(layer).output, name=f"{base.name}_{layer}")
    return base


def add_pooling(features, pooling: str, suffix: str = ""):
    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name="avg_pool" + suffix)(features)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name="max_pool" + suffix)(features)
    if pooling == "none":
        return keras.layers.Flatten(name="flatten" + suffix)(features)
    raise InputError(f"pooling must be avg, max or none, not {pooling!r}")


def build_embedding_model(
    spec: BackboneSpec,
    size: int,
    weights: ResolvedWeights,
    layer: str | None = None,
    pooling: str = "avg",
    base: keras.Model | None = None,
    tta: str = "none",
) -> keras.Model:
    """uint8 (N, R, R, 3) -> float32 (N, D): TTA views, preprocessing, backbone, pooling, view mean in one graph.

    ``R`` is ``size`` except for ``tta="flip+crops"`` (:func:`backbones.tta.decode_size`). With
    ``tta="none"`` the graph is exactly input -> preprocessing -> backbone -> pooling.
    """
    return build_multi_output_model(spec, size, weights, [layer], pooling, base=base, tta=tta, single=True)


def build_multi_output_model(
    spec: BackboneSpec,
    size: int,
    weights: ResolvedWeights,
    layers: list[str | None],
    pooling: str = "avg",
    base: keras.Model | None = None,
    tta: str = "none",
    single: bool = False,
) -> keras.Model:
    """One graph with one embedding output per entry of ``layers`` (cut point names; None = the last
    output), sharing the decode, the views and the backbone trunk. ``single`` (one layer): a plain
    one-output model, as :func:`build_embedding_model` makes.

    An entry ``a+b`` (:func:`backbones.registry.layer_parts`) is one output: each part pooled on its own, then
    the pooled vectors concatenated in that order (``Concatenate``), before the TTA view mean. No per-block
    normalisation: every head standardises each dimension itself (``StandardScaler``), which puts the blocks
    on one scale whatever their activation magnitudes.
    """
    if single and len(layers) != 1:
        raise InputError("single=True takes exactly one layer")
    parts = [layer_parts(layer) for layer in layers]
    plain = single and len(parts[0]) == 1  # the graph a one-layer export always had
    components = list(dict.fromkeys(part for entry in parts for part in entry))
    if base is None:
        base = (
            build_base(spec, size, weights, layers[0]) if plain else build_base(spec, size, weights, layers=components)
        )
    images = keras.Input((decode_size(size, tta), decode_size(size, tta), 3), dtype="uint8", name="images")
    x = images if tta == "none" else TestTimeViews(tta, size, name="tta_views")(images)
    x = ImagePreprocessing(spec.preprocessing, name="preprocessing")(x)
    features = base(x)
    features = [features] if plain or not isinstance(features, (list, tuple)) else list(features)
    by_layer = dict(zip(components, features)) if not plain else {layers[0]: features[0]}
    outputs = []
    for i, entry in enumerate(parts):
        suffix = "" if single else f"_{i}"
        if len(entry) == 1:
            embedding = add_pooling(by_layer[entry[0]], pooling, suffix)
        else:
            pooled = [add_pooling(by_layer[part], pooling, f"{suffix}_{j}") for j, part in enumerate(entry)]
            embedding = keras.layers.Concatenate(axis=-1, name="concat" + suffix)(pooled)
        if tta != "none":
            embedding = ViewMean(view_count(tta), name="tta_mean" + suffix)(embedding)
        outputs.append(embedding)
    return keras.Model(images, outputs[0] if single else outputs, name=f"tlpipe_{spec.name}")


def weights_digest(model: keras.Model) -> str:
    """sha256 over the model's weight tensors: identifies the weights actually in use."""
    import hashlib

    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return digest.hexdigest()
