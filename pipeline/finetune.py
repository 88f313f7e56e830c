"""`tlpipe finetune` as a library function: images -> a Keras classifier on a partly unfrozen backbone ->
a re-exported backbone (same export path as ``tlpipe export``) and a whole-classifier ONNX model.

The model is ``uint8 images -> augmentation (training only) -> ImagePreprocessing -> backbone (called with
training=False) -> pooling -> Dropout -> Dense softmax``. Augmentation acts on float pixels in 0..255,
before the preprocessing scale, so ``RandomContrast`` clips to the true pixel range and the backbone sees
exactly what the exported graph feeds it. Layers before the unfreeze point stay frozen, and so do all
BatchNormalization layers (their statistics and affine parameters), as Keras' fine-tuning guide advises.

A saved logistic-regression head can warm-start the Dense layer: its StandardScaler is folded into the
weights, so before any training the model predicts what the head predicts on the backbone's embeddings.

Every epoch commits a checkpoint (weights with optimizer state, early-stopping counters, history) under
``out_dir/checkpoints``; a run started again on the same ``out_dir`` resumes after the last committed epoch.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tlpipe.backbones.export import (ExportPlan, INPUT_NAME, convert, export_plan, plan_export, rename_output,
                              verify)
from tlpipe.backbones.registry import BackboneSpec
from tlpipe.backbones.store import META_FILE, MODEL_FILE, ModelStore, StoreEntry
from tlpipe.features.fastdecode import DEFAULT_RESIZE_FILTER, check_resize_filter
from tlpipe.features.images import ImageError, load_image
from tlpipe.features.sources import ImageRecord, discover

from .artifacts import load_head

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

HISTORY_FIELDS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds")
OUTPUT_NAME = "probabilities"
BACKBONE_WEIGHTS = "backbone.weights.h5"
CLASSIFIER_FILE = "classifier.onnx"
STATE_FILE = "state.json"
VERIFY_IMAGES = 8  # validation images the classifier export is checked on


@dataclass
class FinetuneResult:
    """What a fine-tune produced; ``backbone_entry`` is the model-store entry of the re-exported backbone."""

    out_dir: Path
    warm_start_val_accuracy: float | None
    best_val_accuracy: float
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
    resumed_from: int = 0  # epochs already done when this call started
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "out_dir": str(self.out_dir), "warm_start_val_accuracy": self.warm_start_val_accuracy,
            "best_val_accuracy": self.best_val_accuracy, "best_epoch": self.best_epoch, "epochs_run": self.epochs_run,
            "epoch_seconds": self.epoch_seconds, "history": str(self.history_path), "curves": str(self.curves_path),
            "backbone_key": self.backbone_entry.key, "backbone": str(self.out_dir / "backbone"),
            "classifier": str(self.classifier_path), "unfreeze_from": self.unfreeze_from,
            "class_names": self.class_names, "setup": self.setup, "resumed_from": self.resumed_from,
            "skipped": [list(s) for s in self.skipped],
        }


@dataclass(frozen=True)
class DataSplit:
    train: list[ImageRecord]
    val: list[ImageRecord]
    description: str


def split_records(records: list[ImageRecord], val_fraction: float = 0.2, seed: int = 0) -> DataSplit:
    """Training and validation images: the source's 'val' split, else its 'test' split, else a stratified
    ``val_fraction`` hold-out (seeded). Images of the other splits train; unlabelled images are not used."""
    from sklearn.model_selection import train_test_split

    labelled = [r for r in records if r.label is not None]
    if not labelled:
        raise ValueError("no labelled images: fine-tuning needs class folders or a manifest with labels")
    splits = {r.split for r in labelled}
    val_split = "val" if "val" in splits else "test" if "test" in splits else None
    if val_split is not None:
        val = [r for r in labelled if r.split == val_split]
        train = [r for r in labelled if r.split not in ("val", "test")]
        description = f"train on {len(train)} images, validate on the source's '{val_split}' split ({len(val)} images)"
    else:
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be between 0 and 1, not {val_fraction}")
        labels = [r.label for r in labelled]
        counts = Counter(labels)
        stratified = min(counts.values()) >= 2 and math.ceil(val_fraction * len(labels)) >= len(counts)
        train, val = train_test_split(labelled, test_size=val_fraction, random_state=seed,
                                      stratify=labels if stratified else None)
        train, val = sorted(train, key=lambda r: r.relpath), sorted(val, key=lambda r: r.relpath)
        description = (f"{'stratified' if stratified else 'random'} hold-out (no val/test split in the source): "
                       f"train on {len(train)} images, validate on {len(val)} "
                       f"(val_fraction {val_fraction}, seed {seed})")
    if len({r.label for r in train}) < 2:
        raise ValueError("fine-tuning needs training images of at least two classes")
    if not val:
        raise ValueError("no validation images")
    return DataSplit(train, val, description)


# ----------------------------------------------------------------------------------------------- warm start

def fold_head(estimator, metadata: dict, class_names: list[str], embedding_dim: int,
              name: str = "head") -> tuple[np.ndarray, np.ndarray]:
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
        raise ValueError(f"{name} ends in a {type(clf).__name__}, not a LogisticRegression: only a logreg head "
                         f"(StandardScaler + LogisticRegression) is a linear softmax that can warm-start the Dense "
                         f"layer")
    mu, sigma = np.zeros(embedding_dim), np.ones(embedding_dim)
    for step_name, step in prep:
        if step is None or step == "passthrough":
            continue
        if not isinstance(step, StandardScaler):
            raise ValueError(f"{name} has a {type(step).__name__} step ({step_name!r}) that cannot be folded into "
                             f"the Dense layer (only StandardScaler can); fit a logreg head without it to warm-start")
        # (x - mu) / sigma, then this scaler: ((x - mu) / sigma - m) / s = (x - (mu + m sigma)) / (sigma s)
        if step.with_mean:
            mu = mu + step.mean_ * sigma
        if step.with_std:
            sigma = sigma * step.scale_
    coef, intercept = np.asarray(clf.coef_, np.float64), np.asarray(clf.intercept_, np.float64)
    if coef.shape[1] != embedding_dim:
        raise ValueError(f"{name} takes {coef.shape[1]}-dimensional embeddings, this backbone gives {embedding_dim}")
    kernel = coef / sigma
    bias = intercept - kernel @ mu
    if len(clf.classes_) == 2:
        kernel, bias = np.vstack([np.zeros_like(kernel), kernel]), np.concatenate([[0.0], bias])
    saved_names = metadata.get("class_names")
    if not saved_names:
        raise ValueError(f"{name} has no class names in its sidecar: cannot tell which output is which class")
    labels = [saved_names[int(c)] for c in clf.classes_]
    if sorted(labels) != sorted(class_names):
        raise ValueError(f"{name} was trained on classes {sorted(labels)}, the images have {sorted(class_names)}")
    order = [labels.index(c) for c in class_names]
    return kernel[order].T.astype(np.float32), bias[order].astype(np.float32)


def _check_head_features(metadata: dict, plan: ExportPlan, store: ModelStore, name: str) -> None:
    """The head must have been fitted on this backbone's embeddings (same key; converter versions may differ)."""
    saved = metadata.get("feature_set", {})
    model_key = saved.get("model_key") or saved.get("key")  # a feature-set key also names the resize filter
    if model_key == plan.key:
        return
    entry = store.get(model_key) if model_key else None
    if entry is not None:
        def unversioned(fields: dict) -> dict:
            return {k: v for k, v in fields.items() if k != "versions"}
        if unversioned(entry.metadata.get("key_fields", {})) == unversioned(plan.key_fields()):
            return
    raise ValueError(
        f"{name} was fitted on embeddings {saved.get('key')!r} ({saved.get('backbone')}, {saved.get('input_size')} px, "
        f"{saved.get('pooling')} pooling, layer {saved.get('layer')}); this fine-tune starts from {plan.key} "
        f"({plan.spec.name}, {plan.size} px, {plan.pooling} pooling, weights {plan.weights.identity}): fit the head "
        f"on embeddings of this backbone, size, pooling and weights")


