"""`tlpipe finetune` as a library function, in three stages, and the training machinery it shares with
:mod:`tlpipe.pipeline.training.custom_model`.

Stages: :func:`prepare_finetune` (images, split, export plan, warm-start head; no TensorFlow),
:func:`train_finetune` (Keras models, per-epoch checkpoints, early stopping, test split) and
:func:`export_finetune` (re-exported backbone and ``classifier.onnx``); :func:`finetune` runs all three.

The model is ``uint8 images -> augmentation (training only) -> ImagePreprocessing -> backbone (called with
training=False) -> pooling -> Dropout -> Dense softmax``. Augmentation acts on float pixels in 0..255,
before the preprocessing scale, so ``RandomContrast`` clips to the true pixel range and the backbone sees
exactly what the exported graph feeds it. Layers before the unfreeze point stay frozen, and so do all
BatchNormalization layers (their statistics and affine parameters), as Keras' fine-tuning guide advises.
The unfrozen backbone layers may learn at a lower rate than the classifier (``backbone_learning_rate``).

A saved logistic-regression head can warm-start the Dense layer: its StandardScaler is folded into the
weights, so before any training the model predicts what the head predicts on the backbone's embeddings.

Shared machinery: :func:`split_records` (train / validation / test), :func:`image_batches`,
:class:`TrainingRun` (history rows, early stopping on validation loss, per-epoch checkpoint and resume),
:func:`fit_phase` (epoch 0 = the starting weights, a candidate for the best; then training),
:func:`evaluate_split`, :func:`plot_curves` and :func:`export_classifier` (verified against Keras, written
with the fused-classifier metadata that ``tlpipe score --classifier`` reads, through
:func:`tlpipe.backbones.onnx_metadata.write_metadata` as :func:`tlpipe.pipeline.scoring.fuse.export_model` does).
TensorFlow is imported inside the functions that need it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlpipe.backbones.atomic import atomic_write
from tlpipe.backbones.choice import ModelChoice
from tlpipe.backbones.export import INPUT_NAME, ExportPlan, convert, export_plan, plan_export, rename_output, verify
from tlpipe.backbones.onnx_metadata import write_metadata
from tlpipe.backbones.registry import BackboneSpec
from tlpipe.backbones.store import META_FILE, MODEL_FILE, ModelStore, StoreEntry
from tlpipe.errors import InputError
from tlpipe.features.fastdecode import DEFAULT_RESIZE_FILTER, check_resize_filter
from tlpipe.features.images import RESIZE_MODES, ImageError, load_image
from tlpipe.features.sources import ImageRecord, ImageSource, discover
from tlpipe.pipeline.heads.persistence import load_head

__all__ = [
    "BACKBONE_WEIGHTS",
    "CLASSIFIER_FILE",
    "CLASSIFIER_FORMAT",
    "DataSplit",
    "FINETUNE_CHOICE",
    "FinetuneModels",
    "FinetuneResult",
    "HISTORY_FIELDS",
    "LABEL_NAME",
    "OUTPUT_NAME",
    "PreparedFinetune",
    "STATE_FILE",
    "SplitScore",
    "TrainedModel",
    "TrainingOptions",
    "TrainingRun",
    "VERIFY_IMAGES",
    "adam",
    "augmentation",
    "balanced_weights",
    "batches",
    "build_models",
    "compile_model",
    "decodable",
    "evaluate_split",
    "export_classifier",
    "export_finetune",
    "finetune",
    "fit_phase",
    "fold_head",
    "image_batches",
    "label_indices",
    "plot_curves",
    "prepare_finetune",
    "read_history",
    "records_digest",
    "resolve_unfreeze",
    "set_trainable",
    "split_records",
    "train_finetune",
    "train_keras",
    "write_history",
]

if TYPE_CHECKING:
    import keras

FINETUNE_CHOICE = ("backbone", "weights", "weights_dir", "size", "pooling", "store")  # the ModelChoice fields it takes
log = logging.getLogger(__name__)

HISTORY_FIELDS = ("epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "seconds")
OUTPUT_NAME = "probabilities"
LABEL_NAME = "label"
BACKBONE_WEIGHTS = "backbone.weights.h5"
CLASSIFIER_FILE = "classifier.onnx"
STATE_FILE = "state.json"
VERIFY_IMAGES = 8  # validation images the classifier export is checked on
CLASSIFIER_FORMAT = 1


@dataclass
class TrainingOptions:
    """How a Keras model is trained: shared by :func:`finetune` and :func:`custom_model.fit_custom_model`.

    ``learning_rate``: Adam's rate for the new layers (the Dense classifier here); ``backbone_learning_rate``:
    the rate of the unfrozen backbone layers (None: the same). Early stopping keeps the weights of the lowest
    validation loss (epoch 0, the starting weights, included) after ``patience`` epochs without improvement.
    ``class_weight``: None or "balanced" (per-image weights n / (classes * count)). ``val_fraction``: the
    stratified hold-out of the training images used for validation when the source has no 'val' split.
    """

    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-4
    backbone_learning_rate: float | None = None
    augment: bool = True
    class_weight: str | None = None
    patience: int = 3
    seed: int = 0
    val_fraction: float = 0.2
    resize: str = "squash"
    resize_filter: str = DEFAULT_RESIZE_FILTER
    progress: bool = True
    unfreeze_from: str | None = None
    unfreeze_last: int | None = None

    def check(self) -> None:
        """Raise ValueError for a setting out of range."""
        if self.epochs < 0 or self.batch_size < 1 or self.patience < 1:
            raise InputError("epochs must be >= 0, batch_size and patience >= 1")
        if self.class_weight not in (None, "balanced"):
            raise InputError(f"class_weight must be None or 'balanced', not {self.class_weight!r}")
        if not self.learning_rate > 0:
            raise InputError(f"learning_rate must be positive, not {self.learning_rate}")
        if self.backbone_learning_rate is not None and not self.backbone_learning_rate >= 0:
            raise InputError(f"backbone_learning_rate must be >= 0, not {self.backbone_learning_rate}")
        if self.resize not in RESIZE_MODES:
            raise InputError(f"unknown resize mode {self.resize!r}; expected one of {RESIZE_MODES}")
        check_resize_filter(self.resize_filter)
        if self.unfreeze_from is not None and self.unfreeze_last is not None:
            raise InputError("give unfreeze_from or unfreeze_last, not both")


@dataclass
class SplitScore:
    """Loss and accuracy of the final weights on one split."""

    images: int
    loss: float
    accuracy: float

    def to_dict(self) -> dict:
        return {"images": self.images, "loss": self.loss, "accuracy": self.accuracy}


@dataclass
class FinetuneResult:
    """What a fine-tune produced; ``backbone_entry`` is the model-store entry of the re-exported backbone.

    ``best_epoch`` is the epoch of the lowest validation loss (0: the starting weights were never beaten);
    ``test`` scores those weights on the source's 'test' split (None without one).
    """

    out_dir: Path
    warm_start_val_accuracy: float | None
    best_val_accuracy: float
    best_val_loss: float
    best_epoch: int
    epochs_run: int
    epoch_seconds: list[float]
    history_path: Path
    curves_path: Path
    backbone_entry: StoreEntry
    classifier_path: Path
    unfreeze_from: str
    class_names: list[str]
    setup: str
    test: SplitScore | None = None
    resumed_from: int = 0  # epochs already done when this call started
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "out_dir": str(self.out_dir),
            "warm_start_val_accuracy": self.warm_start_val_accuracy,
            "best_val_accuracy": self.best_val_accuracy,
            "best_val_loss": self.best_val_loss,
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "epoch_seconds": self.epoch_seconds,
            "history": str(self.history_path),
            "curves": str(self.curves_path),
            "backbone_key": self.backbone_entry.key,
            "backbone": str(self.out_dir / "backbone"),
            "classifier": str(self.classifier_path),
            "unfreeze_from": self.unfreeze_from,
            "class_names": self.class_names,
            "setup": self.setup,
            "test": self.test.to_dict() if self.test else None,
            "resumed_from": self.resumed_from,
            "skipped": [list(s) for s in self.skipped],
        }


@dataclass(frozen=True)
class DataSplit:
    """Training, validation (early stopping, best weights) and test (scored once, at the end) images."""

    train: list[ImageRecord]
    val: list[ImageRecord]
    test: list[ImageRecord]
    description: str


def split_records(records: list[ImageRecord], val_fraction: float = 0.2, seed: int = 0) -> DataSplit:
    """Split labelled images for training.

    Validation: the source's 'val' split, else a stratified ``val_fraction`` hold-out (seeded) of the
    training images. Test: the source's 'test' split (empty without one); it never picks weights. Images of
    other splits train; unlabelled images are not used.

    Raises
    ------
    ValueError
        No labelled images, fewer than two training classes, or no validation images.
    """
    from sklearn.model_selection import train_test_split

    labelled = [r for r in records if r.label is not None]
    if not labelled:
        raise InputError("no labelled images: training needs class folders or a manifest with labels")
    splits = {r.split for r in labelled}
    test = [r for r in labelled if r.split == "test"]
    pool = [r for r in labelled if r.split not in ("val", "test")]
    tested = f"; the 'test' split ({len(test)} images) is scored once with the best weights" if test else ""
    if "val" in splits:
        train, val = pool, [r for r in labelled if r.split == "val"]
        description = f"train on {len(train)} images, validate on the source's 'val' split ({len(val)} images)"
    else:
        if not 0 < val_fraction < 1:
            raise InputError(f"val_fraction must be between 0 and 1, not {val_fraction}")
        labels = [r.label for r in pool]
        counts = Counter(labels)
        if len(pool) < 2:
            raise InputError(f"{len(pool)} training image(s): too few to hold some out for validation")
        stratified = min(counts.values()) >= 2 and math.ceil(val_fraction * len(labels)) >= len(counts)
        train, val = train_test_split(
            pool, test_size=val_fraction, random_state=seed, stratify=labels if stratified else None
        )
        train, val = sorted(train, key=lambda r: r.relpath), sorted(val, key=lambda r: r.relpath)
        description = (
            f"{'stratified' if stratified else 'random'} hold-out of the training images "
            f"(no 'val' split in the source): train on {len(train)}, validate on {len(val)} "
            f"(val_fraction {val_fraction}, seed {seed})"
        )
    if len({r.label for r in train}) < 2:
        raise InputError("training needs images of at least two classes")
    if not val:
        raise InputError("no validation images")
    return DataSplit(train, val, test, description + tested)


# ----------------------------------------------------------------------------------------------- warm start


def fold_head(
    estimator, metadata: dict, class_names: list[str], embedding_dim: int, name: str = "head"
) -> tuple[np.ndarray, np.ndarray]:
    """Dense kernel (D, len(class_names)) and bias reproducing a StandardScaler + LogisticRegression head.

    The scaler folds in as W' = W / sigma, b' = b - W' . mu; a binary logistic regression becomes the
    two-class softmax with logits [0, w.x + b]. Columns follow ``class_names``, matched by name to the
    head's classes. Raises ValueError for any other head, or one trained on other classes.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    steps = list(estimator.steps) if isinstance(estimator, Pipeline) else [("classifier", estimator)]
    *prep, (_, clf) = steps
    if not isinstance(clf, LogisticRegression):
        raise InputError(
            f"{name} ends in a {type(clf).__name__}, not a LogisticRegression: only a logreg head "
            f"(StandardScaler + LogisticRegression) is a linear softmax that can warm-start the Dense "
            f"layer"
        )
    mu, sigma = np.zeros(embedding_dim), np.ones(embedding_dim)
    for step_name, step in prep:
        if step is None or step == "passthrough":
            continue
        if not isinstance(step, StandardScaler):
            raise InputError(
                f"{name} has a {type(step).__name__} step ({step_name!r}) that cannot be folded into "
                f"the Dense layer (only StandardScaler can); fit a logreg head without it to warm-start"
            )
        # (x - mu) / sigma, then this scaler: ((x - mu) / sigma - m) / s = (x - (mu + m sigma)) / (sigma s)
        if step.with_mean:
            mu = mu + step.mean_ * sigma
        if step.with_std:
            sigma = sigma * step.scale_
    coef, intercept = np.asarray(clf.coef_, np.float64), np.asarray(clf.intercept_, np.float64)
    if coef.shape[1] != embedding_dim:
        raise InputError(f"{name} takes {coef.shape[1]}-dimensional embeddings, this backbone gives {embedding_dim}")
    kernel = coef / sigma
    bias = intercept - kernel @ mu
    if len(clf.classes_) == 2:
        kernel, bias = np.vstack([np.zeros_like(kernel), kernel]), np.concatenate([[0.0], bias])
    from tlpipe.pipeline.heads.persistence import HeadError, head_labels

    try:  # heads fitted on class names know them; older ones map label indices through the sidecar
        labels = head_labels(clf, metadata)
    except HeadError:
        raise InputError(f"{name} has no class names in its sidecar: cannot tell which output is which class") from None
    if sorted(labels) != sorted(class_names):
        raise InputError(f"{name} was trained on classes {sorted(labels)}, the images have {sorted(class_names)}")
    order = [labels.index(c) for c in class_names]
    return kernel[order].T.astype(np.float32), bias[order].astype(np.float32)


