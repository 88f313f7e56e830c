"""Batch scoring: images (folder or CSV manifest) or an embedding cache -> one prediction row per image;
and :func:`predict`, the same predictions in memory.

Two predictors:

- a saved head (``head=``): the model-store backbone named by the head's feature-set key embeds the
  images, then the head's ``predict_proba`` runs; with ``cache=``, images whose content that cache already
  embedded for the feature set skip the backbone (read through :class:`tlpipe.features.cache.FeatureSetReader`);
- a fused classifier (``model=``, written by :func:`tlpipe.pipeline.fuse.export_model`): one ONNX model
  from uint8 images to probabilities, with the class names in its metadata; or a TFLite classifier (``.tflite``,
  :func:`tlpipe.pipeline.tflite.export_tflite`) with its record beside it, run by the TFLite interpreter.

Scoring images is a run of the streaming stage (:mod:`tlpipe.features.stream`) into a
:class:`PredictionSink`: the local engine here, the Ray engine through
:func:`tlpipe.pipeline.score_ray.score_ray`. Each batch's rows are appended to the output and made durable
before the next (CSV / JSON Lines: append, flush, fsync; Parquet: one part file per batch in
``<out>.parts/``, assembled into ``out`` atomically at the end). A re-run reads the paths already in the
output (dropping a row cut short by a kill) and scores only the rest, so after any number of interruptions
the output holds every image exactly once; ``<out>.tlpipe.json`` records the model, and a re-run with
another model or options is refused (:func:`check_resume`), on either engine.

Columns, the same in all three formats (:func:`output_columns`): ``path``, ``sha256``, ``true_label`` (only
when the source is labelled: class folders, a manifest's label column, a cache's labels), ``label``
(predicted class name), ``probability`` (its probability), the ``top_k`` best classes as ``top1_label,
top1_prob, top2_label, ...`` and ``error`` (why an image has no prediction; empty / null otherwise). Flat
columns rather than lists, so a spreadsheet, ``pandas.read_csv`` and ``pandas.read_parquet`` see one table.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from tlpipe.backbones.atomic import atomic_file, atomic_write
from tlpipe.backbones.deps import require
from tlpipe.backbones.onnx_metadata import read_metadata
from tlpipe.backbones.store import ModelStore, StoreEntry
from tlpipe.backbones.weights import sha256_file
from tlpipe.features.cache import FeatureSetReader, exclusive_lock, release_lock
from tlpipe.features.decoder import Decoded
from tlpipe.features.extract import check_extract_options
from tlpipe.features.fastdecode import LEGACY_RESIZE_FILTER, recorded_resize_filter
from tlpipe.features.sources import ImageRecord, discover
from tlpipe.features.stream import Engine, LocalEngine, Progress, Stage, StageModel, StreamSummary, run_stream

from .artifacts import HeadError, load_head

log = logging.getLogger(__name__)

PROBABILITIES = "probabilities"
Store = ModelStore | str | os.PathLike | None  # a model store, or its folder (None: the default one)


class ScoreError(RuntimeError):
    """Scoring cannot run as asked (bad output, wrong model, incompatible previous output...)."""


@dataclass
class ScoreSummary(StreamSummary):
    """What a scoring run did: ``total`` images in the source (rows, for a cache source), ``already_done``
    in the output before this run, ``failures`` written as error rows, ``skipped`` inputs that are not
    images (no row)."""

    @property
    def scored(self) -> int:
        """Predicted after running the backbone / fused model."""
        return self.processed

    @property
    def reused(self) -> int:
        """Predicted from an embedding read from a cache."""
        return self.known

    @property
    def written(self) -> int:
        """Rows written this run."""
        return self.scored + self.reused + self.failed


# -- predictors ------------------------------------------------------------------------------------------
@dataclass
class Predictor:
    """What predicts: the class names, the stage model on images (None when only embeddings are scored)
    and, for a head, the function on embeddings.

    Attributes
    ----------
    labels : list of str
        Class names, in the order of the probability columns.
    model : StageModel or None
        uint8 (N, size, size, 3) -> float (N, len(labels)) probabilities.
    from_embeddings : callable or None
        float32 (N, D) embeddings -> (N, len(labels)) probabilities (a head only).
    key : str or None
        The head's feature set.
    model_sha256 : str or None
        Of the backbone the head was trained on.
    resize, resize_filter : str
        The pixel settings its embeddings were made with, as recorded (resize None: not recorded; filter
        antialias: made before it was recorded); after :func:`predictor_for`, the settings to score with.
    source : str
        The head or fused model file.
    """

    labels: list[str]
    model: StageModel | None = None
    from_embeddings: Callable[[np.ndarray], np.ndarray] | None = None
    key: str | None = None
    model_sha256: str | None = None
    resize: str | None = None
    resize_filter: str = LEGACY_RESIZE_FILTER
    source: str = ""


def head_backbone(metadata: dict, store: Store, where: str) -> StoreEntry:
    """The model-store entry a saved head's embeddings came from, checked against the head's record.

    Raises
    ------
    HeadError
        The sidecar names no feature set, or the stored model differs from the one the head was trained on.
    tlpipe.backbones.store.StoreError
        The entry is missing or corrupt.
    """
    feature_set = metadata.get("feature_set", {})
    key = feature_set.get("model_key") or feature_set.get("key")
    if not key:
        raise HeadError(f"{where}: its sidecar names no feature set, so the backbone it needs is unknown")
    store = store if isinstance(store, ModelStore) else ModelStore(store)
    entry = store.resolve(key)
    entry.verify()
    recorded, actual = feature_set.get("model_sha256"), entry.metadata.get("model_sha256")
    if recorded and actual and recorded != actual:
        raise HeadError(
            f"{where} was trained on backbone model {recorded[:12]}, but store entry {key} holds "
            f"model {actual[:12]}: same key, different weights"
        )
    return entry


def head_predictor(
    head: str | os.PathLike, *, trust: bool = False, store: Store = None, backbone: bool = True
) -> Predictor:
    """A saved head (unpickled once, here); with ``backbone`` (needed for images) its backbone as the stage model.

    Raises
    ------
    HeadError
        The head or its sidecar cannot be trusted or used (see :func:`tlpipe.pipeline.artifacts.load_head`).
    """
    estimator: Any
    estimator, metadata = load_head(head, trust=trust)
    labels = metadata.get("labels")
    if not labels or len(labels) != len(estimator.classes_):
        raise HeadError(f"{head}: the sidecar does not name the head's {len(estimator.classes_)} classes")
    feature_set = metadata.get("feature_set", {})
    model = None
    if backbone:
        entry = head_backbone(metadata, store, str(head))
        model = StageModel(entry.model_path, entry.input_size, then=estimator.predict_proba)
    return Predictor(
        labels,
        model,
        estimator.predict_proba,
        feature_set.get("key"),
        feature_set.get("model_sha256"),
        feature_set.get("resize"),
        recorded_resize_filter(feature_set),
        str(head),
    )


def fused_predictor(model: str | os.PathLike) -> Predictor:
    """A fused classifier written by :func:`tlpipe.pipeline.fuse.export_model` (its metadata is read; no session).

    Raises
    ------
    ScoreError
        The file does not exist or is not a tlpipe classifier.
    """
    if not Path(model).is_file():
        raise ScoreError(f"{model} does not exist")
    if Path(model).suffix.lower() == ".tflite":
        return tflite_predictor(model)
    try:
        meta = read_metadata(model)
    except ValueError as exc:
        raise ScoreError(str(exc)) from None
    if meta.get("tlpipe.kind") != "classifier" or "tlpipe.class_names" not in meta:
        raise ScoreError(
            f"{model} is not a tlpipe classifier (write one with export-model); a backbone alone "
            f"gives embeddings, not predictions: score with its head instead"
        )
    labels = json.loads(meta["tlpipe.class_names"])
    return Predictor(
        labels,
        StageModel(Path(model), int(meta["tlpipe.input_size"]), (PROBABILITIES,)),
        key=meta.get("tlpipe.key"),
        resize=meta.get("tlpipe.resize"),
        resize_filter=meta.get("tlpipe.resize_filter") or LEGACY_RESIZE_FILTER,
        source=str(model),
    )


def tflite_predictor(model: str | os.PathLike) -> Predictor:
    """A TFLite classifier written by :func:`tlpipe.pipeline.tflite.export_tflite`: its record (``<model>.json``)
    gives the class names, input size and pixel settings; the TFLite interpreter runs it (imported when it runs).

    Raises
    ------
    ScoreError
        The record beside it is missing or not a tlpipe classifier's.
    """
    from .fuse import FuseError
    from .tflite import TfliteModel, read_sidecar

    try:
        record = read_sidecar(model)
    except FuseError as exc:
        raise ScoreError(str(exc)) from None
    backbone = record.get("backbone") or {}
    return Predictor(
        list(record["class_names"]),
        TfliteModel(Path(model), int(record["input_size"]), (PROBABILITIES,)),
        key=backbone.get("key"),
        resize=backbone.get("resize"),
        resize_filter=record.get("resize_filter") or LEGACY_RESIZE_FILTER,
        source=str(model),
    )


def predictor_for(
    head: str | os.PathLike | None,
    model: str | os.PathLike | None,
    *,
    trust: bool = False,
    store: Store = None,
    images: bool = True,
    resize: str | None = None,
    resize_filter: str | None = None,
) -> Predictor:
    """:func:`head_predictor` or :func:`fused_predictor`, whichever of ``head`` / ``model`` is given, with its
    ``resize`` and ``resize_filter`` settled (:func:`settle_setting`) from the explicit ones asked.

    Raises
    ------
    ValueError
        Both or neither given; a setting that is not one of its choices.
    ScoreError
        A setting that disagrees with the recorded one.
    """
    if (head is None) == (model is None):
        raise ValueError("give exactly one of head (a saved head) or model (a fused classifier)")
    predictor = (
        head_predictor(head, trust=trust, store=store, backbone=images) if head is not None else fused_predictor(model)
    )  # type: ignore[arg-type]
    predictor.resize = settle_setting("resize", resize, predictor.resize, predictor.source, "squash")
    predictor.resize_filter = settle_setting(
        "resize-filter", resize_filter, predictor.resize_filter, predictor.source, LEGACY_RESIZE_FILTER
    )
    return predictor


def settle_setting(option: str, asked: str | None, recorded: str | None, where: str, unrecorded: str) -> str:
    """The value of a pixel setting (``resize``, ``resize_filter``) to score with: the one the head's (or fused
    model's) embeddings were made with. The one check for every setting that is part of a feature set's identity.

    Parameters
    ----------
    option : str
        The setting's name as the CLI spells it without dashes (``resize``, ``resize-filter``).
    asked : str or None
        The explicit value (None: not given).
    recorded : str or None
        The value recorded with the head or fused model (None: not recorded).
    where : str
        The head or model, for messages.
    unrecorded : str
        The value used when none is recorded and none asked (what tlpipe made before recording it).

    Returns
    -------
    str

    Raises
    ------
    ScoreError
        ``asked`` disagrees with the recorded value.
    ValueError
        ``asked`` is not one of its choices (:func:`tlpipe.features.extract.check_extract_options`).

    A model that records none (made before tlpipe recorded it) uses ``asked``, else ``unrecorded``, and says so.
    """
    if asked is not None:
        check_extract_options(**{option.replace("-", "_"): asked})
    if recorded is None:
        log.warning("%s does not record its %s; scoring with %s", where, option, asked or unrecorded)
        return asked or unrecorded
    if asked not in (None, recorded):
        raise ScoreError(
            f"--{option} {asked} disagrees with {where}, whose embeddings were made with --{option} "
            f"{recorded}; leave --{option} out to use {recorded}"
        )
    return recorded


# -- outputs ---------------------------------------------------------------------------------------------
def display_path(path: str) -> str:
    """The path (or class name) as written to the output: valid UTF-8 (undecodable bytes as backslash escapes)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def output_columns(top_k: int, labelled: bool = False) -> list[str]:
    """The columns of a score output, in order (the same for CSV, JSON Lines and Parquet)."""
    return [
        "path",
        "sha256",
        *(["true_label"] if labelled else []),
        "label",
        "probability",
        *[f"top{i}_{c}" for i in range(1, top_k + 1) for c in ("label", "prob")],
        "error",
    ]


