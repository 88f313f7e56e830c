"""Extraction: images -> backbone -> HDF5 cache, as one run of the streaming stage
(:mod:`tlpipe.features.stream`) into a :class:`CacheSink`.

Content the feature set already holds is hashed but not decoded; each batch's embeddings are committed
in input order (:class:`tlpipe.features.cache.CacheWriter`), so a kill loses at most the batches in
flight and a re-run resumes from the committed rows. The local engine is :class:`~.stream.LocalEngine`;
``--engine ray`` is :func:`tlpipe.features.ray_engine.extract_ray`, the same run on Ray.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from tlpipe.backbones.choice import ModelChoice
from tlpipe.backbones.export import FeatureModel, obtain_layers
from tlpipe.backbones.registry import POOLINGS
from tlpipe.backbones.runtime import DEVICES, physical_cores
from tlpipe.backbones.store import StoreEntry
from tlpipe.backbones.tta import check_tta
from tlpipe.errors import InputError

from .cache import CacheError, CacheWriter, ImageRow, feature_set_key
from .calibration import resolve_entry
from .colour import COLOUR
from .decoder import Decoded
from .fastdecode import DEFAULT_RESIZE_FILTER, RESIZE_FILTERS
from .images import RESIZE_MODES
from .sources import ImageRecord, ImageSource, discover
from .spec import FeatureSpec
from .stream import LocalEngine, MultiSizeModel, Progress, Sink, StageModel, StreamSummary, run_stream

__all__ = ["CacheSink", "ExtractSummary", "check_extract_options", "extract", "extract_into", "open_source"]
log = logging.getLogger(__name__)


@dataclass
class ExtractSummary(StreamSummary):
    """What an extract did (printed by the CLI, returned by :func:`extract`); ``key`` is the feature set."""

    key: str = ""
    resize: str = "squash"
    resize_filter: str = DEFAULT_RESIZE_FILTER
    relabelled: int = 0  # cached rows whose path, label or split this run's listing changed (no re-embedding)
    label_conflicts: list[dict] = field(default_factory=list)  # contents that carry two or more labels
    gone: list[tuple[str, str]] = field(default_factory=list)  # (path, "gone" | "changed"): cached rows whose file
    # this run found gone from the source or changed since it was cached (CacheWriter.mark_missing)
    warnings: list[str] = field(default_factory=list)  # about the source (layout, manifest)
    keys: list[str] = field(default_factory=list)  # every feature set this extract filled (key is the first)
    augmented: list[Any] = field(default_factory=list)  # AugmentSummary per feature set (extract --augment N)

    @property
    def embedded(self) -> int:
        """Images embedded and committed this run."""
        return self.processed

    @property
    def cached(self) -> int:
        """Images whose content the feature set already held."""
        return self.known


class CacheSink(Sink):
    """The HDF5 cache as the stage's sink: feature set ``key`` of ``writer``; content already in the
    feature set is known (not decoded); failures go to the cache's failure table.

    ``key`` may name several feature sets filled by one model (a multi-output export: one pass decodes and
    runs each image once for all its layers); ``widths`` then gives each one's columns of the model's
    output, in order. Content is known when every one of them holds it; a feature set that already holds
    a row keeps it (:meth:`CacheWriter.add` drops repeats), so a pass killed between two of them resumes.
    No input is done by path (the cache is keyed by content); the writer is closed by its owner.
    """

    def __init__(self, writer: CacheWriter, key: str | Sequence[str], source: int = -1, widths: Sequence[int] = ()):
        self.writer, self.source = writer, source
        self.keys = [key] if isinstance(key, str) else list(key)
        edges = np.cumsum([0, *widths])
        self.columns = [slice(a, b) for a, b in zip(edges[:-1], edges[1:])] or [slice(None)]
        if len(self.columns) != len(self.keys):
            raise InputError("several feature sets need one width each")
        self.seen: dict[str, list[tuple[str, str | None, str | None]]] = {}  # sha256 -> (path, label, split)

    def known_shas(self) -> set[str]:
        """All content every feature set of this sink holds."""
        covered = set.intersection(*(self.writer.rows_with(key) for key in self.keys))
        return {sha for sha, row in self.writer.index.items() if row in covered}

    def append(self, items: Sequence[Decoded], outputs: np.ndarray) -> None:
        """Commit the embeddings of the decoded ``items`` and the failures among them; note where every readable
        content was seen (for :meth:`CacheWriter.reconcile`: label conflicts, moved or relabelled files)."""
        rows, failures = [], []
        for i in items:
            path, label, split = i.record.relpath, i.record.label, i.record.split
            if i.error is not None:
                failures.append((path, i.sha256, i.error))
                continue
            self.seen.setdefault(i.sha256, []).append((path, label, split))
            if not i.known:
                rows.append(ImageRow(path, i.sha256, label, split, *i.size, self.source))
        for key, columns in zip(self.keys, self.columns):
            self.writer.add(key, rows, outputs[:, columns])  # no rows: nothing written
        if failures:
            self.writer.add_failures(failures, source=self.source)


def open_source(
    source: str | os.PathLike[str], out: str | os.PathLike[str], allow_outside_root: bool = False
) -> ImageSource:
    """The images of ``source``, after checking there are some and that the cache ``out`` can be written
    (before any model is exported or the cache touched).

    Parameters
    ----------
    source : path
        Folder or CSV manifest.
    out : path
        The cache file to write.
    allow_outside_root : bool
        Accept manifest paths outside the manifest's folder.

    Returns
    -------
    ImageSource

    Raises
    ------
    CacheError
        No images, ``out`` is a folder, or its folder does not exist.
    """
    images = discover(source, allow_outside_root=allow_outside_root)
    if not images.records:
        skipped = f" ({len(images.skipped)} files skipped)" if images.skipped else ""
        raise CacheError(f"no images found in {source}{skipped}")
    out = Path(out)
    if out.is_dir():
        raise CacheError(f"{out} is a folder; give the cache file's path, e.g. {out / 'cache.h5'}")
    if not out.parent.exists():
        raise CacheError(f"cannot write {out}: folder {out.parent} does not exist")
    return images


def extract_into(
    writer: CacheWriter,
    records: Sequence[ImageRecord],
    entry: StoreEntry | Sequence[FeatureModel],
    engine: Any,
    *,
    model: Any = None,
    source: int = -1,
    batch_size: int = 32,
    dtype: str = "float32",
    resize: str = "squash",
    resize_filter: str = DEFAULT_RESIZE_FILTER,
    progress: Progress | None = None,
) -> ExtractSummary:
    """Run the stage with ``engine`` (local or Ray) into the feature set of ``entry`` in the open cache ``writer``,
    or into the feature set of every output of several models in one pass.

    The feature set is created (or checked) under these settings: every setting that changes an embedding is
    part of its key and metadata (:func:`tlpipe.features.cache.feature_set_key`), so rows made another way are
    never mixed into it.

    Parameters
    ----------
    writer : CacheWriter
        The open cache.
    records : sequence of ImageRecord
        The inputs.
    entry : StoreEntry or sequence of FeatureModel
        The backbone (see :func:`tlpipe.features.calibration.resolve_entry`); or models of distinct input
        sizes, each with one or more outputs (:func:`tlpipe.backbones.export.obtain_layers`), each output
        filling the feature set of its one-output entry: every image is read, hashed and decoded once
        and run once through each model (local engine only).
    engine : LocalEngine or RayEngine
        How the stage runs (entered by the caller).
    model : OnnxEmbedder, optional
        An already loaded session of ``entry`` (local engine only; e.g. the one an
        :class:`~tlpipe.features.transformer.EmbeddingTransformer` keeps); default: ``entry``'s model file.
    source : int
        The source's index (:meth:`CacheWriter.note_source`); with one (``records`` its complete listing), the
        image table is then reconciled with the listing (moved or relabelled files, label conflicts), and the
        source's rows whose file is gone or changed since it was cached are marked (``summary.gone``).
    batch_size, dtype, resize, resize_filter, progress
        As for :func:`extract`.

    Returns
    -------
    ExtractSummary

    Raises
    ------
    CacheError
        The feature set has another dimension / dtype.
    ValueError
        A setting that is not one of its choices.
    """
    check_extract_options(resize=resize, resize_filter=resize_filter, dtype=dtype)
    models = [FeatureModel(entry, (("", entry),))] if isinstance(entry, StoreEntry) else entry  # "": the first output
    targets = [t for m in models for _, t in m.outputs]
    keys = [feature_set_key(t.key, resize, resize_filter) for t in targets]
    summary = ExtractSummary(out=str(writer.path), key=keys[0], keys=keys, resize=resize, resize_filter=resize_filter)
    for key, t in zip(keys, targets):
        settings = {
            "key": t.key,
            "feature_set_key": key,
            "resize": resize,
            "resize_filter": resize_filter,
            "colour": COLOUR,  # embedded ICC profiles rendered to sRGB (tlpipe.features.colour)
        }
        before = writer.ensure_feature_set(key, t.embedding_dim, dtype, metadata=t.metadata | settings)
        if before is not None:
            summary.warnings.append(_colour_warning(key, before))
            log.warning("%s", summary.warnings[-1])
    sink = CacheSink(writer, keys, source, [t.embedding_dim for t in targets])
    stages = [
        StageModel(m.entry.model_path, m.input_size, tuple(name for name, _ in m.outputs if name)) for m in models
    ]
    model = model or (stages[0] if len(stages) == 1 else MultiSizeModel(tuple(stages)))
    run_stream(
        records,
        model,
        sink,
        summary,
        engine=engine,
        batch_size=batch_size,
        resize=resize,
        resize_filter=resize_filter,
        unique=True,
        progress=progress,
    )
    if source >= 0:
        from .cache import _recorded_sources

        recorded = _recorded_sources(writer.file)
        path = recorded[source] if source < len(recorded) else None
        folder = path if path is not None and os.path.isdir(path) else None  # a manifest's paths are what it lists
        summary.relabelled, summary.label_conflicts = writer.reconcile(source, sink.seen)
        summary.gone = writer.mark_missing(source, sink.seen, {r.relpath for r in records}, root=folder)
    return summary


def _colour_warning(key: str, before: str) -> str:
    return (
        f"feature set {key} was made before tlpipe rendered embedded colour profiles (ICC) to sRGB (it records "
        f"colour {before!r}): its rows of images with a wide-gamut or other non-sRGB profile hold raw code values, "
        "while the rows added now are rendered; it now records colour 'mixed'. To have every row alike, extract "
        "into a new cache"
    )


OPTION_CHOICES = {
    "resize": RESIZE_MODES,
    "resize_filter": RESIZE_FILTERS,
    "dtype": ("float32", "float16"),
    "device": DEVICES,
    "precision": ("fp32", "int8", "fp16"),
    "pooling": POOLINGS,
}  # the allowed values of extract's options that have a fixed set of them


def check_extract_options(**options: str) -> None:
    """Validate options of :func:`extract` (any of :data:`OPTION_CHOICES`, by name) before anything is read,
    exported or written.

    Raises
    ------
    ValueError
        An option value that is not one of its choices, naming the option as the CLI spells it and the choices.
    """
    for name, value in options.items():
        if value not in OPTION_CHOICES[name]:
            choices = ", ".join(OPTION_CHOICES[name])
            raise InputError(f"--{name.replace('_', '-')} must be one of {choices}, not {value!r}")


def _check_engine_options(engine: Any, *, augment: int, several: bool, tta: str) -> None:
    """The Ray engine extracts one feature set without TTA or augmented views (the rule, in one place)."""
    if engine is None or getattr(engine, "name", "local") != "ray":
        return
    if augment:
        raise InputError("--augment runs on the local engine (drop --engine ray)")
    if several or tta != "none":
        raise InputError(
            "--engine ray extracts one feature set without TTA; use the local engine for --tta or "
            "several --size/--layer values"
        )


def _settings_of_key(
    choice: ModelChoice, resize: str | None, resize_filter: str | None, dtype: str | None
) -> tuple[FeatureSpec, str, str, str]:
    """The run's feature spec with its image settings decided (:meth:`FeatureSpec.settled`): a feature-set key
    given as the model supplies what it spells out; settings given here win over the spec's unset ones."""
    base = choice if isinstance(choice, FeatureSpec) else FeatureSpec(**vars(choice))
    spec = replace(
        base,
        resize=resize or base.resize,
        resize_filter=resize_filter or base.resize_filter,
        dtype=dtype or base.dtype,
    ).settled()
    assert spec.resize is not None and spec.resize_filter is not None  # settled
    return spec, spec.resize, spec.resize_filter, spec.dtype