def _check_head_features(metadata: dict, plan: ExportPlan, store: ModelStore, name: str) -> None:
    """The head must have been fitted on this backbone's embeddings (same key; converter versions may differ)."""
    saved = metadata.get("feature_set", {})
    model_key = saved.get("model_key") or saved.get("key")  # a feature-set key also names resize mode and filter
    if model_key == plan.key:
        return
    entry = store.get(model_key) if model_key else None
    if entry is not None:

        def unversioned(fields: dict) -> dict:
            return {k: v for k, v in fields.items() if k != "versions"}

        if unversioned(entry.metadata.get("key_fields", {})) == unversioned(plan.key_fields()):
            return
    raise InputError(
        f"{name} was fitted on embeddings {saved.get('key')!r} ({saved.get('backbone')}, {saved.get('input_size')} px, "
        f"{saved.get('pooling')} pooling, layer {saved.get('layer')}); this fine-tune starts from {plan.key} "
        f"({plan.spec.name}, {plan.size} px, {plan.pooling} pooling, weights {plan.weights.identity}): fit the head "
        f"on embeddings of this backbone, size, pooling and weights"
    )


# --------------------------------------------------------------------------------------------------- models


@dataclass
class FinetuneModels:
    """Keras models sharing one set of layers."""

    train: keras.Model  # uint8 -> augmentation -> ... -> Dropout -> softmax; what fit() trains
    classifier: keras.Model  # uint8 -> probabilities, no augmentation or dropout; exported as classifier.onnx
    embedding: keras.Model  # uint8 -> embeddings; exported as the fine-tuned backbone
    base: keras.Model
    unfreeze_from: str  # first trainable backbone layer