def _write_failed(path: Path, exc: OSError) -> ScoreError:
    """A write that failed (disk full...): the complete rows before it stay, and a re-run resumes after them."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)  # pyarrow's strerror is a long sentence
    return ScoreError(
        f"cannot write {path}: {reason}; the rows written before are kept, and a re-run "
        f"with enough space resumes after them"
    )


class _Output:
    """What the three formats share: one writer per output (an exclusive lock on ``<out>.lock``, removed on
    release: a second scoring run is refused with ``<out> is being written by pid N; wait for it to finish``),
    the paths already in it (``paths``), and the flat row of one image (:meth:`row`)."""

    def __init__(self, path: Path, top_k: int, labelled: bool = False, labels: Sequence[str] = ()):
        self.path, self.top_k, self.labelled = path, top_k, labelled
        self.labels = [display_path(label) for label in labels]  # a class folder's name need not be UTF-8
        self.columns = output_columns(top_k, labelled)
        self.lock = exclusive_lock(Path(str(path) + ".lock"), path, ScoreError)
        try:
            self.paths: set[str] = self._open()
        except BaseException:
            self.close(finish=False)
            raise

    def _open(self) -> set[str]:
        raise NotImplementedError

    def _finish(self, finish: bool) -> None:
        raise NotImplementedError

    def row(self, path: str, sha: str, true_label: str | None, proba: Any, error: str | None) -> dict:
        """One image's row (:func:`output_columns`): the ``top_k`` best classes of ``proba``, or ``error``."""
        best: Any = np.argsort(-proba, kind="stable")[: self.top_k] if proba is not None else []
        top: list[Any] = [(self.labels[j], float(f"{proba[j]:.7g}")) for j in best]
        top += [(None, None)] * (self.top_k - len(top))  # probabilities: float32 precision, without noise digits
        truth = [true_label and display_path(true_label)] if self.labelled else []
        return dict(zip(self.columns, [path, sha, *truth, *top[0], *[v for pair in top for v in pair], error]))

    def close(self, finish: bool = True) -> None:
        """Release the output; with ``finish`` (Parquet) assemble it, otherwise leave it for the next run."""
        try:
            self._finish(finish)
        finally:
            release_lock(self.lock)