def extract(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    choice: ModelChoice | None = None,
    device: str = "auto",
    batch_size: int = 32,
    dtype: str | None = None,
    resize: str | None = None,
    resize_filter: str | None = None,
    workers: int | None = None,
    threads: int | None = None,
    streams: int | None = None,
    allow_outside_root: bool = False,
    recalibrate: bool = False,
    progress: Progress | None = None,
    sizes: list[int | None] | None = None,
    layers: list[str | None] | None = None,
    engine: Any = None,
    augment: int = 0,
    augment_seed: int = 0,
    **choice_fields: Any,
) -> ExtractSummary:
    """Embed every image of ``source`` into the HDF5 cache ``out`` (created or appended to).

    Re-running skips content already cached for this feature set and appends the rest; one row per
    unique content (by sha256); unreadable or non-image inputs are recorded in the cache's failure table.

    Parameters
    ----------
    source : path
        Folder (class folders, split folders or flat) or CSV manifest (path[,label][,split]).
    out : path
        The cache file.
    choice : ModelChoice, optional
        Which backbone (default: ``ModelChoice(**choice_fields)``, the registry's mobilenet_v2 with ImageNet
        weights). Its ``precision`` int8 / fp16 uses that variant (its own feature set): the stored one, or one
        made now, calibrated on a sample of ``source`` (``recalibrate`` forces that) and verified against fp32.
        Its ``tta`` ("none" | "flip" | "flip+crops") is the export whose graph averages the embeddings of those
        views (:mod:`tlpipe.backbones.tta`); part of the feature set's key.
    device : str
        "auto" | "cpu" | "cuda" (strict).
    batch_size : int
        Images per model call and per commit.
    dtype : str, optional
        Storage of the embeddings: "float32" | "float16".
    resize : str, optional
        "squash" (default) | "crop". None: the setting a feature-set key given as ``model`` spells out, else
        the default.
    resize_filter : str, optional
        None: as ``resize``. "bilinear" (default: Keras' non-antialiased bilinear through the fast JPEG path; decode ms.core per image
        1.37 -> 0.57 measured, linear probe within 0.5 point of the old filter) | "antialias" (Pillow's
        antialiased bilinear, what caches made before the choice hold). Part of the feature set's identity
        (:func:`tlpipe.features.cache.feature_set_key`).
    workers, threads, streams
        Decode threads, ONNX Runtime threads per stream, concurrent sessions (see :class:`LocalEngine`).
    allow_outside_root : bool
        Accept manifest paths outside the manifest's folder.
    recalibrate : bool
        Calibrate int8 again on this source.
    progress : callable, optional
        ``(total, already_done) -> advance(n)``.
    sizes, layers : list, optional
        Several sizes and/or cut points instead of ``size`` / ``layer``: one feature set per (size, layer),
        keyed as a one-size, one-layer extract would key it. The models come from one multi-output export
        per size (:func:`tlpipe.backbones.export.obtain_layers`); the stage runs one pass per feature set.
    augment : int
        Also embed this many augmented views of every image per feature set
        (:func:`tlpipe.features.augment.extract_augmented`), stored beside it as training rows; 0: none.
    augment_seed : int
        Seed of the augmented views (a view depends on it, the image's sha256 and the view index only).
    engine : LocalEngine or RayEngine, optional
        How the stage runs (default: a :class:`~.stream.LocalEngine` from ``device``, ``workers``, ``threads``,
        ``streams``); entered (a Ray engine connects and plans its actors) before the cache is opened.
    **choice_fields
        Without ``choice``: its fields by name (``backbone``, ``weights``, ``weights_dir``, ``size``, ``layer``,
        ``pooling``, ``precision``, ``model``, ``store``, ``tta``; see :class:`~tlpipe.backbones.choice.ModelChoice`).

    Returns
    -------
    ExtractSummary
        Counts (embedded, cached, duplicates, failures, skipped), seconds of the stream, the provider. With
        several feature sets, the first one's, with ``keys`` naming all of them.

    Raises
    ------
    CacheError
        No images, a bad ``out``, a locked or incompatible cache.
    tlpipe.backbones.store.StoreError, tlpipe.backbones.deps.MissingExtra, ValueError
        The model cannot be had as asked.
    TypeError
        ``choice`` and some of its fields, or a keyword that is not one of them.
    """
    choice = ModelChoice.given(choice, choice_fields, "extract")
    choice, resize, resize_filter, dtype = _settings_of_key(choice, resize, resize_filter, dtype)
    check_extract_options(
        resize=resize,
        resize_filter=resize_filter,
        dtype=dtype,
        device=device,
        precision=choice.precision,
        pooling=choice.pooling,
    )
    check_tta(choice.tta)
    sizes, layers = sizes or [choice.size], layers or [choice.layer]
    several = len(sizes) > 1 or len(layers) > 1
    _check_engine_options(engine, augment=augment, several=several, tta=choice.tta)
    images = open_source(source, out, allow_outside_root)
    if several:
        models = _several_models(choice, sizes, layers)
    else:  # one size and one layer, given as sizes=[s] / layers=[l] or as size / layer
        one = choice.with_(size=sizes[0], layer=layers[0])
        entry = resolve_entry(one, images.records, resize, recalibrate, resize_filter)
        models = [FeatureModel(entry, (("", entry),))]
    for warning in images.warnings:
        log.warning("%s", warning)
    engine = engine or LocalEngine(device=device, workers=workers, threads=threads, streams=streams)
    options: dict[str, Any] = dict(batch_size=batch_size, dtype=dtype, resize=resize, resize_filter=resize_filter)
    with engine, CacheWriter(out) as writer:
        source_index = writer.note_source(str(Path(source).resolve()))
        writer.register_classes(images.class_names)
        summary = extract_into(
            writer, images.records, models, engine, source=source_index, progress=progress, **options
        )
        _note_speed(writer, summary, [m.input_size for m in models] if several else models[0].input_size)
        if images.skipped:
            failures = [(path, "", reason) for path, reason in images.skipped]
            writer.add_failures(failures, stage="listing", source=source_index)
    summary.skipped, summary.warnings = list(images.skipped), images.warnings + summary.warnings
    if augment:
        from .augment import extract_augmented

        targets = [t for m in models for _, t in m.outputs]
        summary.augmented = [
            extract_augmented(
                images.records,
                out,
                target,
                key,
                views=augment,
                seed=augment_seed,
                device=device,
                threads=threads,
                workers=workers,
                **options,
            )
            for key, target in zip(summary.keys, targets)
        ]
    if summary.gone:
        log.warning("%s", gone_message(summary.gone, source))
    if conflicts := summary.label_conflicts:
        log.warning(
            "%d images carry two or more labels (label conflicts: left out of training and evaluation; fix "
            "the labels and run extract again): %s%s",
            len(conflicts),
            "; ".join(
                " vs ".join(f"{o['path']} ({o['label'] or 'unlabelled'})" for o in c["occurrences"])
                for c in conflicts[:3]
            ),
            " ..." if len(conflicts) > 3 else "",
        )
    return summary