# --------------------------------------------------------------------------------------------------- models

@dataclass
class FinetuneModels:
    """Keras models sharing one set of layers."""

    train: keras.Model  # uint8 -> augmentation -> ... -> Dropout -> softmax; what fit() trains
    classifier: keras.Model  # uint8 -> probabilities, no augmentation or dropout; exported as classifier.onnx
    embedding: keras.Model  # uint8 -> embeddings; exported as the fine-tuned backbone
    base: keras.Model
    unfreeze_from: str  # first trainable backbone layer


def resolve_unfreeze(base: keras.Model, spec: BackboneSpec, unfreeze_from: str | None = None,
                     unfreeze_last: int | None = None) -> int:
    """Index in ``base.layers`` of the first layer to train.

    ``unfreeze_from`` names a layer (a cut point such as ``block_15_add``) or a block prefix (``block_15``:
    the first layer named ``block_15`` or ``block_15`` + a non-digit, so not ``block_150``).
    ``unfreeze_last=N`` trains the last N blocks, blocks ending at the registry's cut points (the backbone's
    output is the end of the last one). Neither given: the last block.
    """
    if unfreeze_from is not None and unfreeze_last is not None:
        raise ValueError("give unfreeze_from or unfreeze_last, not both")
    names = [layer.name for layer in base.layers]
    if unfreeze_from is None:
        boundaries = [c.layer for c in spec.cut_points if c.layer != names[-1] and c.layer in names]
        n = 1 if unfreeze_last is None else unfreeze_last
        if not 1 <= n <= len(boundaries):
            raise ValueError(f"unfreeze_last must be between 1 and {len(boundaries)} for {spec.name} "
                             f"(blocks end at {', '.join(boundaries)} and the output)")
        return names.index(boundaries[-n]) + 1
    if unfreeze_from in names:
        return names.index(unfreeze_from)
    for i, name in enumerate(names):
        rest = name[len(unfreeze_from):]
        if name.startswith(unfreeze_from) and rest and not rest[0].isdigit():
            return i
    cuts = ", ".join(c.layer for c in spec.cut_points)
    raise ValueError(f"{spec.name} has no layer named or starting with {unfreeze_from!r}; cut points: {cuts}")