class _LineOutput(_Output):
    """CSV and JSON Lines: a batch is one append and fsync; a record cut short by a kill is cut off on open."""

    def _open(self) -> set[str]:
        self.fh = open(self.path, "ab", buffering=0)
        good, paths = 0, set()
        with open(self.path, "rb") as fh:  # the last line, without its newline, was cut short by a kill
            try:
                for path in self._parse(raw.decode("utf-8") for raw in fh if raw.endswith(b"\n")):  # None: a header
                    if path is not None:
                        paths.add(path)
                    good = fh.tell()  # the parser has read this record's lines, no more
            except (csv.Error, ValueError, KeyError, TypeError):
                pass  # a record cut or damaged (inside a quoted field, not JSON...): keep the ones before it
        self.fh.truncate(good)
        if not good:
            self._append(self._header())
        return paths

    def _parse(self, lines: Iterator[str]) -> Iterator[str | None]:
        raise NotImplementedError

    def _header(self) -> bytes:
        return b""

    def _append(self, data: bytes) -> None:
        """Append ``data`` and fsync; a failed write leaves at most a cut last record, which the next open cuts off."""
        view = memoryview(data)
        try:
            while view:
                view = view[self.fh.write(view) :]
            os.fsync(self.fh.fileno())
        except OSError as exc:
            raise _write_failed(self.path, exc) from exc

    def _finish(self, finish: bool) -> None:
        if getattr(self, "fh", None) is not None:
            self.fh.close()