def resolve_unfreeze(
    base: keras.Model, spec: BackboneSpec, unfreeze_from: str | None = None, unfreeze_last: int | None = None
) -> int:
    """Index in ``base.layers`` of the first layer to train.

    ``unfreeze_from`` names a layer (a cut point such as ``block_15_add``) or a block prefix (``block_15``:
    the first layer named ``block_15`` or ``block_15`` + a non-digit, so not ``block_150``).
    ``unfreeze_last=N`` trains the last N blocks, blocks ending at the registry's cut points (the model's
    last layer is the end of the last one; ``base`` may be a backbone truncated at a cut point). Neither
    given: the last block.
    """
    if unfreeze_from is not None and unfreeze_last is not None:
        raise InputError("give unfreeze_from or unfreeze_last, not both")
    names = [layer.name for layer in base.layers]
    if unfreeze_from is None:
        # Block ends only: a mid-block cut point (MobileNetV2's `block_N_expand_relu`, registered for feature
        # extraction) would split a block's expand convolution from its depthwise and projection.
        boundaries = [
            c.layer
            for c in spec.cut_points
            if c.layer != names[-1] and c.layer in names and not c.layer.endswith("_expand_relu")
        ]
        n = 1 if unfreeze_last is None else unfreeze_last
        if not 1 <= n <= len(boundaries):
            ends = ", ".join(boundaries) or "no cut point before it"
            raise InputError(
                f"unfreeze_last must be between 1 and {len(boundaries)} for {spec.name} up to "
                f"{names[-1]} (blocks end at {ends} and {names[-1]})"
            )
        return names.index(boundaries[-n]) + 1
    if unfreeze_from in names:
        return names.index(unfreeze_from)
    for i, name in enumerate(names):
        rest = name[len(unfreeze_from) :]
        if name.startswith(unfreeze_from) and rest and not rest[0].isdigit():
            return i
    cuts = ", ".join(c.layer for c in spec.cut_points if c.layer in names)
    raise InputError(
        f"{spec.name} (up to {names[-1]}) has no layer named or starting with {unfreeze_from!r}; cut points: {cuts}"
    )


def set_trainable(base: keras.Model, start: int | None) -> None:
    """Freeze ``base.layers[:start]`` and every BatchNormalization layer; train the rest (None: freeze all)."""
    import keras

    base.trainable = True
    for i, layer in enumerate(base.layers):
        layer.trainable = start is not None and i >= start and not isinstance(layer, keras.layers.BatchNormalization)


def augmentation(seed: int) -> keras.Sequential:
    """Flip, small rotation, zoom and contrast on float pixels in 0..255 (active in training only)."""
    import keras

    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(0.05, seed=seed + 1),
            keras.layers.RandomZoom(0.1, seed=seed + 2),
            keras.layers.RandomContrast(0.1, value_range=(0, 255), seed=seed + 3),
        ],
        name="augmentation",
    )


