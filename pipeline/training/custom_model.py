"""`tlpipe custom-model` as a library function: new trainable layers on a truncated, frozen backbone,
trained in TensorFlow and exported as one fused ONNX classifier.

The practitioners' guides' third way to reuse a pretrained CNN: keep the backbone up to a cut point (VGG16
up to ``block1_pool``, say), freeze it, and train **new layers** on its feature maps (convolutions and
pooling, global pooling, a small dense layer with batch normalisation, a softmax). The model is::

    uint8 images -> [augmentation, training only] -> ImagePreprocessing (the export contract)
        -> backbone up to the cut point (frozen, called with training=False: BatchNorm in inference mode)
        -> the new layers -> Dense softmax ("classifier")

The new layers are written in a small layer language (:data:`NEW_LAYERS_HELP`), e.g.
``conv:128,pool,conv:256,pool,gap,dense:64,bn,dropout:0.3``.

Training reuses the fine-tune stage's machinery (:mod:`tlpipe.pipeline.training.finetune`): the validation split
(the source's 'val', else a stratified hold-out of the training images), early stopping on validation loss
with the starting weights as epoch 0, per-epoch checkpoints and resume, ``history.csv`` and ``curves.png``,
the test split scored once with the best weights, and the verified classifier export that ``tlpipe score
--classifier`` takes. Optionally a second phase unfreezes the backbone's last blocks (``unfreeze_from`` /
``unfreeze_last``, as fine-tune) once the new layers have converged, at a lower backbone learning rate.

Feature-map caching: without augmentation the frozen part computes the same maps every epoch, so they are
computed once (a float32 memory-mapped array per split under ``out_dir/feature-maps``, deleted at the end)
and the new layers train on them. With augmentation, and in the unfreeze phase, each epoch runs the whole
model on decoded images.

From scratch (``backbone="none"``, the guides' baseline before any transfer): no backbone and no cut point;
the new layers start on the preprocessed image itself (pixels scaled to [0, 1], :data:`SCRATCH_PREPROCESSING`,
or another contract named by ``preprocessing``), every layer trainable from a seeded random initialisation::

    uint8 images -> [augmentation, training only] -> ImagePreprocessing -> the new layers -> Dense softmax

Everything else (validation split, early stopping, checkpoints, history, curves, test split, export,
``summary.json``) is the same code path as a transfer run, so the outputs carry the same fields.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlpipe.backbones.atomic import atomic_write
from tlpipe.backbones.choice import ModelChoice
from tlpipe.backbones.export import DEFAULT_OPSET, INPUT_NAME, ExportPlan
from tlpipe.backbones.registry import PREPROCESSING_MODES
from tlpipe.errors import InputError
from tlpipe.features.fastdecode import DEFAULT_RESIZE_FILTER
from tlpipe.features.images import ImageError, load_image
from tlpipe.features.sources import ImageRecord, ImageSource, discover
from tlpipe.pipeline.training.finetune import (
    CLASSIFIER_FILE,
    VERIFY_IMAGES,
    DataSplit,
    SplitScore,
    TrainingOptions,
    TrainingRun,
    augmentation,
    balanced_weights,
    batches,
    compile_model,
    decodable,
    evaluate_split,
    export_classifier,
    fit_phase,
    image_batches,
    label_indices,
    plot_curves,
    records_digest,
    resolve_unfreeze,
    set_trainable,
    split_records,
)
from tlpipe.pipeline.training.new_layers import NEW_LAYERS_HELP, NewLayer, parse_new_layers  # noqa: F401 (re-exported)

__all__ = [
    "BN_MOMENTUM",
    "CUSTOM_MODEL_CHOICE",
    "CustomModelResult",
    "CustomModels",
    "FEATURE_MAPS",
    "FeatureMaps",
    "NO_BACKBONE",
    "SCRATCH_PREPROCESSING",
    "SUMMARY_FILE",
    "PreparedCustomModel",
    "TrainedCustomModel",
    "build_custom_models",
    "build_scratch_models",
    "count_params",
    "export_custom_model",
    "fit_custom_model",
    "map_batches",
    "parameter_counts",
    "prepare_custom_model",
    "train_custom_model",
    "truncate",
]

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)
CUSTOM_MODEL_CHOICE = ("backbone", "layer", "weights", "weights_dir", "size")  # the ModelChoice fields it takes

PHASE_NEW, PHASE_UNFREEZE = "new-layers", "unfreeze"
NO_BACKBONE = "none"  # backbone="none": the new layers train from scratch on the image itself
SCRATCH_PREPROCESSING = "unit"  # x / 255: pixels in [0, 1], as the guides' from-scratch CNN
SUMMARY_FILE = "summary.json"
FEATURE_MAPS = "feature-maps"
# Keras' default 0.99 needs hundreds of steps before the moving statistics that inference (validation, the
# export) uses match the batches; a small data set gives a dozen steps an epoch.
BN_MOMENTUM = 0.9


def _keras_layer(layer: NewLayer, index: int, seed: int):
    import keras

    name = f"new_{index}_{layer.kind}"
    if layer.kind == "conv":
        return keras.layers.Conv2D(layer.units, layer.kernel, padding="same", activation="relu", name=name)
    if layer.kind == "pool":
        return keras.layers.MaxPooling2D(2, name=name)
    if layer.kind == "gap":
        return keras.layers.GlobalAveragePooling2D(name=name)
    if layer.kind == "gmp":
        return keras.layers.GlobalMaxPooling2D(name=name)
    if layer.kind == "flatten":
        return keras.layers.Flatten(name=name)
    if layer.kind == "dense":
        return keras.layers.Dense(layer.units, activation="relu", name=name)
    if layer.kind == "bn":
        return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=name)
    return keras.layers.Dropout(layer.rate, seed=seed + index, name=name)


# --------------------------------------------------------------------------------------------------- models


@dataclass
class CustomModels:
    """Keras models sharing one set of layers."""

    train: keras.Model  # uint8 -> [augmentation] -> preprocessing -> backbone -> new layers; end-to-end training
    classifier: keras.Model  # uint8 -> probabilities without augmentation; exported as classifier.onnx
    top: keras.Model  # feature maps -> probabilities: the new layers alone (trained on cached feature maps)
    frozen: keras.Model  # uint8 -> feature maps at the cut point
    base: keras.Model  # the backbone up to the cut point


def truncate(plan: ExportPlan, layer: str) -> keras.Model:
    """The Keras backbone of ``plan`` up to the layer named ``layer`` (a registry cut point or any layer).

    Raises
    ------
    ValueError
        The backbone has no layer of that name (the message lists the registry's cut points).
    """
    import keras

    from tlpipe.backbones import keras_build

    full = keras_build.build_base(plan.spec, plan.size, plan.weights)
    try:
        output = full.get_layer(layer).output
    except ValueError:
        cuts = ", ".join(c.layer for c in plan.spec.cut_points)
        raise InputError(
            f"{plan.spec.name} has no layer {layer!r}; cut points: {cuts} (any layer name of the "
            f"Keras model is accepted)"
        ) from None
    return keras.Model(full.inputs, output, name=f"{full.name}_{layer}")


def build_custom_models(
    plan: ExportPlan, layer: str, new_layers: list[NewLayer], n_classes: int, *, augment: bool = False, seed: int = 0
) -> CustomModels:
    """Build the models: backbone of ``plan`` cut at ``layer`` (frozen), ``new_layers``, a softmax."""
    import keras

    from tlpipe.backbones.keras_build import ImagePreprocessing

    base = truncate(plan, layer)
    set_trainable(base, None)
    preprocessing = ImagePreprocessing(plan.spec.preprocessing, name="preprocessing")
    top = _new_layers_model(tuple(base.output.shape[1:]), new_layers, n_classes, seed)
    images = keras.Input((plan.size, plan.size, 3), dtype="uint8", name=INPUT_NAME)
    frozen = keras.Model(images, base(preprocessing(images), training=False), name="tlpipe_frozen_part")
    classifier = keras.Model(images, top(frozen(images)), name=f"tlpipe_{plan.spec.name}_custom_model")
    x = images
    if augment:  # on float pixels in 0..255, before the preprocessing, as fine-tune does
        x = augmentation(seed)(keras.ops.cast(x, "float32"))
    train = keras.Model(images, top(base(preprocessing(x), training=False)), name="tlpipe_custom_model_train")
    return CustomModels(train, classifier, top, frozen, base)


def _new_layers_model(shape: tuple, new_layers: list[NewLayer], n_classes: int, seed: int) -> keras.Model:
    """feature maps (or preprocessed images) -> the new layers -> softmax; weights drawn after seeding."""
    import keras

    keras.utils.set_random_seed(seed)
    layers = [_keras_layer(new, i, seed) for i, new in enumerate(new_layers, 1)]
    layers.append(keras.layers.Dense(n_classes, activation="softmax", name="classifier"))
    maps = keras.Input(shape, name="feature_maps")
    x = maps
    for keras_layer in layers:
        x = keras_layer(x)
    return keras.Model(maps, x, name="tlpipe_new_layers")


def build_scratch_models(
    size: int,
    new_layers: list[NewLayer],
    n_classes: int,
    *,
    preprocessing: str = SCRATCH_PREPROCESSING,
    augment: bool = False,
    seed: int = 0,
) -> CustomModels:
    """Build the models of a from-scratch run (``backbone="none"``): no backbone, the new layers on the
    preprocessed image, every weight trainable and drawn from a random initialisation seeded by ``seed``.

    Parameters
    ----------
    size : int
        Square input side in pixels; the models take uint8 (N, size, size, 3) RGB.
    new_layers : list of NewLayer
        Parsed layer language (:func:`parse_new_layers`); a Dense softmax over ``n_classes`` is added.
    preprocessing : str
        A key of :data:`tlpipe.backbones.registry.PREPROCESSING_MODES` ("unit": x / 255).
    augment : bool
        Put the training augmentation (flip, rotation, zoom, contrast) in front of ``train``.
    seed : int
        Seeds the initialisation and the dropout / augmentation layers.

    Returns
    -------
    CustomModels
        ``top`` holds every weight; ``base`` is an identity model without weights (nothing frozen) and
        ``frozen`` is the preprocessing alone.
    """
    import keras

    from tlpipe.backbones.keras_build import ImagePreprocessing

    top = _new_layers_model((size, size, 3), new_layers, n_classes, seed)
    scale = ImagePreprocessing(preprocessing, name="preprocessing")
    pixels = keras.Input((size, size, 3), name="preprocessed")
    base = keras.Model(pixels, keras.layers.Identity(name="no_backbone")(pixels), name="tlpipe_no_backbone")
    images = keras.Input((size, size, 3), dtype="uint8", name=INPUT_NAME)
    frozen = keras.Model(images, scale(images), name="tlpipe_preprocessing")
    classifier = keras.Model(images, top(scale(images)), name="tlpipe_scratch_custom_model")
    x = images
    if augment:
        x = augmentation(seed)(keras.ops.cast(x, "float32"))
    train = keras.Model(images, top(scale(x)), name="tlpipe_custom_model_train")
    return CustomModels(train, classifier, top, frozen, base)


def count_params(weights) -> int:
    return int(sum(math.prod(w.shape) for w in weights))


def parameter_counts(models: CustomModels) -> dict:
    """Parameters as Keras' ``model.summary()`` counts them: the frozen backbone part, the new layers'
    trainable weights, and their non-trainable ones (BatchNormalization's moving statistics)."""
    return {
        "frozen": count_params(models.base.weights),
        "trainable": count_params(models.top.trainable_weights),
        "non_trainable_new": count_params(models.top.non_trainable_weights),
    }


# ----------------------------------------------------------------------------------------------- feature maps


class FeatureMaps:
    """Feature maps of the frozen part for one split, computed once: a float32 (N, h, w, c) array in a
    memory-mapped ``.npy`` file (written under a temporary name, renamed when complete), and the indices of
    the records that decoded."""

    def __init__(self, directory: Path, name: str):
        self.path = directory / f"{name}.npy"
        self.kept_path = directory / f"{name}.kept.npy"
        self.identity_path = directory / f"{name}.json"  # written last: what the maps were computed from

    def compute(
        self,
        frozen: keras.Model,
        records: list[ImageRecord],
        size: int,
        resize: str,
        batch_size: int,
        failures: dict[str, str],
        identity: dict,
        resize_filter: str = DEFAULT_RESIZE_FILTER,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The maps (memory-mapped, read-only) and kept indices; reused only when a complete earlier
        computation had the same ``identity`` (model settings) and the same records, else computed."""
        expected = {"identity": identity, "records": records_digest(records)}
        if self.identity_path.is_file() and self.path.is_file() and self.kept_path.is_file():
            saved = json.loads(self.identity_path.read_text())
            if {k: saved.get(k) for k in expected} == expected:
                failures.update(saved.get("failures", {}))
                return np.load(self.path, mmap_mode="r"), np.load(self.kept_path)
        self.identity_path.unlink(missing_ok=True)
        split_failures: dict[str, str] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".tmp.{self.path.name}")
        shape = tuple(int(d) for d in frozen.output.shape[1:])
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(records), *shape))
        kept: list[int] = []
        for start in range(0, len(records), batch_size):
            pixels, rows = [], []
            for i in range(start, min(start + batch_size, len(records))):
                try:
                    pixels.append(load_image(records[i].abspath, size, resize, resize_filter=resize_filter)[0])
                    rows.append(i)
                except ImageError as exc:
                    split_failures[records[i].relpath] = exc.reason
                    log.warning("skipping %s: %s", records[i].relpath, exc.reason)
            if rows:
                out[len(kept) : len(kept) + len(rows)] = frozen.predict_on_batch(np.stack(pixels))
                kept.extend(rows)
        out.flush()
        del out
        if len(kept) < len(records):  # rewrite without the rows of undecodable images
            full = np.load(tmp, mmap_mode="r")
            np.save(self.path.with_name(f".tmp2.{self.path.name}"), full[: len(kept)])
            del full
            os.replace(self.path.with_name(f".tmp2.{self.path.name}"), tmp)
        np.save(self.kept_path, np.asarray(kept, np.int64))
        os.replace(tmp, self.path)
        self.identity_path.write_text(json.dumps({**expected, "failures": split_failures}))
        failures.update(split_failures)
        return np.load(self.path, mmap_mode="r"), np.asarray(kept, np.int64)


def map_batches(
    maps: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    shuffle_seed: int | None = None,
    first_epoch: int = 0,
    sample_weights: np.ndarray | None = None,
):
    """Batches of cached feature maps, in the order :func:`image_batches` would give the same images."""

    def load(indices: np.ndarray):
        return np.asarray(maps[indices]), indices

    return batches(
        len(maps),
        load,
        labels,
        batch_size,
        shuffle_seed=shuffle_seed,
        first_epoch=first_epoch,
        sample_weights=sample_weights,
        workers=1,
    )


# ---------------------------------------------------------------------------------------------------- result


@dataclass
class CustomModelResult:
    """What :func:`fit_custom_model` produced.

    ``best_epoch`` is the epoch of the lowest validation loss over both phases (0: the untrained new
    layers were never beaten); ``test`` scores the best weights on the source's 'test' split (None without).
    ``params``: frozen (backbone up to the cut point), trainable and non-trainable parameters of the new
    layers, and ``unfrozen_backbone`` (trained in the unfreeze phase; 0 without it).
    ``epoch_seconds``: wall time of each trained epoch (training pass + validation pass);
    ``feature_map_seconds``: the one-off pass of the frozen part over every split (None when not cached).
    ``backbone`` is "none" and ``layer`` None for a from-scratch run (``params["frozen"]`` 0).
    """

    out_dir: Path
    classifier_path: Path
    history_path: Path
    curves_path: Path
    class_names: list[str]
    setup: str
    backbone: str
    size: int
    preprocessing: str
    layer: str | None
    new_layers: str
    params: dict
    best_epoch: int
    best_val_loss: float
    best_val_accuracy: float
    epochs_run: int
    epoch_seconds: list[float]
    feature_maps_cached: bool
    feature_map_seconds: float | None
    test: SplitScore | None
    unfreeze_from: str | None = None
    resumed_from: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "out_dir": str(self.out_dir),
            "classifier": str(self.classifier_path),
            "history": str(self.history_path),
            "curves": str(self.curves_path),
            "class_names": self.class_names,
            "setup": self.setup,
            "backbone": self.backbone,
            "size": self.size,
            "preprocessing": self.preprocessing,
            "layer": self.layer,
            "new_layers": self.new_layers,
            "params": self.params,
            "best_epoch": self.best_epoch,
            "best_val_loss": self.best_val_loss,
            "best_val_accuracy": self.best_val_accuracy,
            "epochs_run": self.epochs_run,
            "epoch_seconds": self.epoch_seconds,
            "feature_maps_cached": self.feature_maps_cached,
            "feature_map_seconds": self.feature_map_seconds,
            "test": self.test.to_dict() if self.test else None,
            "unfreeze_from": self.unfreeze_from,
            "resumed_from": self.resumed_from,
            "skipped": [list(s) for s in self.skipped],
        }


# ------------------------------------------------------------------------------------------------------ stages


@dataclass
class PreparedCustomModel:
    """Stage 1: everything decided before TensorFlow is imported."""

    source: Path
    out_dir: Path
    images: ImageSource
    split: DataSplit
    plan: ExportPlan | None  # None: from scratch (backbone "none")
    layer: str | None
    new_layers: list[NewLayer]
    spec: str
    options: TrainingOptions
    unfreeze: bool
    unfreeze_epochs: int
    cache_feature_maps: bool
    size: int = 0
    preprocessing: str = ""

    @property
    def class_names(self) -> list[str]:
        return self.images.class_names

    @property
    def backbone(self) -> str:
        return NO_BACKBONE if self.plan is None else self.plan.spec.name

    @property
    def weights(self) -> str:
        return f"random init, seed {self.options.seed}" if self.plan is None else self.plan.weights.identity

    @property
    def opset(self) -> int:
        return DEFAULT_OPSET if self.plan is None else self.plan.opset

    @property
    def title(self) -> str:
        if self.plan is None:
            return f"from scratch at {self.size} px ({len(self.new_layers)} new layers, no backbone)"
        return f"custom model: {self.spec} on {self.backbone} up to {self.layer}"


def prepare_custom_model(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    choice: ModelChoice | None = None,
    new_layers: str,
    options: TrainingOptions | None = None,
    unfreeze_epochs: int | None = None,
    cache_feature_maps: bool = True,
    preprocessing: str | None = None,
    **choice_fields: Any,
) -> PreparedCustomModel:
    """Stage 1: check the settings and the layer language, find and split the images, resolve the weights.

    With ``choice.backbone == "none"`` (from scratch) it refuses a cut point, a weights file or folder, a
    missing size, a size too small for the pool layers, and the unfreeze settings (nothing is frozen);
    ``preprocessing`` defaults to "unit" (x / 255). With a registry backbone ``preprocessing`` must be None
    or the backbone's own contract. Raises ``InputError`` (a ValueError) naming the setting."""
    options = options or TrainingOptions(learning_rate=1e-3, augment=False)
    options.check()
    parsed = parse_new_layers(new_layers)
    unfreeze = options.unfreeze_from is not None or options.unfreeze_last is not None
    if unfreeze_epochs is not None and unfreeze_epochs < 0:
        raise InputError(f"unfreeze_epochs must be >= 0, not {unfreeze_epochs}")
    if unfreeze_epochs and not unfreeze:
        raise InputError("unfreeze_epochs needs unfreeze_from or unfreeze_last (which blocks to unfreeze)")
    choice = ModelChoice.given(choice, choice_fields, "custom-model", CUSTOM_MODEL_CHOICE)
    if choice.backbone == NO_BACKBONE:
        _check_scratch(choice, parsed, options, unfreeze, unfreeze_epochs)
        mode = SCRATCH_PREPROCESSING if preprocessing is None else preprocessing
        if mode not in PREPROCESSING_MODES or mode == "builtin":
            known = ", ".join(m for m in PREPROCESSING_MODES if m != "builtin")
            raise InputError(f"unknown preprocessing {mode!r} for backbone 'none'; one of: {known}")
        plan, layer, size = None, None, int(choice.size or 0)
        if cache_feature_maps and not options.augment:
            log.info("backbone 'none': no frozen part, so no feature maps to cache; every epoch decodes the images")
        cache_feature_maps = False
    else:
        if choice.backbone is None or choice.layer is None:
            raise InputError(
                "a custom model needs a registry backbone and the layer to cut it at (or backbone 'none' and a "
                "size: the new layers trained from scratch on the image)"
            )
        plan, layer = choice.with_(layer=None).plan(seed=options.seed), choice.layer
        size, mode = plan.size, plan.spec.preprocessing
        if preprocessing is not None and preprocessing != mode:
            raise InputError(
                f"{plan.spec.name} takes its own preprocessing {mode!r}, not {preprocessing!r}; "
                "preprocessing is for backbone 'none'"
            )
    images = discover(source)
    split = split_records(images.records, options.val_fraction, options.seed)
    return PreparedCustomModel(
        Path(source),
        Path(out_dir),
        images,
        split,
        plan,
        layer,
        parsed,
        ",".join(t.token for t in parsed),
        options,
        unfreeze,
        options.epochs if unfreeze_epochs is None else unfreeze_epochs,
        cache_feature_maps and not options.augment,
        size,
        mode,
    )


def _check_scratch(
    choice: ModelChoice, layers: list[NewLayer], options: TrainingOptions, unfreeze: bool, unfreeze_epochs: int | None
) -> None:
    """Refuse what cannot work without a backbone, naming it."""
    if choice.layer is not None:
        raise InputError(
            f"backbone 'none' has no layer to cut at (got layer {choice.layer!r}): the new layers start on the "
            "image itself; drop the layer, or name a registry backbone"
        )
    if choice.size is None:
        raise InputError("backbone 'none' needs a size (the square input side in pixels): there is no backbone default")
    if choice.weights_dir is not None or str(choice.weights) not in ("imagenet", "none"):
        raise InputError(
            f"backbone 'none' loads no weights (got weights {str(choice.weights)!r}"
            f"{', weights_dir' if choice.weights_dir is not None else ''}): every layer starts from a seeded random "
            "initialisation"
        )
    if unfreeze or unfreeze_epochs or options.backbone_learning_rate is not None:
        raise InputError(
            "backbone 'none' has nothing frozen: unfreeze_from / unfreeze_last / unfreeze_epochs / "
            "backbone_learning_rate need a registry backbone (every new layer trains from the first epoch)"
        )
    pools = sum(layer.kind == "pool" for layer in layers)
    if choice.size < 2**pools:
        raise InputError(
            f"size {choice.size} is too small for {pools} pool layers (each halves the side): at least {2**pools} px"
        )


@dataclass
class TrainedCustomModel:
    models: CustomModels
    run: TrainingRun  # the last phase's run (its best is the best over both phases)
    params: dict
    unfreeze_from: str | None
    resumed_from: int
    test: SplitScore | None
    failures: dict[str, str]
    feature_map_seconds: float | None


def train_custom_model(prepared: PreparedCustomModel) -> TrainedCustomModel:
    """Stage 2: build the models; train the new layers (on cached feature maps without augmentation), then,
    if asked, the backbone's last blocks with them; score the test split with the best weights."""
    p, o = prepared, prepared.options
    p.out_dir.mkdir(parents=True, exist_ok=True)
    log.info("%s", p.split.description)
    if p.plan is None:
        models = build_scratch_models(
            p.size, p.new_layers, len(p.class_names), preprocessing=p.preprocessing, augment=o.augment, seed=o.seed
        )
    else:
        assert p.layer is not None
        models = build_custom_models(p.plan, p.layer, p.new_layers, len(p.class_names), augment=o.augment, seed=o.seed)
    params = {**parameter_counts(models), "unfrozen_backbone": 0}
    start = (
        resolve_unfreeze(models.base, p.plan.spec, o.unfreeze_from, o.unfreeze_last)
        if p.unfreeze and p.plan is not None
        else None
    )
    verbose = 1 if o.progress else 0
    classes = p.class_names
    y = {name: label_indices(getattr(p.split, name), classes) for name in ("train", "val", "test")}
    weights = balanced_weights(y["train"]) if o.class_weight else None
    failures: dict[str, str] = {}
    config = {
        "backbone": p.backbone,
        "size": p.size,
        "weights": p.weights,
        "layer": p.layer,
        "preprocessing": p.preprocessing,
        "new_layers": p.spec,
        "class_names": classes,
        "augment": o.augment,
        "learning_rate": o.learning_rate,
        "seed": o.seed,
        "validation": records_digest(p.split.val),
        "feature_maps": p.cache_feature_maps,
        "resize_filter": o.resize_filter,
    }

    # phase 1: the new layers on the frozen backbone
    first = TrainingRun(
        p.out_dir,
        models.top if p.cache_feature_maps else models.train,
        config,
        o.patience,
        phase=PHASE_NEW,
        checkpoints=p.out_dir / "checkpoints" / PHASE_NEW,
    )
    second_checkpoints = p.out_dir / "checkpoints" / PHASE_UNFREEZE
    phase_two_started = p.unfreeze and (second_checkpoints / "state.json").is_file()
    compile_model(first.model, o)
    map_seconds = None
    maps: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if p.cache_feature_maps and not phase_two_started:
        started = time.perf_counter()
        directory = p.out_dir / FEATURE_MAPS
        identity = {k: config[k] for k in ("backbone", "size", "weights", "layer")} | {
            "resize": o.resize,
            "resize_filter": o.resize_filter,
        }
        for name in ("train", "val", "test"):
            records = getattr(p.split, name)
            if records:
                maps[name] = FeatureMaps(directory, name).compute(
                    models.frozen, records, p.size, o.resize, o.batch_size, failures, identity, o.resize_filter
                )
        map_seconds = round(time.perf_counter() - started, 3)
        log.info("feature maps of the frozen part: %.1f s", map_seconds)

    def first_train(first_epoch: int):
        if p.cache_feature_maps:
            array, kept = maps["train"]
            return map_batches(
                array,
                y["train"][kept],
                o.batch_size,
                shuffle_seed=o.seed,
                first_epoch=first_epoch,
                sample_weights=None if weights is None else weights[kept],
            )
        return image_batches(
            p.split.train,
            y["train"],
            p.size,
            o.resize,
            o.batch_size,
            shuffle_seed=o.seed,
            first_epoch=first_epoch,
            failures=failures,
            sample_weights=weights,
            resize_filter=o.resize_filter,
        )

    def val_images():
        return image_batches(
            p.split.val, y["val"], p.size, o.resize, o.batch_size, failures=failures, resize_filter=o.resize_filter
        )

    if phase_two_started:
        resumed = first.resume()
    else:
        val = (
            map_batches(maps["val"][0], y["val"][maps["val"][1]], o.batch_size)
            if p.cache_feature_maps
            else val_images()
        )
        resumed = fit_phase(first, first_train, val, o.epochs, verbose=verbose)
    run, unfreeze_from = first, None

    # phase 2: the backbone's last blocks with the new layers, end to end
    if p.unfreeze and start is not None:
        set_trainable(models.base, start)
        unfreeze_from = models.base.layers[start].name
        params["unfrozen_backbone"] = count_params(models.base.trainable_weights)
        backbone_lr = o.backbone_learning_rate if o.backbone_learning_rate is not None else o.learning_rate / 10
        options = TrainingOptions(**{**o.__dict__, "backbone_learning_rate": backbone_lr})
        compile_model(models.train, options, models.base)
        second = TrainingRun(
            p.out_dir,
            models.train,
            {**config, "unfreeze_from": unfreeze_from, "backbone_learning_rate": backbone_lr, "after": first.best},
            o.patience,
            phase=PHASE_UNFREEZE,
            checkpoints=second_checkpoints,
            offset=first.committed["epoch"],
            rows=first.rows,
        )

        def second_train(first_epoch: int):
            return image_batches(
                p.split.train,
                y["train"],
                p.size,
                o.resize,
                o.batch_size,
                shuffle_seed=o.seed + 1,
                first_epoch=first_epoch,
                failures=failures,
                sample_weights=weights,
                resize_filter=o.resize_filter,
            )

        resumed += fit_phase(second, second_train, val_images(), p.unfreeze_epochs, verbose=verbose, start=first.best)
        run = second
    plot_curves(run.rows, p.out_dir / "curves.png", p.title)

    test = None
    if p.split.test:
        if "test" in maps and run is first:  # the new layers alone, on the cached maps
            array, kept = maps["test"]
            test = evaluate_split(models.top, map_batches(array, y["test"][kept], o.batch_size), len(kept), verbose)
        else:
            data = image_batches(
                p.split.test,
                y["test"],
                p.size,
                o.resize,
                o.batch_size,
                failures=failures,
                resize_filter=o.resize_filter,
            )
            decoded = sum(r.relpath not in failures for r in p.split.test)
            test = evaluate_split(models.train, data, decoded, verbose)  # compiled; augmentation inactive here
    return TrainedCustomModel(models, run, params, unfreeze_from, resumed, test, failures, map_seconds)


def export_custom_model(prepared: PreparedCustomModel, trained: TrainedCustomModel) -> CustomModelResult:
    """Stage 3: write ``classifier.onnx`` (uint8 images -> probabilities, verified against Keras, with the
    fused-classifier metadata) and drop the cached feature maps."""
    p, run = prepared, trained.run
    path = p.out_dir / CLASSIFIER_FILE
    sample = decodable(p.split.val, p.size, p.options.resize, VERIFY_IMAGES, p.options.resize_filter)
    record = {
        "made_by": "custom-model",
        "class_names": p.class_names,
        "backbone": p.backbone,
        "layer": p.layer,
        "new_layers": p.spec,
        "weights": p.weights,
        "preprocessing": p.preprocessing,
        "resize": p.options.resize,
        "resize_filter": p.options.resize_filter,
        "params": trained.params,
        "unfreeze_from": trained.unfreeze_from,
        "source": str(p.source.resolve()),
        "best_epoch": run.best["epoch"],
        "best_val_loss": run.best["val_loss"],
        "best_val_accuracy": run.best["val_accuracy"],
        "test": trained.test.to_dict() if trained.test else None,
    }
    export_classifier(trained.models.classifier, p.size, path, sample, record, p.opset)
    shutil.rmtree(p.out_dir / FEATURE_MAPS, ignore_errors=True)
    trained_rows = [r for r in run.rows if r["epoch"] > 0]
    result = CustomModelResult(
        out_dir=p.out_dir,
        classifier_path=path,
        history_path=run.history_path,
        curves_path=p.out_dir / "curves.png",
        class_names=p.class_names,
        setup=p.split.description,
        backbone=p.backbone,
        size=p.size,
        preprocessing=p.preprocessing,
        layer=p.layer,
        new_layers=p.spec,
        params=trained.params,
        best_epoch=run.best["epoch"],
        best_val_loss=run.best["val_loss"],
        best_val_accuracy=run.best["val_accuracy"],
        epochs_run=run.committed["epoch"],
        epoch_seconds=[r["seconds"] for r in trained_rows],
        feature_maps_cached=p.cache_feature_maps,
        feature_map_seconds=trained.feature_map_seconds,
        test=trained.test,
        unfreeze_from=trained.unfreeze_from,
        resumed_from=trained.resumed_from,
        skipped=sorted(p.images.skipped + list(trained.failures.items())),
    )
    atomic_write(p.out_dir / SUMMARY_FILE, json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def fit_custom_model(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    choice: ModelChoice | None = None,
    new_layers: str,
    epochs: int = 20,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    augment: bool = False,
    class_weight: str | None = None,
    patience: int = 3,
    seed: int = 0,
    val_fraction: float = 0.2,
    unfreeze_from: str | None = None,
    unfreeze_last: int | None = None,
    unfreeze_epochs: int | None = None,
    backbone_learning_rate: float | None = None,
    cache_feature_maps: bool = True,
    resize: str = "squash",
    progress: bool = True,
    resize_filter: str = DEFAULT_RESIZE_FILTER,
    preprocessing: str | None = None,
    **choice_fields: Any,
) -> CustomModelResult:
    """Train new layers on ``backbone`` cut at ``layer`` (frozen), or from scratch on the image itself
    (``backbone="none"``), and export them as one ONNX classifier.

    Runs :func:`prepare_custom_model`, :func:`train_custom_model` and :func:`export_custom_model`. Writes
    ``out_dir/history.csv`` (epoch 0: the untrained new layers; a ``phase`` column), ``curves.png``,
    ``checkpoints/`` (a re-run with the same settings resumes after the last committed epoch) and
    ``classifier.onnx`` (input ``images`` uint8 (N, S, S, 3) RGB, outputs ``probabilities`` float32 (N, C)
    and ``label`` int64 (N,); class names in the metadata), which ``tlpipe score --classifier`` takes, and
    ``summary.json`` (:meth:`CustomModelResult.to_dict`: the same fields for a transfer and a from-scratch run).

    Parameters
    ----------
    source : path
        Labelled images: class folders, split folders or a CSV manifest. Validation: its 'val' split, else a
        stratified ``val_fraction`` hold-out of the training images; its 'test' split is scored at the end.
    choice : ModelChoice, optional
        Its ``backbone`` (a registry backbone, or "none": no backbone, train from scratch), ``layer`` (where to
        cut it: a cut point, or any layer name of the Keras model; refused with "none"), ``weights``,
        ``weights_dir`` and ``size`` (required with "none"); other fields are refused.
    **choice_fields
        Without ``choice``: those fields by name (e.g. ``backbone="mobilenet_v2", layer="block_13_expand_relu"``).
    new_layers : str
        The layer language, :data:`NEW_LAYERS_HELP`.
    epochs, patience, learning_rate : int, int, float
        The new layers train for at most ``epochs`` epochs with Adam at ``learning_rate``, stopping after
        ``patience`` epochs without a lower validation loss; the weights of the lowest one are kept.
    augment : bool
        Flip, rotation, zoom, contrast while training. Off (default), the frozen part's feature maps are
        computed once and cached (``cache_feature_maps``), which makes epochs much cheaper.
    unfreeze_from, unfreeze_last, unfreeze_epochs, backbone_learning_rate
        After the new layers converge, train the backbone's last blocks (from layer / block prefix
        ``unfreeze_from``, or the last ``unfreeze_last`` blocks, as fine-tune) together with them for up to
        ``unfreeze_epochs`` (default ``epochs``) more epochs, the backbone at ``backbone_learning_rate``
        (default ``learning_rate / 10``). BatchNormalization stays frozen.
    preprocessing : str, optional
        With ``backbone="none"``: how uint8 pixels reach the first new layer, a key of
        :data:`tlpipe.backbones.registry.PREPROCESSING_MODES` (default "unit": x / 255, pixels in [0, 1]).
        With a registry backbone: None (its own contract; another value is refused).
    resize, resize_filter : str
        How images are resized ("squash" | "crop"; "bilinear" | "antialias", as in extract); recorded in the
        classifier, which ``tlpipe score --model`` then resizes with.

    Returns
    -------
    CustomModelResult
        Parameter counts, best epoch and its validation loss / accuracy, seconds per epoch, test score.

    Raises
    ------
    ValueError
        Bad settings, a bad layer-language token (named), an unknown layer, too few labelled images, or an
        ``out_dir`` holding a run with other settings.
    VerificationError
        The ONNX classifier differs from Keras.
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
    prepared = prepare_custom_model(
        source,
        out_dir,
        choice=ModelChoice.given(choice, choice_fields, "custom-model"),
        new_layers=new_layers,
        options=options,
        unfreeze_epochs=unfreeze_epochs,
        cache_feature_maps=cache_feature_maps,
        preprocessing=preprocessing,
    )
    return export_custom_model(prepared, train_custom_model(prepared))