class CsvOutput(_LineOutput):
    """CSV with flat top-k columns."""

    def _parse(self, lines: Iterator[str]) -> Iterator[str | None]:
        records = csv.reader(lines)
        header = next(records, None)
        if header != self.columns:
            if header is not None and next(records, None) is not None:
                raise ScoreError(
                    f"{self.path} has the columns {','.join(header)}; this run writes "
                    f"{','.join(self.columns)} (another top_k?): choose another output"
                )
            return
        yield None
        for record in records:
            if len(record) != len(self.columns):
                return
            yield record[0]

    def _header(self) -> bytes:
        return self._encode([self.columns])

    def _encode(self, records: list[list]) -> bytes:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(records)
        return buffer.getvalue().encode("utf-8")

    def append(self, rows: list[dict]) -> None:
        self._append(self._encode([["" if v is None else v for v in row.values()] for row in rows]))


class JsonlOutput(_LineOutput):
    """JSON Lines, one object per image."""

    def _parse(self, lines: Iterator[str]) -> Iterator[str | None]:
        return (json.loads(line)["path"] for line in lines)

    def append(self, rows: list[dict]) -> None:
        self._append("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8"))


class ParquetOutput(_Output):
    """Parquet: each batch is a part file in ``<out>.parts/`` (written atomically); finishing assembles
    the previous ``out`` and the parts into a new ``out``, which replaces it atomically."""

    def _open(self) -> set[str]:
        pa = self.pa = require("pyarrow")  # MissingExtra names tlpipe[parquet] (or write .csv / .jsonl)
        self.pq, self.parts = require("pyarrow.parquet"), Path(str(self.path) + ".parts")
        self.schema = pa.schema(
            [(c, pa.float64() if c.endswith("_prob") or c == "probability" else pa.string()) for c in self.columns]
        )
        self.parts.mkdir(exist_ok=True)
        for leftover in self.parts.glob(".*.tmp"):
            leftover.unlink()
        self.next_part = len(list(self.parts.glob("part-*.parquet")))
        return {p for f in self._files() for p in self.pq.read_table(f, columns=["path"]).column("path").to_pylist()}

    def _files(self) -> list[Path]:
        return ([self.path] if self.path.exists() else []) + sorted(self.parts.glob("part-*.parquet"))

    def append(self, rows: list[dict]) -> None:
        try:
            with atomic_file(self.parts / f"part-{self.next_part:06d}.parquet") as tmp:
                self.pq.write_table(self.pa.Table.from_pylist(rows, schema=self.schema), tmp)
        except OSError as exc:
            raise _write_failed(self.path, exc) from exc
        self.next_part += 1

    def _finish(self, finish: bool) -> None:
        if not finish:
            return
        files = self._files()
        if files != [self.path]:
            try:
                with atomic_file(self.path) as tmp, self.pq.ParquetWriter(tmp, self.schema) as writer:
                    for file in files:
                        writer.write_table(self.pq.read_table(file, schema=self.schema))
            except OSError as exc:
                raise _write_failed(self.path, exc) from exc
        shutil.rmtree(self.parts)


