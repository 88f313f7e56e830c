"""A head's operations (:mod:`tlpipe.pipeline.scoring.portable_head`) as Keras layers, for the TensorFlow Lite classifier.

Imports Keras at module level: import this module lazily. Dense maps are ``keras.layers.Dense`` with the head's
weights; standardisation and PCA whitening are one elementwise ``x * scale + shift`` (``(x - mean) / s`` up to a
float32 rounding); normalisation and calibration are the small layers below. The RBF SVM (a kernel against its
support vectors) has no layer here: :func:`apply_head` refuses it by name.
"""

from __future__ import annotations

import os

__all__ = ["Calibration", "Elementwise", "HEAD_PREFIX", "RowNormalize", "apply_head"]

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from tlpipe.pipeline.scoring.portable_head import (  # noqa: E402
    Calibrated,
    Dense,
    HeadOps,
    Normalize,
    Project,
    Softmax,
    Standardize,
    SvcDecision,
    UnsupportedHead,
)

# Every layer of the head is named with this prefix (the int8 conversion keeps the head's operations in float by it).
HEAD_PREFIX = "tlpipe_head_"


def _constant(layer: keras.layers.Layer, name: str, value) -> object:
    value = np.asarray(value, dtype=np.float32)
    return layer.add_weight(
        name=name, shape=value.shape, initializer=keras.initializers.Constant(value), trainable=False
    )


class RowNormalize(keras.layers.Layer):
    """Rows divided by their l1 / l2 / max norm; a norm below ``threshold`` counts as 1 (as scikit-learn)."""

    def __init__(self, norm: str, threshold: float, **kwargs):
        super().__init__(**kwargs)
        self.norm, self.threshold = norm, float(threshold)

    def call(self, x):
        if self.norm == "l2":
            norm = ops.sqrt(ops.sum(x * x, axis=-1, keepdims=True))
        elif self.norm == "l1":
            norm = ops.sum(ops.abs(x), axis=-1, keepdims=True)
        else:
            norm = ops.max(ops.abs(x), axis=-1, keepdims=True)
        return x / ops.where(norm < self.threshold, ops.ones_like(norm), norm)


class Elementwise(keras.layers.Layer):
    """``x * scale + shift``, per column (standardisation, PCA whitening)."""

    def __init__(self, scale: np.ndarray, shift: np.ndarray, **kwargs):
        super().__init__(**kwargs)
        self._scale_value, self._shift_value = np.asarray(scale), np.asarray(shift)

    def build(self, input_shape):
        self.scale = _constant(self, "scale", self._scale_value)
        self.shift = _constant(self, "shift", self._shift_value)

    def call(self, x):
        return x * self.scale + self.shift


class Calibration(keras.layers.Layer):
    """One calibrated fold on its decision values ``d`` ((N, 1) for two classes, else (N, classes)):
    temperature ``softmax(beta * logits)`` (binary logits ``(-d, d)``), or sigmoid ``expit(-(a d + b))`` per column
    (binary ``[1 - p, p]``, multiclass normalised by the row sum, uniform where it is 0)."""

    def __init__(self, method: str, n_classes: int, beta: float = 1.0, a=None, b=None, **kwargs):
        super().__init__(**kwargs)
        self.method, self.n_classes, self.beta = method, int(n_classes), float(beta)
        self._a, self._b = a, b

    def build(self, input_shape):
        if self.method == "sigmoid":
            self.a, self.b = _constant(self, "a", self._a), _constant(self, "b", self._b)

    def call(self, d):
        binary = self.n_classes == 2
        if self.method == "temperature":
            logits = ops.concatenate([-d, d], axis=-1) if binary else d
            return ops.softmax(logits * self.beta, axis=-1)
        p = ops.sigmoid(-(d * self.a + self.b))
        if binary:
            return ops.concatenate([1.0 - p, p], axis=-1)
        total = ops.sum(p, axis=-1, keepdims=True)
        zero = total == 0.0
        return ops.where(zero, ops.ones_like(p) / self.n_classes, p / ops.where(zero, ops.ones_like(total), total))


def _dense(op: Dense, name: str):
    activation = {"identity": None, "relu": "relu", "tanh": "tanh", "logistic": "sigmoid"}[op.activation]
    layer = keras.layers.Dense(op.kernel.shape[1], activation=activation, name=name)
    layer.build((None, op.kernel.shape[0]))
    layer.set_weights([op.kernel.astype(np.float32), op.bias.astype(np.float32)])
    return layer


def _apply(op, x, name: str):
    if isinstance(op, Normalize):
        return RowNormalize(op.norm, op.threshold, name=name)(x)
    if isinstance(op, Standardize):
        dim = x.shape[-1]
        scale = 1.0 / op.scale if op.scale is not None else np.ones(dim)
        shift = -op.mean * scale if op.mean is not None else np.zeros(dim)
        return Elementwise(scale, shift, name=name)(x)
    if isinstance(op, Project):
        x = _dense(Dense(op.matrix, -op.offset.ravel()), name)(x)
        if op.scale is not None:
            x = Elementwise(1.0 / op.scale, np.zeros(len(op.scale)), name=name + "_whiten")(x)
        return x
    if isinstance(op, Dense):
        return _dense(op, name)(x)
    if isinstance(op, Softmax):
        return keras.layers.Softmax(axis=-1, name=name)(x)
    if isinstance(op, Calibrated):
        folds = []
        for k, fold in enumerate(op.folds):
            d = x
            for i, sub in enumerate(fold.scores):
                if isinstance(sub, SvcDecision):
                    raise UnsupportedHead(
                        f"its SVC ({sub.kernel} kernel against {len(sub.support_vectors)} support vectors) has no "
                        f"Keras layer here"
                    )
                d = _apply(sub, d, f"{name}_fold{k}_{i}")
            folds.append(
                Calibration(fold.method, op.n_classes, fold.beta, fold.a, fold.b, name=f"{name}_fold{k}_calibration")(d)
            )
        return folds[0] if len(folds) == 1 else keras.layers.Average(name=name + "_mean")(folds)
    raise UnsupportedHead(f"operation {type(op).__name__} has no Keras layer here")


def apply_head(head: HeadOps, embeddings):
    """The head's layers on the Keras tensor ``embeddings`` (N, D): probabilities (N, n_classes).

    Raises
    ------
    UnsupportedHead
        A kernel SVM (the rbf-svm head), named.
    """
    x = embeddings
    for i, op in enumerate(head.ops):
        x = _apply(op, x, f"{HEAD_PREFIX}{i}_{type(op).__name__.lower()}")
    return x