def build_models(
    plan: ExportPlan,
    n_classes: int,
    *,
    unfreeze_from: str | None = None,
    unfreeze_last: int | None = None,
    dropout: float = 0.2,
    augment: bool = True,
    seed: int = 0,
) -> FinetuneModels:
    """The fine-tuning models for ``plan``'s backbone (full, no cut point) with ``n_classes`` outputs."""
    import keras

    from tlpipe.backbones import keras_build

    base = keras_build.build_base(plan.spec, plan.size, plan.weights)
    start = resolve_unfreeze(base, plan.spec, unfreeze_from, unfreeze_last)
    set_trainable(base, start)
    embedding = keras_build.build_embedding_model(plan.spec, plan.size, plan.weights, pooling=plan.pooling, base=base)
    preprocessing, pooling = embedding.get_layer("preprocessing"), embedding.layers[-1]
    keras.utils.set_random_seed(seed)
    dense = keras.layers.Dense(n_classes, activation="softmax", name="classifier")

    images = keras.Input((plan.size, plan.size, 3), dtype="uint8", name=INPUT_NAME)
    classifier = keras.Model(images, dense(embedding(images)), name=f"tlpipe_{plan.spec.name}_classifier")

    x = images
    if augment:
        # On float pixels in 0..255, before the preprocessing: RandomContrast clips to that range.
        x = augmentation(seed)(keras.ops.cast(x, "float32"))
    features = base(preprocessing(x), training=False)  # BatchNorm in inference mode even where unfrozen
    x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(pooling(features))
    train = keras.Model(images, dense(x), name=f"tlpipe_{plan.spec.name}_finetune")
    return FinetuneModels(train, classifier, embedding, base, base.layers[start].name)


def adam(learning_rate: float, slow_variables=(), slow_learning_rate: float | None = None):
    """Adam at ``learning_rate``; ``slow_variables`` (the unfrozen backbone's) at ``slow_learning_rate``.

    One optimizer (one state to checkpoint): each step of a slow variable uses the scheduled rate times
    ``slow_learning_rate / learning_rate``. Variables are matched by their path (``layer/weight``).
    """
    import keras

    slow = frozenset(_variable_path(v) for v in slow_variables)
    if slow_learning_rate is None or not slow or slow_learning_rate == learning_rate:
        return keras.optimizers.Adam(learning_rate)
    return _two_rate_adam_class()(learning_rate, slow_learning_rate / learning_rate, slow)


_TWO_RATE_ADAM = None


def _variable_path(variable) -> str:
    """``layer/weight`` of a Keras variable, or of the backend variable the optimizer's step receives
    (TensorFlow names it ``layer/weight:0``)."""
    path = getattr(variable, "path", None)
    return path if path is not None else variable.name.split(":")[0]


def _two_rate_adam_class():
    global _TWO_RATE_ADAM
    if _TWO_RATE_ADAM is None:
        import keras

        class TwoRateAdam(keras.optimizers.Adam):
            """Adam whose steps for the variables at ``slow_paths`` are scaled by ``ratio``."""

            def __init__(self, learning_rate, ratio: float, slow_paths: frozenset, **kwargs):
                super().__init__(learning_rate, **kwargs)
                self.ratio, self.slow_paths = float(ratio), slow_paths

            def update_step(self, gradient, variable, learning_rate):
                if _variable_path(variable) in self.slow_paths:  # decided while tracing: one branch per variable
                    learning_rate = learning_rate * self.ratio
                return super().update_step(gradient, variable, learning_rate)

        _TWO_RATE_ADAM = TwoRateAdam
    return _TWO_RATE_ADAM


def compile_model(model: keras.Model, options: TrainingOptions, backbone: keras.Model | None = None) -> None:
    """Adam (two rates when ``options.backbone_learning_rate`` is set), sparse cross-entropy, accuracy;
    the optimizer is built at once so every checkpoint holds its state."""
    slow = [v for v in backbone.trainable_variables] if backbone is not None else []
    optimizer = adam(options.learning_rate, slow, options.backbone_learning_rate)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.optimizer.build(model.trainable_variables)


# ----------------------------------------------------------------------------------------------------- data


def batches(
    n: int,
    load: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | list[int]]],
    labels: np.ndarray,
    batch_size: int,
    *,
    shuffle_seed: int | None = None,
    first_epoch: int = 0,
    sample_weights: np.ndarray | None = None,
    workers: int = 2,
) -> keras.utils.PyDataset:
    """A ``keras.utils.PyDataset`` over ``n`` items: ``load(indices)`` returns (inputs, the indices kept).

    With ``shuffle_seed`` the order is a permutation drawn from (seed, epoch), so a resumed run sees the
    same order as an uninterrupted one.
    """
    import keras

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=4)
            self.epoch = first_epoch
            self.order = self._order()

        def _order(self) -> np.ndarray:
            if shuffle_seed is None:
                return np.arange(n)
            return np.random.default_rng([shuffle_seed, self.epoch]).permutation(n)

        def __len__(self) -> int:
            return math.ceil(n / batch_size)

        def __getitem__(self, index: int):
            x, rows = load(self.order[index * batch_size : (index + 1) * batch_size])
            batch = (x, labels[rows])
            return batch if sample_weights is None else (*batch, sample_weights[rows])

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self.order = self._order()

    return Batches()


def image_batches(
    records: list[ImageRecord],
    labels: np.ndarray,
    size: int,
    resize: str,
    batch_size: int,
    *,
    shuffle_seed: int | None = None,
    first_epoch: int = 0,
    sample_weights: np.ndarray | None = None,
    failures: dict[str, str] | None = None,
    resize_filter: str = DEFAULT_RESIZE_FILTER,
) -> keras.utils.PyDataset:
    """Batches of uint8 (N, size, size, 3) images decoded with :func:`features.images.load_image`.

    Undecodable images are left out of their batch and noted in ``failures`` (relpath -> reason).
    """

    def load(indices: np.ndarray) -> tuple[np.ndarray, list[int]]:
        rows, pixels = [], []
        for i in indices:
            try:
                pixels.append(load_image(records[i].abspath, size, resize, resize_filter=resize_filter)[0])
                rows.append(int(i))
            except ImageError as exc:
                if failures is not None:
                    failures[records[i].relpath] = exc.reason
                log.warning("skipping %s: %s", records[i].relpath, exc.reason)
        if not rows:
            raise ImageError(f"no image of the batch starting with {records[indices[0]].relpath} could be decoded")
        return np.stack(pixels), rows

    return batches(
        len(records),
        load,
        labels,
        batch_size,
        shuffle_seed=shuffle_seed,
        first_epoch=first_epoch,
        sample_weights=sample_weights,
    )


def balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Per-image weights n / (classes * count of its class), scikit-learn's "balanced"."""
    classes, counts = np.unique(labels, return_counts=True)
    per_class = dict(zip(classes, len(labels) / (len(classes) * counts)))
    return np.array([per_class[c] for c in labels], np.float32)