def gone_message(gone: Sequence[tuple[str, str]], source: Any, limit: int = 3) -> str:
    """One line about cached images whose file is gone from ``source`` or changed since they were cached."""
    counts = {reason: sum(1 for _, r in gone if r == reason) for reason in ("gone", "changed")}
    parts = []
    if counts["gone"]:
        parts.append(f"{counts['gone']} cached image{'s' if counts['gone'] != 1 else ''} gone from {source}")
    if counts["changed"]:
        parts.append(f"{counts['changed']} changed in place (the new content was embedded)")
    names = ", ".join(f"{path} ({reason})" for path, reason in gone[:limit]) + (" ..." if len(gone) > limit else "")
    return (
        f"{' and '.join(parts)} since cached: left out of fit-head, compare, audit and evaluate "
        f"(--keep-missing keeps them; a file that comes back is used again): {names}"
    )


def _several_models(choice: ModelChoice, sizes: list, layers: list) -> list[FeatureModel]:
    """Per size, the verified multi-output model of every layer and each output's one-output store entry
    (the feature set's identity); one pass runs them all."""
    if choice.model is not None or choice.backbone is None:
        raise InputError("several sizes or layers need --backbone (a stored --model has one size and one output)")
    if choice.precision != "fp32":
        raise InputError("several sizes or layers are fp32 only; extract int8/fp16 one feature set at a time")
    if len(set(sizes)) != len(sizes):
        raise InputError(f"a size is named twice in {sizes}")
    return [
        obtain_layers(
            choice.backbone,
            list(layers),
            choice.weights,
            size,
            choice.pooling,
            choice.weights_dir,
            choice.model_store,
            tta=choice.tta,
        )
        for size in sizes
    ]


def _note_speed(writer: CacheWriter, summary: ExtractSummary, input_size: int | list[int]) -> None:
    """Record this pass's extraction speed on each feature set it filled (kept from the largest pass)."""
    if not summary.embedded or not summary.seconds:
        return
    record = {
        "images": summary.embedded,
        "seconds": round(summary.seconds, 3),
        "images_per_second": round(summary.embedded / summary.seconds, 2),
        "feature_sets_in_pass": len(summary.keys),
        "input_size": input_size,
        "provider": summary.provider,
        "cores": physical_cores(),
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for key in summary.keys:
        writer.note_extraction(key, record)