_OUTPUTS = {".csv": CsvOutput, ".jsonl": JsonlOutput, ".parquet": ParquetOutput}


# -- the sink --------------------------------------------------------------------------------------------
class PredictionSink:
    """A score output as the stage's sink: a row per input (error rows for failures), in input order.

    Content that ``cached`` holds for the head's feature set is known: not decoded, predicted here from its
    stored embedding.
    """

    def __init__(self, output: Any, predictor: Predictor, cached: FeatureSetReader | None = None):
        self.output, self.predictor, self.cached = output, predictor, cached

    def done(self, record: ImageRecord) -> bool:
        """Whether the output already has this path's row."""
        return self.output is not None and display_path(record.relpath) in self.output.paths

    def known_shas(self) -> set[str]:
        """The content the reused cache holds."""
        return set(self.cached.index) if self.cached is not None else set()

    def probabilities(self, items: Sequence[Decoded], outputs: np.ndarray) -> list[np.ndarray | None]:
        """Per item: its probabilities (the next of ``outputs``, or from the cache's embedding), None if it failed."""
        reused = [item.sha256 for item in items if item.known]
        from_cache = iter(self.predictor.from_embeddings(self.cached.get(reused)) if reused else ())  # type: ignore
        fresh = iter(outputs)
        return [None if item.error is not None else next(from_cache if item.known else fresh) for item in items]

    def append(self, items: Sequence[Decoded], outputs: np.ndarray) -> None:
        """Append one row per item (probabilities from ``outputs``, from the cache, or an error) durably."""
        self.output.append(
            [
                self.output.row(display_path(i.record.relpath), i.sha256, i.record.label, p, i.error)
                for i, p in zip(items, self.probabilities(items, outputs))
            ]
        )

    def close(self, finish: bool = True) -> None:
        """Close the output (Parquet: assemble it, unless ``finish`` is False)."""
        if self.output is not None:
            self.output.close(finish=finish)


