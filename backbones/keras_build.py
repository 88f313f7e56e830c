"""The Keras side: a backbone as one model, uint8 RGB in, embeddings out.

Imports Keras/TensorFlow at module level: import this module lazily (export, fine-tune).
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from .registry import BackboneSpec  # noqa: E402
from .weights import ResolvedWeights, WeightsUnavailable, offline_hint  # noqa: E402

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="tlpipe")
class ImagePreprocessing(keras.layers.Layer):
    """uint8 RGB -> what the backbone expects, per the registry's preprocessing contract."""

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("tf", "caffe", "torch", "builtin"):
            raise ValueError(f"unknown preprocessing mode {mode!r}")
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
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def build_base(spec: BackboneSpec, size: int, weights: ResolvedWeights, layer: str | None = None) -> keras.Model:
    """The Keras Applications model (include_top=False), truncated at ``layer`` when given."""
    spec.check_size(size, pretrained=weights.source == "imagenet")
    if layer is not None:
        spec.cut_point(layer)  # validates the name
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
    if layer is not None:
        base = keras.Model(base.inputs, base.get_layer(layer).output, name=f"{base.name}_{layer}")
    return base


def add_pooling(features, pooling: str):
    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name="avg_pool")(features)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name="max_pool")(features)
    if pooling == "none":
        return keras.layers.Flatten(name="flatten")(features)
    raise ValueError(f"pooling must be avg, max or none, not {pooling!r}")


def build_embedding_model(
    spec: BackboneSpec,
    size: int,
    weights: ResolvedWeights,
    layer: str | None = None,
    pooling: str = "avg",
    base: keras.Model | None = None,
) -> keras.Model:
    """uint8 (N, size, size, 3) -> float32 (N, D): preprocessing, backbone, pooling in one graph."""
    base = base if base is not None else build_base(spec, size, weights, layer)
    images = keras.Input((size, size, 3), dtype="uint8", name="images")
    x = ImagePreprocessing(spec.preprocessing, name="preprocessing")(images)
    embeddings = add_pooling(base(x), pooling)
    return keras.Model(images, embeddings, name=f"tlpipe_{spec.name}")


def weights_digest(model: keras.Model) -> str:
    """sha256 over the model's weight tensors: identifies the weights actually in use."""
    import hashlib

    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return digest.hexdigest()