def label_indices(records: list[ImageRecord], class_names: list[str]) -> np.ndarray:
    index: dict[str | None, int] = {name: i for i, name in enumerate(class_names)}
    return np.array([index[r.label] for r in records], np.int32)


# --------------------------------------------------------------------------------------- history, checkpoints


def read_history(path: Path) -> list[dict]:
    """The rows of ``history.csv``: epoch (int), phase (str), metrics and seconds (float or None)."""
    if not path.is_file():
        return []

    def value(key: str, text: str):
        if key == "epoch":
            return int(text)
        if key == "phase":
            return text
        return float(text) if text != "" else None

    with open(path, newline="") as fh:
        return [{k: value(k, v) for k, v in row.items()} for row in csv.DictReader(fh)]


def write_history(path: Path, rows: list[dict]) -> None:
    lines = [",".join(HISTORY_FIELDS)]
    for row in rows:
        lines.append(",".join("" if row.get(k) is None else str(row[k]) for k in HISTORY_FIELDS))
    atomic_write(path, "\n".join(lines) + "\n")


def plot_curves(rows: list[dict], path: Path, title: str = "fine-tuning") -> None:
    """Training and validation accuracy and loss per epoch (epoch 0: before training, validation only);
    a dotted line where a new phase starts."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    starts = [(b["epoch"] - 0.5, b["phase"]) for a, b in zip(rows, rows[1:]) if a.get("phase") != b.get("phase")]
    for ax, metric in zip(figure.subplots(1, 2), ("accuracy", "loss")):
        for prefix, label, style in (("", "train", "o-"), ("val_", "validation", "s-")):
            points = [(r["epoch"], r[prefix + metric]) for r in rows if r.get(prefix + metric) is not None]
            if points:
                ax.plot(*zip(*points), style, label=label)
        for x, phase in starts:
            ax.axvline(x, color="grey", linestyle=":")
            ax.annotate(phase, (x, 0.98), xycoords=("data", "axes fraction"), ha="left", va="top", fontsize=8)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle(f"{title} (epoch 0: before training)")
    figure.savefig(path, dpi=100)


class TrainingRun:
    """Per-epoch bookkeeping of one training phase: history rows, early stopping on validation loss, and
    the checkpoint.

    Epochs are numbered across phases: a phase starts at ``offset`` (its epoch 0: the starting weights,
    a candidate for the best) and its Keras epoch ``k`` is epoch ``offset + k + 1``. An epoch is committed
    when ``state.json`` (in ``checkpoints``) names its weights file; history rows past the committed epoch
    (written just before a crash) are dropped on resume. The best epoch has the lowest validation loss
    (ties: the earlier); validation accuracy is recorded beside it.
    """

    def __init__(
        self,
        out_dir: Path,
        model: keras.Model,
        config: dict,
        patience: int,
        *,
        phase: str = "finetune",
        checkpoints: Path | None = None,
        offset: int = 0,
        rows: list[dict] | None = None,
    ):
        self.out_dir, self.model, self.config, self.patience = out_dir, model, config, patience
        self.phase, self.offset = phase, offset
        self.checkpoints = checkpoints or out_dir / "checkpoints"
        self.history_path = out_dir / "history.csv"
        self.state: dict | None = None
        self.rows: list[dict] = list(rows or [])  # rows of earlier phases
        self.started = 0.0

    def resume(self) -> int:
        """Load the last committed epoch of this phase, if any; returns the phase's epochs already done."""
        path = self.checkpoints / STATE_FILE
        if not path.is_file():
            return 0
        state = json.loads(path.read_text())
        if state["config"] != self.config:
            saved = state["config"]
            changed = sorted(k for k in {*saved, *self.config} if saved.get(k) != self.config.get(k))
            raise InputError(
                f"{self.out_dir} holds a training run with other settings ({', '.join(changed)} "
                f"differ); use another output folder, or delete {self.checkpoints} to start over"
            )
        self.model.load_weights(self.checkpoints / state["weights"])
        self.state = state
        self.rows = [r for r in read_history(self.history_path) if r["epoch"] <= state["epoch"]]
        return self.done

    @property
    def done(self) -> int:
        """Epochs of this phase committed (0 before any training)."""
        return self.state["epoch"] - self.offset if self.state else 0

    @property
    def committed(self) -> dict:
        """The resume state of the last committed epoch; RuntimeError before any."""
        if self.state is None:
            raise RuntimeError(f"no epoch of {self.phase} committed yet")
        return self.state

    @property
    def best(self) -> dict:
        """``{"epoch", "val_loss", "val_accuracy", "weights"}`` of the best committed epoch."""
        return self.committed["best"]

    @property
    def stopped(self) -> bool:
        if not self.state:
            return False
        return self.state["wait"] >= self.patience

    def commit(self, epoch: int, metrics: dict, seconds: float, *, record: bool = True) -> None:
        """Make ``epoch`` (``offset``: the phase's starting weights) the resume point; with ``record`` add
        its history row (``record=False``: the starting weights of a later phase, already in the history)."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        name = f"epoch_{epoch:04d}.weights.h5"
        self.model.save_weights(self.checkpoints / f".tmp.{name}")
        os.replace(self.checkpoints / f".tmp.{name}", self.checkpoints / name)
        # rounded as history.csv writes them, so the state and the file agree
        row = {
            "epoch": epoch,
            "phase": self.phase,
            **{k: None if metrics.get(k) is None else float(f"{float(metrics[k]):.6g}") for k in HISTORY_FIELDS[2:-1]},
            "seconds": round(seconds, 3),
        }
        best = self.state["best"] if self.state else None
        if best is None or row["val_loss"] < best["val_loss"]:
            best, wait = (
                {"epoch": epoch, "val_accuracy": row["val_accuracy"], "val_loss": row["val_loss"], "weights": name},
                0,
            )
        else:
            wait = self.committed["wait"] + 1
        if record:
            self.rows = [r for r in self.rows if r["epoch"] < epoch] + [row]
            write_history(self.history_path, self.rows)
        self.state = {"config": self.config, "epoch": epoch, "weights": name, "best": best, "wait": wait}
        atomic_write(self.checkpoints / STATE_FILE, json.dumps(self.state, indent=2))
        for path in self.checkpoints.glob("epoch_*.weights.h5"):
            if path.name not in (name, best["weights"]):
                path.unlink()

    def callback(self) -> keras.callbacks.Callback:
        import keras

        def begin(epoch, logs=None):
            self.started = time.perf_counter()

        def end(epoch, logs=None):
            self.commit(self.offset + epoch + 1, logs or {}, time.perf_counter() - self.started)
            if self.stopped:
                self.model.stop_training = True

        return keras.callbacks.LambdaCallback(on_epoch_begin=begin, on_epoch_end=end)

    def restore_best(self) -> None:
        self.model.load_weights(self.checkpoints / self.best["weights"])


def fit_phase(
    run: TrainingRun,
    train_data: Callable[[int], keras.utils.PyDataset],
    val_data,
    epochs: int,
    *,
    verbose: int = 0,
    start: dict | None = None,
) -> int:
    """Train ``run.model`` for up to ``epochs`` epochs of this phase with early stopping, resuming after the
    last committed epoch, and leave it holding the best weights.

    ``train_data(first_epoch)`` makes the training batches (shuffled for that epoch on). Epoch 0 is the
    starting weights: evaluated on ``val_data`` (a candidate for the best), or, for a phase continuing an
    earlier one, ``start`` (that phase's best row: its weights are the ones the model holds now).
    Returns the phase's epochs already done when called (0: a fresh start).
    """
    resumed = run.resume()
    if run.state is None:
        if start is None:
            started = time.perf_counter()
            loss, accuracy = run.model.evaluate(val_data, verbose=verbose)
            run.commit(run.offset, {"val_loss": loss, "val_accuracy": accuracy}, time.perf_counter() - started)
        else:
            run.commit(run.offset, start, 0.0, record=False)
    if run.done < epochs and not run.stopped:
        run.model.fit(
            train_data(run.done),
            validation_data=val_data,
            epochs=epochs,
            initial_epoch=run.done,
            shuffle=False,
            callbacks=[run.callback()],
            verbose=verbose,
        )
    run.restore_best()
    return resumed


def evaluate_split(model: keras.Model, data, images: int, verbose: int = 0) -> SplitScore:
    """Loss and accuracy of ``model`` on ``data`` (``images`` of them)."""
    loss, accuracy = model.evaluate(data, verbose=verbose)
    return SplitScore(images, float(f"{loss:.6g}"), float(f"{accuracy:.6g}"))


# --------------------------------------------------------------------------------------------------- export


def _copy_entry(entry: StoreEntry, destination: Path) -> None:
    """Put ``model.onnx`` + ``meta.json`` of ``entry`` in ``destination``, replacing what was there."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        tmp.chmod(0o755)
        for name in (MODEL_FILE, META_FILE):
            shutil.copy2(entry.directory / name, tmp / name)
        if destination.exists():
            shutil.rmtree(destination)
        os.rename(tmp, destination)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def decodable(
    records: list[ImageRecord], size: int, resize: str, count: int, resize_filter: str = DEFAULT_RESIZE_FILTER
) -> np.ndarray:
    """The first ``count`` of ``records`` that decode, as a uint8 batch."""
    pixels: list[np.ndarray] = []
    for record in records:
        try:
            pixels.append(load_image(record.abspath, size, resize, resize_filter=resize_filter)[0])
        except ImageError:
            continue
        if len(pixels) == count:
            break
    return np.stack(pixels)


def _add_label_output(onnx_model) -> None:
    """An int64 ``label`` output (N,), the argmax of ``probabilities``, as fused classifiers have."""
    from onnx import TensorProto, helper

    graph = onnx_model.graph
    graph.node.append(helper.make_node("ArgMax", [OUTPUT_NAME], [LABEL_NAME], axis=1, keepdims=0, name=LABEL_NAME))
    batch = graph.input[0].type.tensor_type.shape.dim[0].dim_param or None
    graph.output.append(helper.make_tensor_value_info(LABEL_NAME, TensorProto.INT64, [batch]))


def export_classifier(model: keras.Model, size: int, path: Path, images: np.ndarray, record: dict, opset: int) -> dict:
    """Convert a uint8 -> probabilities Keras model to ONNX, check it against Keras, write it to ``path``.

    The ONNX model has input ``images`` (N, size, size, 3) uint8 RGB and outputs ``probabilities`` (N, C)
    float32 and ``label`` (N,) int64; it carries the fused-classifier metadata (``record`` with the class
    names, input size, outputs and verification figures) that ``tlpipe score --classifier`` reads.

    Parameters
    ----------
    model : keras.Model
        uint8 images -> softmax probabilities, columns in ``record["class_names"]`` order.
    images : numpy.ndarray
        uint8 (N, size, size, 3): the images ONNX Runtime and Keras are compared on.
    record : dict
        What the metadata says besides the standard fields; must hold ``class_names``.

    Returns
    -------
    dict
        The verification figures (max abs / relative difference, min cosine, images, tolerance).

    Raises
    ------
    VerificationError
        ONNX Runtime's probabilities differ from Keras' beyond the export tolerance; nothing is written.
    """
    import onnx

    onnx_model = convert(model, size, opset)
    rename_output(onnx_model, OUTPUT_NAME)
    _add_label_output(onnx_model)
    onnx.checker.check_model(onnx_model)
    reference = np.asarray(model(images, training=False))
    figures = verify(onnx_model.SerializeToString(), images, reference)
    record = {
        "format": CLASSIFIER_FORMAT,
        "kind": "classifier",
        **record,
        "input_size": size,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "channels": "RGB"},
        "outputs": {
            OUTPUT_NAME: "float32 (N, C), columns in class_names order",
            LABEL_NAME: "int64 (N,), index into class_names",
        },
        "opset": opset,
        "verification": figures,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    pixel_settings = {k: record[k] for k in ("resize", "resize_filter") if record.get(k)}  # score reads them
    write_metadata(
        onnx_model,
        record,
        kind="classifier",
        class_names=list(record["class_names"]),
        input_size=size,
        **pixel_settings,
    )
    atomic_write(path, onnx_model.SerializeToString())
    return figures


# --------------------------------------------------------------------------------------------------- stages


@dataclass
class PreparedFinetune:
    """Stage 1 of a fine-tune: everything decided before TensorFlow is imported."""

    source: Path
    out_dir: Path
    images: ImageSource
    split: DataSplit
    plan: ExportPlan
    options: TrainingOptions
    dropout: float
    store: ModelStore
    head: Path | None = None
    warm: tuple[np.ndarray, np.ndarray] | None = None  # Dense kernel (D, C) and bias (C,) folded from the head

    @property
    def class_names(self) -> list[str]:
        return self.images.class_names


@dataclass
class TrainedModel:
    """What the training stage leaves: the run (history, best epoch) and the test split's score."""

    run: TrainingRun
    resumed_from: int
    test: SplitScore | None
    failures: dict[str, str]

    @property
    def history(self) -> list[dict]:
        return self.run.rows


def records_digest(records: list[ImageRecord]) -> str:
    """sha256 over the relative paths and labels of ``records``: identifies a split for resuming."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(f"{record.relpath}\0{record.label}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def prepare_finetune(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    choice: ModelChoice | None = None,
    head: str | os.PathLike | None = None,
    trust: bool = False,
    dropout: float = 0.2,
    options: TrainingOptions | None = None,
    **choice_fields: Any,
) -> PreparedFinetune:
    """Stage 1: find the images, split them, plan the backbone export and fold the warm-start head.

    Cheap and without TensorFlow; every refusal (bad settings, a head that cannot warm-start this
    backbone) happens here, before ``out_dir`` is created.

    Raises
    ------
    ValueError
        Settings out of range, too few labelled images, or a head that cannot be folded or was fitted on
        other embeddings.
    """
    options = options or TrainingOptions()
    options.check()
    if not 0 <= dropout < 1:
        raise InputError(f"dropout must be in [0, 1), not {dropout}")
    choice = ModelChoice.given(choice, choice_fields, "finetune", FINETUNE_CHOICE)
    store = choice.model_store
    images = discover(source)
    split = split_records(images.records, options.val_fraction, options.seed)
    plan = choice.plan(seed=options.seed)
    warm = None
    if head is not None:
        dim = plan.embedding_dim()
        name = f"head {head}"
        estimator, metadata = load_head(head, trust=trust, expect_dim=dim)
        if not metadata:
            raise InputError(
                f"{name} has no sidecar: its class names and feature set are unknown, so it cannot "
                f"warm-start the classifier"
            )
        _check_head_features(metadata, plan, store, name)
        warm = fold_head(estimator, metadata, images.class_names, dim or metadata["feature_set"]["embedding_dim"], name)
        if not any(r.split == "val" for r in split.val):
            log.warning(
                "%s was fitted on training images, and the validation images are a hold-out of the "
                "training images: the head has probably seen them, so epoch 0's validation figures are "
                "optimistic and favour the warm start; give the source a 'val' split to avoid this",
                name,
            )
    return PreparedFinetune(
        Path(source),
        Path(out_dir),
        images,
        split,
        plan,
        options,
        dropout,
        store,
        Path(head) if head is not None else None,
        warm,
    )


def train_finetune(prepared: PreparedFinetune) -> tuple[FinetuneModels, TrainedModel]:
    """Stage 2: build the Keras models and train with per-epoch checkpoints (a re-run resumes), early
    stopping on validation loss with the warm start as epoch 0; score the test split with the best weights."""
    p, o = prepared, prepared.options
    p.out_dir.mkdir(parents=True, exist_ok=True)
    log.info("%s", p.split.description)
    models = build_models(
        p.plan,
        len(p.class_names),
        unfreeze_from=o.unfreeze_from,
        unfreeze_last=o.unfreeze_last,
        dropout=p.dropout,
        augment=o.augment,
        seed=o.seed,
    )
    if p.warm is not None:
        models.classifier.get_layer("classifier").set_weights(list(p.warm))
    compile_model(models.train, o, models.base)
    config = {
        "backbone": p.plan.spec.name,
        "size": p.plan.size,
        "pooling": p.plan.pooling,
        "weights": p.plan.weights.identity,
        "unfreeze_from": models.unfreeze_from,
        "class_names": p.class_names,
        "augment": o.augment,
        "selection": "val_loss",
        "learning_rate": o.learning_rate,
        "backbone_learning_rate": o.backbone_learning_rate,
        "validation": records_digest(p.split.val),
        "resize_filter": o.resize_filter,
        "head": hashlib.sha256(p.head.read_bytes()).hexdigest() if p.head is not None else None,
    }
    run = TrainingRun(p.out_dir, models.train, config, o.patience, phase="finetune")
    trained = train_keras(run, p.split, p.class_names, o, pixels=p.plan.size)
    plot_curves(trained.history, p.out_dir / "curves.png", "fine-tuning")
    return models, trained


def train_keras(
    run: TrainingRun, split: DataSplit, class_names: list[str], options: TrainingOptions, *, pixels: int
) -> TrainedModel:
    """Train ``run.model`` (uint8 images of side ``pixels`` in) on ``split`` as :func:`fit_phase` does, from
    images decoded batch by batch, then score the test split (if any) with the best weights."""
    o = options
    y_train, y_val = label_indices(split.train, class_names), label_indices(split.val, class_names)
    failures: dict[str, str] = {}
    val_data = image_batches(
        split.val, y_val, pixels, o.resize, o.batch_size, failures=failures, resize_filter=o.resize_filter
    )
    weights = balanced_weights(y_train) if o.class_weight else None

    def train_data(first_epoch: int):
        return image_batches(
            split.train,
            y_train,
            pixels,
            o.resize,
            o.batch_size,
            shuffle_seed=o.seed,
            first_epoch=first_epoch,
            failures=failures,
            sample_weights=weights,
            resize_filter=o.resize_filter,
        )

    resumed = fit_phase(run, train_data, val_data, o.epochs, verbose=1 if o.progress else 0)
    if resumed:
        log.info("resumed after epoch %d from %s", resumed, run.checkpoints)
    test = None
    if split.test:
        data = image_batches(
            split.test,
            label_indices(split.test, class_names),
            pixels,
            o.resize,
            o.batch_size,
            failures=failures,
            resize_filter=o.resize_filter,
        )
        kept = sum(r.relpath not in failures for r in split.test)
        test = evaluate_split(run.model, data, kept, verbose=1 if o.progress else 0)
    return TrainedModel(run, resumed, test, failures)


def export_finetune(prepared: PreparedFinetune, models: FinetuneModels, trained: TrainedModel) -> FinetuneResult:
    """Stage 3: save the backbone's weights, re-export it through the verified export path (stored under a
    key made from those weights), and write ``classifier.onnx`` (verified against Keras)."""
    p, run = prepared, trained.run
    out_dir, plan = p.out_dir, p.plan
    weights_path = out_dir / BACKBONE_WEIGHTS
    models.base.save_weights(out_dir / f".tmp.{BACKBONE_WEIGHTS}")
    os.replace(out_dir / f".tmp.{BACKBONE_WEIGHTS}", weights_path)
    tuned_plan = plan_export(plan.spec.name, weights_path, plan.size, None, plan.pooling, opset=plan.opset)
    provenance = {
        "finetuned_from": {
            "key": plan.key,
            "weights": plan.weights.identity,
            "source": str(p.source.resolve()),
            "head": str(p.head.resolve()) if p.head is not None else None,
            "best_epoch": run.best["epoch"],
            "best_val_accuracy": run.best["val_accuracy"],
            "best_val_loss": run.best["val_loss"],
        },
        "unfreeze_from": models.unfreeze_from,
    }
    entry = export_plan(tuned_plan, p.store, keras_model=models.embedding, extra_metadata=provenance)
    _copy_entry(entry, out_dir / "backbone")

    classifier_path = out_dir / CLASSIFIER_FILE
    sample = decodable(p.split.val, plan.size, p.options.resize, VERIFY_IMAGES, p.options.resize_filter)
    record = {
        "made_by": "finetune",
        "class_names": p.class_names,
        "backbone_key": entry.key,
        "backbone": plan.spec.name,
        "preprocessing": plan.spec.preprocessing,
        "resize": p.options.resize,
        "resize_filter": p.options.resize_filter,
        "test": trained.test.to_dict() if trained.test else None,
        **provenance,
    }
    export_classifier(models.classifier, plan.size, classifier_path, sample, record, plan.opset)

    history = trained.history
    trained_rows = [r for r in history if r["epoch"] > 0]
    return FinetuneResult(
        out_dir=out_dir,
        warm_start_val_accuracy=history[0]["val_accuracy"] if p.head is not None else None,
        best_val_accuracy=run.best["val_accuracy"],
        best_val_loss=run.best["val_loss"],
        best_epoch=run.best["epoch"],
        epochs_run=run.done,
        epoch_seconds=[r["seconds"] for r in trained_rows],
        history_path=run.history_path,
        curves_path=out_dir / "curves.png",
        backbone_entry=entry,
        classifier_path=classifier_path,
        unfreeze_from=models.unfreeze_from,
        class_names=p.class_names,
        setup=p.split.description,
        test=trained.test,
        resumed_from=trained.resumed_from,
        skipped=sorted(p.images.skipped + list(trained.failures.items())),
    )


def finetune(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    choice: ModelChoice | None = None,
    unfreeze_from: str | None = None,
    unfreeze_last: int | None = None,
    head: str | os.PathLike | None = None,
    trust: bool = False,
    epochs: int = 10,
    batch_size: int = 32,
    learning_rate: float = 1e-4,
    backbone_learning_rate: float | None = None,
    dropout: float = 0.2,
    augment: bool = True,
    class_weight: str | None = None,
    patience: int = 3,
    seed: int = 0,
    val_fraction: float = 0.2,
    resize: str = "squash",
    progress: bool = True,
    resize_filter: str = DEFAULT_RESIZE_FILTER,
    **choice_fields: Any,
) -> FinetuneResult:
    """Fine-tune ``backbone`` on the labelled images of ``source`` (folder or CSV manifest) into ``out_dir``.

    Runs :func:`prepare_finetune`, :func:`train_finetune` and :func:`export_finetune`. Writes
    ``history.csv``, ``curves.png``, ``checkpoints/`` (resume point), ``backbone.weights.h5`` (the
    fine-tuned backbone's Keras weights), ``backbone/`` (its verified ONNX export, also stored in ``store``
    under a key made from those weights' sha256) and ``classifier.onnx`` (uint8 images -> probabilities,
    a fused classifier that ``tlpipe score --classifier`` takes).

    Parameters
    ----------
    choice : ModelChoice, optional
        The backbone: its ``backbone``, ``weights``, ``weights_dir``, ``size``, ``pooling`` and ``store``
        (other fields are refused). Default: ``ModelChoice(**choice_fields)``, mobilenet_v2 with ImageNet weights.
    **choice_fields
        Without ``choice``: those fields by name (e.g. ``backbone="resnet50", size=160``).
    head : path, optional
        A saved logreg head (fitted on this backbone's embeddings) that warm-starts the Dense layer.
    learning_rate, backbone_learning_rate : float
        Adam's rate for the Dense layer and for the unfrozen backbone layers (None: the same).
    epochs, patience : int
        At most ``epochs`` epochs; stop after ``patience`` without a lower validation loss. The weights of
        the lowest validation loss are kept, epoch 0 (the starting weights) included, so the result is never
        worse on the validation images than the start.
    resize, resize_filter : str
        How images are resized ("squash" | "crop"; "bilinear" | "antialias", as in extract), recorded in the
        classifier: extract with the fine-tuned backbone using the same ones.

    Returns
    -------
    FinetuneResult
        Best epoch and its validation loss / accuracy, the test split's score (if the source has one),
        the stored backbone entry and the written paths.

    Raises
    ------
    ValueError
        Bad settings, too few labelled images, an unusable head, or an ``out_dir`` holding a run with other
        settings.
    VerificationError
        An ONNX export differs from Keras.
    """
    options = TrainingOptions(
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        backbone_learning_rate=backbone_learning_rate,
        augment=augment,
        class_weight=class_weight,
        patience=patience,
        seed=seed,
        val_fraction=val_fraction,
        resize=resize,
        resize_filter=resize_filter,
        progress=progress,
        unfreeze_from=unfreeze_from,
        unfreeze_last=unfreeze_last,
    )
    prepared = prepare_finetune(
        source,
        out_dir,
        choice=ModelChoice.given(choice, choice_fields, "finetune"),
        head=head,
        trust=trust,
        dropout=dropout,
        options=options,
    )
    models, trained = train_finetune(prepared)
    return export_finetune(prepared, models, trained)