def set_trainable(base: keras.Model, start: int) -> None:
    """Freeze ``base.layers[:start]`` and every BatchNormalization layer; train the rest."""
    import keras

    base.trainable = True
    for i, layer in enumerate(base.layers):
        layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)


def build_models(plan: ExportPlan, n_classes: int, *, unfreeze_from: str | None = None,
                 unfreeze_last: int | None = None, dropout: float = 0.2, augment: bool = True,
                 seed: int = 0) -> FinetuneModels:
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
        x = keras.ops.cast(x, "float32")
        x = keras.Sequential([
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(0.05, seed=seed + 1),
            keras.layers.RandomZoom(0.1, seed=seed + 2),
            keras.layers.RandomContrast(0.1, value_range=(0, 255), seed=seed + 3),
        ], name="augmentation")(x)
    features = base(preprocessing(x), training=False)  # BatchNorm in inference mode even where unfrozen
    x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(pooling(features))
    train = keras.Model(images, dense(x), name=f"tlpipe_{plan.spec.name}_finetune")
    return FinetuneModels(train, classifier, embedding, base, base.layers[start].name)


# ----------------------------------------------------------------------------------------------------- data

def image_batches(records: list[ImageRecord], labels: np.ndarray, size: int, resize: str, batch_size: int, *,
                  shuffle_seed: int | None = None, first_epoch: int = 0, sample_weights: np.ndarray | None = None,
                  failures: dict[str, str] | None = None,
                  resize_filter: str = DEFAULT_RESIZE_FILTER) -> keras.utils.PyDataset:
    """A ``keras.utils.PyDataset`` decoding one batch at a time with :func:`features.images.load_image`.

    With ``shuffle_seed`` the order is a permutation drawn from (seed, epoch), so a resumed run sees the
    same order as an uninterrupted one. Undecodable images are left out of their batch and noted in ``failures``.
    """
    import keras

    class ImageBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=2, use_multiprocessing=False, max_queue_size=4)
            self.epoch = first_epoch
            self.order = self._order()

        def _order(self) -> np.ndarray:
            if shuffle_seed is None:
                return np.arange(len(records))
            return np.random.default_rng([shuffle_seed, self.epoch]).permutation(len(records))

        def __len__(self) -> int:
            return math.ceil(len(records) / batch_size)

        def __getitem__(self, index: int):
            rows, pixels = [], []
            for i in self.order[index * batch_size:(index + 1) * batch_size]:
                try:
                    pixels.append(load_image(records[i].abspath, size, resize, resize_filter=resize_filter)[0])
                    rows.append(i)
                except ImageError as exc:
                    if failures is not None:
                        failures[records[i].relpath] = exc.reason
                    log.warning("skipping %s: %s", records[i].relpath, exc.reason)
            if not rows:
                raise ImageError(f"no image of batch {index} could be decoded")
            batch = (np.stack(pixels), labels[rows])
            return batch if sample_weights is None else (*batch, sample_weights[rows])

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self.order = self._order()

    return ImageBatches()


def balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Per-image weights n / (classes * count of its class), scikit-learn's "balanced"."""
    classes, counts = np.unique(labels, return_counts=True)
    per_class = dict(zip(classes, len(labels) / (len(classes) * counts)))
    return np.array([per_class[c] for c in labels], np.float32)


# --------------------------------------------------------------------------------------- history, checkpoints

def read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [{k: (int(v) if k == "epoch" else float(v) if v != "" else None) for k, v in row.items()}
                for row in csv.DictReader(fh)]


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_history(path: Path, rows: list[dict]) -> None:
    lines = [",".join(HISTORY_FIELDS)]
    for row in rows:
        lines.append(",".join("" if row.get(k) is None else str(row[k])
                              for k in HISTORY_FIELDS))
    _atomic_write_text(path, "\n".join(lines) + "\n")


def plot_curves(rows: list[dict], path: Path) -> None:
    """Training and validation accuracy and loss per epoch (epoch 0: before training, validation only)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    for ax, metric in zip(figure.subplots(1, 2), ("accuracy", "loss")):
        for prefix, label, style in (("", "train", "o-"), ("val_", "validation", "s-")):
            points = [(r["epoch"], r[prefix + metric]) for r in rows if r.get(prefix + metric) is not None]
            if points:
                ax.plot(*zip(*points), style, label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle("fine-tuning (epoch 0: before training)")
    figure.savefig(path, dpi=100)


class _Run:
    """Per-epoch bookkeeping: history rows, early stopping on validation accuracy, and the checkpoint.

    An epoch is committed when ``state.json`` names its weights file; history rows past the committed
    epoch (written just before a crash) are dropped on resume.
    """

    def __init__(self, out_dir: Path, model: keras.Model, config: dict, patience: int):
        self.out_dir, self.model, self.config, self.patience = out_dir, model, config, patience
        self.checkpoints = out_dir / "checkpoints"
        self.history_path = out_dir / "history.csv"
        self.state: dict | None = None
        self.rows: list[dict] = []
        self.started = 0.0

    def resume(self) -> int:
        """Load the last committed epoch, if any; returns the epochs already done."""
        path = self.checkpoints / STATE_FILE
        if not path.is_file():
            return 0
        state = json.loads(path.read_text())
        if state["config"] != self.config:
            saved = state["config"]
            changed = sorted(k for k in {*saved, *self.config} if saved.get(k) != self.config.get(k))
            raise ValueError(f"{self.out_dir} holds a fine-tune with other settings ({', '.join(changed)} differ); "
                             f"use another output folder, or delete {self.checkpoints} to start over")
        self.model.load_weights(self.checkpoints / state["weights"])
        self.state = state
        self.rows = [r for r in read_history(self.history_path) if r["epoch"] <= state["epoch"]]
        return state["epoch"]

    @property
    def done(self) -> int:
        return self.state["epoch"] if self.state else 0

    @property
    def stopped(self) -> bool:
        return bool(self.state) and self.state["wait"] >= self.patience

    def commit(self, epoch: int, metrics: dict, seconds: float) -> None:
        """Record epoch ``epoch`` (0: before training) and make it the resume point."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        name = f"epoch_{epoch:04d}.weights.h5"
        self.model.save_weights(self.checkpoints / f".tmp.{name}")
        os.replace(self.checkpoints / f".tmp.{name}", self.checkpoints / name)
        # rounded as history.csv writes them, so the state and the file agree
        row = {"epoch": epoch, **{k: None if metrics.get(k) is None else float(f"{float(metrics[k]):.6g}")
                                  for k in HISTORY_FIELDS[1:-1]}, "seconds": round(seconds, 3)}
        score = (row["val_accuracy"], -row["val_loss"])
        best = self.state["best"] if self.state else None
        if best is None or score > (best["val_accuracy"], -best["val_loss"]):
            best, wait = {"epoch": epoch, "val_accuracy": row["val_accuracy"], "val_loss": row["val_loss"],
                          "weights": name}, 0
        else:
            wait = self.state["wait"] + 1
        self.rows = [r for r in self.rows if r["epoch"] < epoch] + [row]
        write_history(self.history_path, self.rows)
        self.state = {"config": self.config, "epoch": epoch, "weights": name, "best": best, "wait": wait}
        _atomic_write_text(self.checkpoints / STATE_FILE, json.dumps(self.state, indent=2))
        for path in self.checkpoints.glob("epoch_*.weights.h5"):
            if path.name not in (name, best["weights"]):
                path.unlink()

    def callback(self) -> keras.callbacks.Callback:
        import keras

        def begin(epoch, logs=None):
            self.started = time.perf_counter()

        def end(epoch, logs=None):
            self.commit(epoch + 1, logs or {}, time.perf_counter() - self.started)
            if self.stopped:
                self.model.stop_training = True

        return keras.callbacks.LambdaCallback(on_epoch_begin=begin, on_epoch_end=end)

    def restore_best(self) -> None:
        self.model.load_weights(self.checkpoints / self.state["best"]["weights"])


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