def check_resume(out: str | os.PathLike, identity: dict) -> None:
    """Resume only what this same model wrote.

    ``<out>.tlpipe.json`` records the head / model file hash and the options that shape rows; an existing
    output written by another model or options, or a file tlpipe did not write, is refused.

    Raises
    ------
    ScoreError
        As said, or the record cannot be written.
    """
    sidecar = Path(str(out) + ".tlpipe.json")
    if Path(out).exists() or Path(str(out) + ".parts").exists():
        try:
            recorded = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            raise ScoreError(
                f"{out} exists and was not written by tlpipe score (no readable {sidecar.name}); "
                f"choose another --out or remove it"
            ) from None
        if recorded != identity:
            raise ScoreError(
                f"{out} was written by another model or options ({recorded}); a re-run resumes only "
                f"the same scoring: choose another --out or remove it"
            )
        return
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a folder should be, no permission, a read-only file system...
        raise ScoreError(f"cannot create the output's folder {Path(out).parent}: {exc.strerror or exc}") from exc
    try:
        atomic_write(sidecar, json.dumps(identity))
    except OSError as exc:
        raise ScoreError(f"cannot write {sidecar}: {exc.strerror or exc}") from exc


def open_sink(
    out: str | os.PathLike,
    predictor: Predictor,
    *,
    top_k: int,
    cached: FeatureSetReader | None = None,
    labelled: bool = False,
) -> PredictionSink:
    """The output for ``out``'s extension (its folder created if missing), after the resume check, as a sink
    (every engine opens it here); ``cached``: the head's feature set in the reused cache.

    Raises
    ------
    ScoreError
        Another model or options wrote ``out``; an extension that is not a format; ``out`` is a folder.
    """
    out = Path(out)
    output = _OUTPUTS.get(out.suffix.lower())
    if output is None:
        raise ScoreError(f"{out}: the output's extension chooses its format; use one of {', '.join(_OUTPUTS)}")
    if out.is_dir():
        raise ScoreError(f"{out} is a folder; give the output file's path, e.g. {out / ('scores' + out.suffix)}")
    k = min(top_k, len(predictor.labels))
    identity: dict[str, object] = {
        "scored_with": sha256_file(predictor.source),
        "top_k": k,
        "resize": predictor.resize,
        "true_label": labelled,
    }
    if predictor.resize_filter != LEGACY_RESIZE_FILTER:  # outputs written before the filter was recorded still resume
        identity["resize_filter"] = predictor.resize_filter
    check_resume(out, identity)
    return PredictionSink(output(out, k, labelled, predictor.labels), predictor, cached)


# -- the pipeline ----------------------------------------------------------------------------------------
def true_labels(source: str | os.PathLike, allow_outside_root: bool = False) -> dict[str, str]:
    """Label by relative path from a labelled listing of an image source (class folders, a manifest's label
    column); empty when the source has no labels or a layout a labelled listing refuses."""
    try:
        listed = discover(source, allow_outside_root=allow_outside_root)
    except (ValueError, OSError):
        return {}
    return {r.relpath: r.label for r in listed.records if r.label is not None}


class CacheRows(Engine):
    """The engine for a cache source: the committed rows of the sink's reused cache (the head's feature set)
    are the inputs, each known (its embedding read back, nothing decoded), with the cache's labels."""

    def run(self, stage: Stage, records: Sequence[ImageRecord], model: Any, *, batch_size: int, **_: Any) -> None:
        """Commit every row not yet in the output, ``batch_size`` at a time (``records`` and ``model`` unused)."""
        reader = stage.sink.cached  # type: ignore[attr-defined]
        listed = {
            id(d.record): d
            for rows in reader.batches(4096)
            for path, sha, label in zip(*rows)
            for d in [Decoded(ImageRecord(path, "", label, None), sha, known=True)]
        }
        todo = [listed[id(r)] for r in stage.todo([d.record for d in listed.values()])]
        for start in range(0, len(todo), batch_size):
            stage.commit(todo[start : start + batch_size], np.empty((0, 0), np.float32))