def _decodable(records: list[ImageRecord], size: int, resize: str, count: int,
               resize_filter: str = DEFAULT_RESIZE_FILTER) -> np.ndarray:
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


def export_classifier(model: keras.Model, size: int, path: Path, images: np.ndarray, metadata: dict,
                      opset: int) -> dict:
    """Convert the uint8 -> probabilities model, check it against Keras with ONNX Runtime, write it."""
    onnx_model = convert(model, size, opset)
    rename_output(onnx_model, OUTPUT_NAME)
    reference = np.asarray(model(images, training=False))
    figures = verify(onnx_model.SerializeToString(), images, reference)
    props = {"tlpipe": json.dumps({**metadata, "output": OUTPUT_NAME, "verification": figures}, sort_keys=True),
             "tlpipe.class_names": json.dumps(metadata["class_names"]), "tlpipe.output": OUTPUT_NAME,
             "tlpipe.input_size": str(size), "tlpipe.resize_filter": metadata.get("resize_filter", "")}
    for key, value in props.items():
        prop = onnx_model.metadata_props.add()
        prop.key, prop.value = key, value
    payload = onnx_model.SerializeToString()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as fh:
        fh.write(payload)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return figures


# ------------------------------------------------------------------------------------------------- finetune

def finetune(source: str | os.PathLike, out_dir: str | os.PathLike, *, backbone: str = "mobilenet_v2",
             weights: str | os.PathLike | None = "imagenet", weights_dir: str | os.PathLike | None = None,
             size: int | None = None, pooling: str = "avg", unfreeze_from: str | None = None,
             unfreeze_last: int | None = None, head: str | os.PathLike | None = None, trust: bool = False,
             epochs: int = 10, batch_size: int = 32, learning_rate: float = 1e-4, dropout: float = 0.2,
             augment: bool = True, class_weight: str | None = None, patience: int = 3, seed: int = 0,
             val_fraction: float = 0.2, store: ModelStore | None = None, resize: str = "squash",
             progress: bool = True, resize_filter: str = DEFAULT_RESIZE_FILTER) -> FinetuneResult:
    """Fine-tune ``backbone`` on the labelled images of ``source`` (folder or CSV manifest) into ``out_dir``.

    Writes ``history.csv``, ``curves.png``, ``checkpoints/`` (resume point), ``backbone.weights.h5`` (the
    fine-tuned backbone's Keras weights), ``backbone/`` (its verified ONNX export, also stored in ``store``
    under a key made from those weights' sha256) and ``classifier.onnx`` (uint8 images -> probabilities).
    ``head``: a saved logreg head (fitted on this backbone's embeddings) that warm-starts the Dense layer.
    Early stopping keeps the best validation accuracy, epoch 0 (before training) included. Images are
    resized with ``resize`` and ``resize_filter`` (recorded in the classifier; extract the fine-tuned backbone
    with the same filter).
    """
    check_resize_filter(resize_filter)
    if epochs < 0 or batch_size < 1 or patience < 1:
        raise ValueError("epochs must be >= 0, batch_size and patience >= 1")
    if class_weight not in (None, "balanced"):
        raise ValueError(f"class_weight must be None or 'balanced', not {class_weight!r}")
    store = store or ModelStore()
    out_dir = Path(out_dir)
    images = discover(source)
    split = split_records(images.records, val_fraction, seed)
    class_names = images.class_names
    plan = plan_export(backbone, weights, size, None, pooling, weights_dir, seed=seed)
    dim = plan.embedding_dim()
    warm = None
    if head is not None:
        name = f"head {head}"
        estimator, metadata = load_head(head, trust=trust, expect_dim=dim)
        if not metadata:
            raise ValueError(f"{name} has no sidecar: its class names and feature set are unknown, so it cannot "
                             f"warm-start the classifier")
        _check_head_features(metadata, plan, store, name)
        warm = fold_head(estimator, metadata, class_names, dim or metadata["feature_set"]["embedding_dim"], name)
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("%s", split.description)

    import keras

    models = build_models(plan, len(class_names), unfreeze_from=unfreeze_from, unfreeze_last=unfreeze_last,
                          dropout=dropout, augment=augment, seed=seed)
    dense = models.classifier.get_layer("classifier")
    if warm is not None:
        dense.set_weights(list(warm))
    model = models.train
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.optimizer.build(model.trainable_variables)  # so every checkpoint holds the optimizer state
    config = {"backbone": plan.spec.name, "size": plan.size, "pooling": pooling, "weights": plan.weights.identity,
              "unfreeze_from": models.unfreeze_from, "class_names": class_names, "augment": augment,
              "head": hashlib.sha256(Path(head).read_bytes()).hexdigest() if head is not None else None,
              "resize_filter": resize_filter}
    run = _Run(out_dir, model, config, patience)
    resumed_from = run.resume()
    if resumed_from:
        log.info("resuming after epoch %d from %s", resumed_from, run.checkpoints)

    index = {name: i for i, name in enumerate(class_names)}
    y_train = np.array([index[r.label] for r in split.train], np.int32)
    y_val = np.array([index[r.label] for r in split.val], np.int32)
    failures: dict[str, str] = {}
    val_data = image_batches(split.val, y_val, plan.size, resize, batch_size, failures=failures,
                             resize_filter=resize_filter)
    verbose = 1 if progress else 0
    if run.state is None:
        started = time.perf_counter()
        loss, accuracy = model.evaluate(val_data, verbose=verbose)
        run.commit(0, {"val_loss": loss, "val_accuracy": accuracy}, time.perf_counter() - started)
    if run.done < epochs and not run.stopped:
        train_data = image_batches(split.train, y_train, plan.size, resize, batch_size, shuffle_seed=seed,
                                   first_epoch=run.done, failures=failures, resize_filter=resize_filter,
                                   sample_weights=balanced_weights(y_train) if class_weight else None)
        model.fit(train_data, validation_data=val_data, epochs=epochs, initial_epoch=run.done, shuffle=False,
                  callbacks=[run.callback()], verbose=verbose)
    run.restore_best()
    history = run.rows
    plot_curves(history, out_dir / "curves.png")

    weights_path = out_dir / BACKBONE_WEIGHTS
    models.base.save_weights(out_dir / f".tmp.{BACKBONE_WEIGHTS}")
    os.replace(out_dir / f".tmp.{BACKBONE_WEIGHTS}", weights_path)
    tuned_plan = plan_export(plan.spec.name, weights_path, plan.size, None, pooling, opset=plan.opset)
    provenance = {"finetuned_from": {"key": plan.key, "weights": plan.weights.identity,
                                     "source": str(Path(source).resolve()),
                                     "head": str(Path(head).resolve()) if head is not None else None,
                                     "best_epoch": run.state["best"]["epoch"],
                                     "best_val_accuracy": run.state["best"]["val_accuracy"]},
                  "unfreeze_from": models.unfreeze_from}
    entry = export_plan(tuned_plan, store, keras_model=models.embedding, extra_metadata=provenance)
    _copy_entry(entry, out_dir / "backbone")

    classifier_path = out_dir / CLASSIFIER_FILE
    sample = _decodable(split.val, plan.size, resize, VERIFY_IMAGES, resize_filter)
    export_classifier(models.classifier, plan.size, classifier_path, sample,
                      {"backbone_key": entry.key, "backbone": plan.spec.name, "class_names": class_names,
                       "preprocessing": plan.spec.preprocessing, "resize": resize, "resize_filter": resize_filter, **provenance}, plan.opset)

    trained = [r for r in history if r["epoch"] > 0]
    return FinetuneResult(
        out_dir=out_dir, warm_start_val_accuracy=history[0]["val_accuracy"] if head is not None else None,
        best_val_accuracy=run.state["best"]["val_accuracy"], best_epoch=run.state["best"]["epoch"],
        epochs_run=run.done, epoch_seconds=[r["seconds"] for r in trained], history_path=run.history_path,
        curves_path=out_dir / "curves.png", backbone_entry=entry, classifier_path=classifier_path,
        unfreeze_from=models.unfreeze_from, class_names=class_names, setup=split.description,
        resumed_from=resumed_from, skipped=sorted(images.skipped + list(failures.items())))