def score(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    head: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    top_k: int = 3,
    device: str = "auto",
    batch_size: int = 32,
    trust: bool = False,
    store: Store = None,
    resize: str | None = None,
    resize_filter: str | None = None,
    workers: int | None = None,
    threads: int | None = None,
    streams: int | None = None,
    allow_outside_root: bool = False,
    progress: Progress | None = None,
    engine: Any = None,
) -> ScoreSummary:
    """Predict a class for every image of ``source`` and write one row per image to ``out``.

    Parameters
    ----------
    source : path
        A folder or CSV manifest of images, or (with ``head``) an HDF5 cache whose rows for the head's
        feature set are scored without decoding anything.
    out : path
        .csv, .jsonl or .parquet (the extension picks the format). Rows already there (by path) are kept
        and not scored again; an output written by another model or options is refused.
    head : path, optional
        A saved head (its backbone comes from the model store ``store``).
    model : path, optional
        A fused classifier from :func:`tlpipe.pipeline.fuse.export_model` (``.onnx``), or a TFLite classifier
        (``.tflite``, with its ``.tflite.json`` record). Give exactly one of the two.
    cache : path, optional
        Images whose content it already embedded for the head's feature set reuse that embedding.
    top_k : int
        Best classes per row.
    device : str
        "auto" | "cpu" | "cuda" (strict).
    batch_size : int
        Images per model call and per durable append.
    trust : bool
        Load a head whose checksum / metadata cannot be verified (runs its code).
    store : ModelStore or path, optional
        The model store.
    resize : str, optional
        "squash" | "crop"; default the mode recorded with the head's feature set (or in the fused model); an
        explicit one that disagrees is refused.
    resize_filter : str, optional
        "bilinear" | "antialias"; default the filter recorded with the head's feature set (or in the fused
        model; antialias for those made before it was recorded); an explicit one that disagrees is refused.
    workers, threads, streams
        Decode threads, ONNX Runtime threads per stream and concurrent sessions of the local engine
        (default: one session using all cores).
    allow_outside_root : bool
        Accept manifest paths outside the manifest's folder.
    progress : callable, optional
        ``(total, already_done) -> advance(n)``.
    engine : LocalEngine or RayEngine, optional
        How images are scored (default: a :class:`~tlpipe.features.stream.LocalEngine` from ``device``,
        ``workers``, ``threads``, ``streams``); a cache source always runs here.

    Returns
    -------
    ScoreSummary
        ``seconds`` times the stream (after the sessions are created), as extract's does.

    Raises
    ------
    ValueError
        Both or neither of ``head`` / ``model``; a bad ``top_k``, ``batch_size`` or ``resize``; ``model`` or
        ``cache`` with a cache source.
    FileNotFoundError
        The cache source does not exist.
    ScoreError
        No images; a bad output; an output written by another model or options.
    HeadError, tlpipe.features.cache.CacheError, tlpipe.backbones.store.StoreError
        The head, its backbone or the cache cannot be used.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, not {top_k}")
    source = Path(source)
    from_cache = source.suffix.lower() in (".h5", ".hdf5")
    if model is not None and (from_cache or cache is not None):
        raise ValueError(
            "scoring embeddings (a cache source or cache reuse) needs the head; model= is a whole image classifier"
        )
    records, skipped = [], []
    if from_cache and not source.is_file():
        raise FileNotFoundError(f"cache not found: {source}")
    if not from_cache:  # the true label column: what a labelled listing of the same source says, where it can
        images = discover(source, allow_outside_root=allow_outside_root, labelled=False)
        truth, skipped = true_labels(source, allow_outside_root), list(images.skipped)
        records = [replace(r, label=truth.get(r.relpath)) for r in images.records]
        if not records:
            raise ScoreError(f"no images found in {source}" + (f" ({len(skipped)} files skipped)" if skipped else ""))
    predictor = predictor_for(
        head, model, trust=trust, store=store, images=not from_cache, resize=resize, resize_filter=resize_filter
    )
    cache = source if from_cache else cache
    cached = FeatureSetReader(cache, predictor.key, predictor.model_sha256) if cache is not None else None
    if from_cache:
        engine, labelled = CacheRows(), cached.labelled  # type: ignore[union-attr]
    else:
        labelled = any(r.label is not None for r in records)
        # one session unless asked: as scoring always ran (two streams measured no faster here, and cost ~80 MB)
        engine = engine or LocalEngine(device=device, workers=workers, threads=threads, streams=streams or 1)
    with engine:
        sink = open_sink(out, predictor, top_k=top_k, cached=cached, labelled=labelled)
        summary = ScoreSummary(out=str(out), skipped=skipped)
        run_stream(
            records,
            predictor.model,
            sink,
            summary,
            engine=engine,
            batch_size=batch_size,
            resize=predictor.resize or "squash",
            resize_filter=predictor.resize_filter,
            progress=progress,
        )
    return summary


@dataclass
class Predictions:
    """Predictions in memory, in input order.

    Attributes
    ----------
    paths : list of str
        The inputs, as given.
    labels : list of str
        Class names: the columns of ``probabilities``.
    probabilities : numpy.ndarray
        (N, len(labels)) float32; a row of NaN where the image failed.
    errors : list of (str or None)
        Per input: None, or why it has no prediction (unreadable, not an image, too large...).
    sha256 : list of str
        Hex digest of each file's bytes ("" when unreadable).
    """

    paths: list[str]
    labels: list[str]
    probabilities: np.ndarray
    errors: list[str | None]
    sha256: list[str]

    @property
    def predicted(self) -> list[str | None]:
        """The most probable class name per input (None where it failed)."""
        best = np.argmax(np.nan_to_num(self.probabilities, nan=-1.0), axis=1)  # (0, K) -> none
        return [None if e is not None else self.labels[int(b)] for b, e in zip(best, self.errors)]


class _MemorySink(PredictionSink):
    """The stage's sink for :func:`predict`: each input's (error, sha256, probabilities) kept in input order
    (every input reaches the sink, in order), nothing written."""

    def __init__(self, predictor: Predictor):
        super().__init__(None, predictor)
        self.kept: list[tuple[str | None, str, np.ndarray | None]] = []

    def append(self, items: Sequence[Decoded], outputs: np.ndarray) -> None:
        self.kept += [(i.error, i.sha256, p) for i, p in zip(items, self.probabilities(items, outputs))]


def predict(
    paths: Sequence[str | os.PathLike],
    *,
    head: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    trust: bool = False,
    store: Store = None,
    device: str = "auto",
    batch_size: int = 32,
    resize: str | None = None,
    resize_filter: str | None = None,
    workers: int | None = None,
    threads: int | None = None,
) -> Predictions:
    """Class probabilities for image files, in memory (no output file), in input order.

    Parameters
    ----------
    paths : sequence of path
        Image files (any order; repeats allowed). A file that cannot be read or decoded gets an error.
    head : path, optional
        A saved head (``*.joblib`` from ``tlpipe fit-head``); its backbone comes from the model store.
    model : path, optional
        A classifier from ``tlpipe export-model``: ``.onnx``, or ``.tflite`` (with its record beside it). Give
        exactly one of the two.
    trust : bool
        Load a head whose checksum / metadata cannot be verified (runs its code).
    store : ModelStore or path, optional
        The model store holding the head's backbone.
    device : str
        "auto" | "cpu" | "cuda" (strict).
    batch_size : int
        Images per model call.
    resize : str, optional
        "squash" | "crop"; default the mode recorded with the head's feature set (or in the fused model); an
        explicit one that disagrees is refused.
    resize_filter : str, optional
        As in :func:`score`.
    workers, threads
        Decode threads and ONNX Runtime threads (as in :func:`score`).

    Returns
    -------
    Predictions
        ``labels``; ``probabilities`` (N, classes) float32 (NaN rows where an image failed); ``errors``
        (None or the reason per image); ``sha256``; all in the order of ``paths``.

    Raises
    ------
    ValueError
        Both or neither of ``head`` / ``model``; a bad ``resize``.
    ScoreError, HeadError, tlpipe.backbones.store.StoreError
        The model cannot be used.
    """
    predictor = predictor_for(head, model, trust=trust, store=store, resize=resize, resize_filter=resize_filter)
    names = [os.fspath(p) for p in paths]
    sink = _MemorySink(predictor)
    run_stream(
        [ImageRecord(name, os.path.abspath(name), None, None) for name in names],
        predictor.model,
        sink,
        StreamSummary(out=""),
        batch_size=batch_size,
        resize=predictor.resize or "squash",
        resize_filter=predictor.resize_filter,
        engine=LocalEngine(device=device, workers=workers, threads=threads, streams=1),
    )
    missing = np.full(len(predictor.labels), np.nan, np.float32)
    probabilities = np.array([missing if p is None else p for _, _, p in sink.kept], np.float32)
    return Predictions(
        names,
        list(predictor.labels),
        probabilities.reshape(len(names), len(predictor.labels)),
        [e for e, _, _ in sink.kept],
        [sha for _, sha, _ in sink.kept],
    )
