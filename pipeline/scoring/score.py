"""Batch scoring: images (folder or CSV manifest) or an embedding cache -> one prediction row per image;
and :func:`predict`, the same predictions in memory.

Two predictors:

- a saved head (``head=``): the model-store backbone named by the head's feature-set key embeds the
  images, then the head's ``predict_proba`` runs; with ``cache=``, images whose content that cache already
  embedded for the feature set skip the backbone (read through :class:`tlpipe.features.cache.FeatureSetReader`);
- a fused classifier (``model=``, written by :func:`tlpipe.pipeline.scoring.fuse.export_model`): one ONNX model
  from uint8 images to probabilities, with the class names in its metadata; or a TFLite classifier (``.tflite``,
  :func:`tlpipe.pipeline.scoring.tflite.export_tflite`) with its record beside it, run by the TFLite interpreter.

Scoring images is a run of the streaming stage (:mod:`tlpipe.features.stream`) into a
:class:`PredictionSink`: the local engine here, the Ray engine through
:func:`tlpipe.pipeline.score_ray.score_ray`. Each batch's rows are appended to the output and made durable
before the next (CSV / JSON Lines: append, flush, fsync; Parquet: one part file per batch in
``<out>.parts/``, assembled into ``out`` atomically and idempotently at the end). A re-run reads the rows already
in the output by (source, path, sha256) (dropping a row cut short by a kill) and scores only the rest, so after
any number of interruptions the output holds every image exactly once. An input whose path the output holds with
other content (the file was edited) is scored again and its old row superseded: dropped from the output (CSV /
JSON Lines: the file written again without it and renamed into place; Parquet: each file holding it), so each
(source, path) has one row, its current content's. ``<out>.tlpipe.json`` records the model, and a re-run with
another model or options is refused (:func:`check_resume`), on either engine. One run writes an output at a time,
whatever name reaches it (a symlink, a hard link, another relative path): :class:`~tlpipe.features.cache.WriteLock`.

Columns, the same in all three formats (:func:`output_columns`): ``path`` (relative to its source), ``source``
(the folder or manifest it is relative to, as an absolute path; a cache's rows each name their own),
``sha256``, ``true_label`` (only
when the source is labelled: class folders, a manifest's label column, a cache's labels), ``label``
(predicted class name), ``probability`` (its probability), the ``top_k`` best classes as ``top1_label,
top1_prob, top2_label, ...`` and ``error`` (why an image has no prediction, an embedding that is not finite
included; empty / null otherwise). Flat columns rather than lists, so a spreadsheet, ``pandas.read_csv`` and
``pandas.read_parquet`` see one table. CSV in the csv module's default dialect (CRLF, fields with a comma, quote,
CR or LF quoted); JSON Lines with U+2028, U+2029 and U+0085 escaped too: one record per line for any name.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import logging
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from tlpipe.backbones.atomic import atomic_file, atomic_write
from tlpipe.backbones.deps import require
from tlpipe.backbones.onnx_metadata import read_metadata
from tlpipe.backbones.store import ModelStore, StoreEntry
from tlpipe.backbones.weights import sha256_file
from tlpipe.errors import InputError, NotFoundError, TlpipeError
from tlpipe.features.cache import FeatureSetReader, WriteLock
from tlpipe.features.decoder import Decoded
from tlpipe.features.extract import check_extract_options
from tlpipe.features.fastdecode import LEGACY_RESIZE_FILTER, recorded_resize_filter
from tlpipe.features.sources import ImageRecord, discover
from tlpipe.features.stream import Engine, LocalEngine, Progress, Stage, StageModel, StreamSummary, run_stream
from tlpipe.pipeline.heads.persistence import HeadError, load_head

__all__ = [
    "CacheRows",
    "CsvOutput",
    "JsonlOutput",
    "PROBABILITIES",
    "ParquetOutput",
    "PredictionSink",
    "Predictions",
    "Predictor",
    "ScoreError",
    "ScoreSummary",
    "check_resume",
    "display_path",
    "fused_predictor",
    "head_backbone",
    "head_predictor",
    "open_sink",
    "output_columns",
    "predict",
    "predictor_for",
    "score",
    "settle_setting",
    "true_labels",
]

log = logging.getLogger(__name__)

PROBABILITIES = "probabilities"
Store = ModelStore | str | os.PathLike | None  # a model store, or its folder (None: the default one)


class ScoreError(TlpipeError, RuntimeError):
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
        The head or its sidecar cannot be trusted or used (see :func:`tlpipe.pipeline.heads.persistence.load_head`).
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
        model = StageModel(entry.model_path, entry.input_size, then=FiniteRows(estimator.predict_proba, len(labels)))
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
    """A fused classifier written by :func:`tlpipe.pipeline.scoring.fuse.export_model` (its metadata is read; no session).

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
    """A TFLite classifier written by :func:`tlpipe.pipeline.scoring.tflite.export_tflite`: its record (``<model>.json``)
    gives the class names, input size and pixel settings; the TFLite interpreter runs it (imported when it runs).

    Raises
    ------
    ScoreError
        The record beside it is missing or not a tlpipe classifier's.
    """
    from tlpipe.pipeline.scoring.fuse import FuseError
    from tlpipe.pipeline.scoring.tflite import TfliteModel, read_sidecar

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
        raise InputError("give exactly one of head (a saved head) or model (a fused classifier)")
    if head is not None:
        predictor = head_predictor(head, trust=trust, store=store, backbone=images)
    else:
        assert model is not None  # exactly one was given (checked above)
        predictor = fused_predictor(model)
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


ROW_KEY = ("source", "path", "sha256")  # what makes a row "already in the output": where, which file, which content
ROWS_KEYED_BY = "source+path+sha256"  # recorded in <out>.tlpipe.json; outputs without it were keyed by path alone


def output_columns(top_k: int, labelled: bool = False) -> list[str]:
    """The columns of a score output, in order (the same for CSV, JSON Lines and Parquet)."""
    return [
        "path",
        "source",
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


def content_sha256(path: str) -> str:
    """The sha256 the decoder would record for the file at ``path`` (hex; "" when it cannot be read, as a
    failure row records), read in pieces, without blocking on a FIFO or a device."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError):
        return ""
    with open(fd, "rb") as fh:
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return ""
            digest = hashlib.sha256()
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        except OSError:
            return ""
    return digest.hexdigest()


Key = tuple[str, str, str]  # (source, path, sha256) as written


class _Output:
    """What the three formats share: one writer per output, whatever name reaches it (:class:`WriteLock`: a second
    scoring run is refused with ``<out> is being written by pid N; wait for it to finish``), the rows already in it
    by (source, path, sha256) (``keys``), dropping superseded rows (:meth:`drop`), and the flat row of one image
    (:meth:`row`). Files are opened at the output's real path (a symlinked output is written through)."""

    def __init__(
        self, path: Path, top_k: int, labelled: bool = False, labels: Sequence[str] = (), lock: WriteLock | None = None
    ):
        self.path, self.top_k, self.labelled = Path(path), top_k, labelled
        self.real = Path(os.path.realpath(path))
        self.labels = [display_path(label) for label in labels]  # a class folder's name need not be UTF-8
        self.columns = output_columns(top_k, labelled)
        self.lock = lock if lock is not None else WriteLock(path, ScoreError)
        try:
            if lock is None:
                self.lock.pin()
            self.keys: set[Key] = self._open()
        except BaseException:
            self.close(finish=False)
            raise

    def _open(self) -> set[Key]:
        raise NotImplementedError

    def drop(self, keys: set[Key]) -> None:
        """Remove the rows with these keys (superseded: their file's content changed), keeping every other row."""
        raise NotImplementedError

    def _finish(self, finish: bool) -> None:
        raise NotImplementedError

    def row(self, path: str, source: str, sha: str, true_label: str | None, proba: Any, error: str | None) -> dict:
        """One image's row (:func:`output_columns`): the ``top_k`` best classes of ``proba``, or ``error``."""
        best: Any = np.argsort(-proba, kind="stable")[: self.top_k] if proba is not None else []
        top: list[Any] = [(self.labels[j], float(f"{proba[j]:.7g}")) for j in best]
        top += [(None, None)] * (self.top_k - len(top))  # probabilities: float32 precision, without noise digits
        truth = [true_label and display_path(true_label)] if self.labelled else []
        values = [path, source, sha, *truth, *top[0], *[v for pair in top for v in pair], error]
        return dict(zip(self.columns, values))

    def close(self, finish: bool = True) -> None:
        """Release the output; with ``finish`` (Parquet) assemble it, otherwise leave it for the next run."""
        try:
            self._finish(finish)
        finally:
            self.lock.release()


class _LineOutput(_Output):
    """CSV and JSON Lines: a batch is one append and fsync; a record cut short by a kill is cut off on open.
    Superseded rows are dropped by writing the file again without them and renaming it into place."""

    def _open(self) -> set[Key]:
        self.fh = open(self.real, "ab", buffering=0)
        self.lock.pin(self.real)  # created now if it was not there
        good, keys = self._scan(lambda key, raw: None)
        self.fh.truncate(good)
        if not good:
            self._append(self._header())
        return keys

    def _scan(self, each: Callable[[Key, bytes], None]) -> tuple[int, set[Key]]:
        """Parse the complete records: ``each(key, raw bytes)`` per row; (the bytes they end at, their keys)."""
        good, keys = 0, set()
        with open(self.real, "rb") as fh:  # the last line, without its newline, was cut short by a kill
            try:
                raws: list[bytes] = []

                def lines() -> Iterator[str]:
                    for raw in fh:
                        if raw.endswith(b"\n"):
                            raws.append(raw)
                            yield raw.decode("utf-8")

                for key in self._parse(lines()):  # None: a header
                    if key is not None:
                        keys.add(key)
                        each(key, b"".join(raws))
                    raws.clear()
                    good = fh.tell()  # the parser has read this record's lines, no more
            except (csv.Error, ValueError, KeyError, TypeError):
                pass  # a record cut or damaged (inside a quoted field, not JSON...): keep the ones before it
        return good, keys

    def drop(self, keys: set[Key]) -> None:
        if not keys & self.keys:
            return
        try:
            with atomic_file(self.real) as tmp, open(tmp, "wb") as out:
                out.write(self._header())

                def keep(key: Key, raw: bytes) -> None:
                    if key not in keys:
                        out.write(raw)

                self._scan(keep)
                out.flush()
                os.fsync(out.fileno())
                self.lock.pin(tmp)  # the new file is the output from its rename on
        except OSError as exc:
            raise _write_failed(self.path, exc) from exc
        self.fh.close()
        self.fh = open(self.real, "ab", buffering=0)
        self.keys -= keys

    def _parse(self, lines: Iterator[str]) -> Iterator[Key | None]:
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
    """CSV with flat top-k columns, in the csv module's default dialect (RFC 4180: CRLF between records, and
    any field holding a comma, a quote, ``\\r`` or ``\\n`` quoted), so every CSV reader sees one record per row."""

    def _parse(self, lines: Iterator[str]) -> Iterator[Key | None]:
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
        at = [self.columns.index(c) for c in ROW_KEY]
        for record in records:
            if len(record) != len(self.columns):
                return
            yield (record[at[0]], record[at[1]], record[at[2]])

    def _header(self) -> bytes:
        return self._encode([self.columns])

    def _encode(self, records: list[list]) -> bytes:
        buffer = io.StringIO()
        csv.writer(buffer).writerows(records)
        return buffer.getvalue().encode("utf-8")

    def append(self, rows: list[dict]) -> None:
        self._append(self._encode([["" if v is None else v for v in row.values()] for row in rows]))


# characters some line readers (str.splitlines, editors) end a line at, which JSON leaves as they are
_LINE_BREAKS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}


def json_line(row: dict) -> str:
    """One JSON Lines record: ``json.dumps`` (control characters escaped) with the line separators that JSON
    allows raw (U+2028, U+2029, U+0085) escaped too, so any line splitter sees one record per line."""
    text = json.dumps(row, ensure_ascii=False)
    if any(c in text for c in _LINE_BREAKS):
        text = "".join(_LINE_BREAKS.get(c, c) for c in text)
    return text + "\n"


class JsonlOutput(_LineOutput):
    """JSON Lines, one object per image."""

    def _parse(self, lines: Iterator[str]) -> Iterator[Key | None]:
        for line in lines:
            row = json.loads(line)
            yield (row["source"], row["path"], row["sha256"])

    def append(self, rows: list[dict]) -> None:
        self._append("".join(json_line(row) for row in rows).encode("utf-8"))


class ParquetOutput(_Output):
    """Parquet: each batch is a part file in ``<out>.parts/`` (written atomically); finishing assembles the
    previous ``out`` and the parts into a new ``out``, which replaces it atomically, then removes the parts.

    Assembly is idempotent: it keeps the first row of each (source, path, sha256), so a kill after the rename
    and before the parts are all removed (the parts' rows are then in ``out`` already) leaves nothing twice;
    temporary files of a killed assembly are removed on the next open; part numbers only grow."""

    def _open(self) -> set[Key]:
        pa = self.pa = require("pyarrow")  # MissingExtra names tlpipe[parquet] (or write .csv / .jsonl)
        self.pq, self.parts = require("pyarrow.parquet"), Path(str(self.real) + ".parts")
        self.schema = pa.schema(
            [(c, pa.float64() if c.endswith("_prob") or c == "probability" else pa.string()) for c in self.columns]
        )
        self.parts.mkdir(exist_ok=True)
        for leftover in [*self.parts.glob(".*.tmp"), *self.real.parent.glob(f".{glob.escape(self.real.name)}.*.tmp")]:
            leftover.unlink(missing_ok=True)  # a killed part write or assembly (no other writer: we hold the lock)
        numbers = [int(p.stem.split("-")[1]) for p in self._parts()]
        self.next_part = max(numbers, default=-1) + 1
        return {key for f in self._files() for key in self._keys(f)}

    def _parts(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.parquet"))

    def _files(self) -> list[Path]:
        return ([self.real] if self.real.exists() else []) + self._parts()

    def _keys(self, file: Path, table: Any = None) -> list[Key]:
        table = table if table is not None else self.pq.read_table(file, columns=list(ROW_KEY))
        return list(zip(*(table.column(c).to_pylist() for c in ROW_KEY)))

    def append(self, rows: list[dict]) -> None:
        try:
            with atomic_file(self.parts / f"part-{self.next_part:06d}.parquet") as tmp:
                self.pq.write_table(self.pa.Table.from_pylist(rows, schema=self.schema), tmp)
        except OSError as exc:
            raise _write_failed(self.path, exc) from exc
        self.next_part += 1

    def drop(self, keys: set[Key]) -> None:
        if not keys & self.keys:
            return
        try:
            for file in self._files():  # each file rewritten alone, atomically: a kill leaves each old or new
                table = self.pq.read_table(file, schema=self.schema)
                keep = [key not in keys for key in self._keys(file, table)]
                if all(keep):
                    continue
                with atomic_file(file) as tmp:
                    self.pq.write_table(table.filter(self.pa.array(keep, self.pa.bool_())), tmp)
                if file == self.real:
                    self.lock.pin(file)
        except OSError as exc:
            raise _write_failed(self.path, exc) from exc
        self.keys -= keys

    def _finish(self, finish: bool) -> None:
        if not finish:
            return
        parts = self._parts()
        if parts:
            try:
                seen: set[Key] = set()
                with atomic_file(self.real) as tmp, self.pq.ParquetWriter(tmp, self.schema) as writer:
                    for file in self._files():
                        table = self.pq.read_table(file, schema=self.schema)
                        keep = []
                        for key in self._keys(file, table):
                            keep.append(key not in seen)
                            seen.add(key)
                        writer.write_table(table if all(keep) else table.filter(self.pa.array(keep, self.pa.bool_())))
            except OSError as exc:
                raise _write_failed(self.path, exc) from exc
        for part in parts:  # their rows are in out now; a kill among these removals is made good by the next run
            part.unlink()
        self.parts.rmdir()


_OUTPUTS = {".csv": CsvOutput, ".jsonl": JsonlOutput, ".parquet": ParquetOutput}


# -- the sink --------------------------------------------------------------------------------------------
def _not_finite(where: str) -> str:
    return f"its {where} is not finite (NaN or inf): no prediction"


class FiniteRows:
    """A head's ``predict_proba`` that gives a row of NaN for an embedding that is not finite (instead of failing
    the whole batch); picklable for the Ray engine."""

    def __init__(self, predict_proba: Callable[[np.ndarray], np.ndarray], classes: int):
        self.predict_proba, self.classes = predict_proba, classes

    def __call__(self, X: np.ndarray) -> np.ndarray:
        finite = np.isfinite(X).all(axis=1)
        if finite.all():
            return self.predict_proba(X)
        out = np.full((len(X), self.classes), np.nan)
        if finite.any():
            out[finite] = self.predict_proba(X[finite])
        return out


class PredictionSink:
    """A score output as the stage's sink: a row per input (error rows for failures), in input order.

    Content that ``cached`` holds for the head's feature set is known: not decoded, predicted here from its
    stored embedding. An input is done when the output holds its (source, path, sha256); one whose path the
    output holds with other content is scored again and its old row dropped (:meth:`done_all`). An embedding or
    a probability that is not finite gives an error row.

    Parameters
    ----------
    output : _Output or None
        Where rows go (None: in memory).
    predictor : Predictor
    cached : FeatureSetReader, optional
    source : str
        The ``source`` column of the inputs (the folder or manifest scored), unless :attr:`sources` names one.
    """

    def __init__(self, output: Any, predictor: Predictor, cached: FeatureSetReader | None = None, source: str = ""):
        self.output, self.predictor, self.cached, self.source = output, predictor, cached, source
        self.sources: dict[int, str] = {}  # id(record) -> its source, for inputs from several (a cache's rows)
        self.shas: dict[int, str] = {}  # id(record) -> its sha256, where known without reading the file

    def source_of(self, record: ImageRecord) -> str:
        return self.sources.get(id(record), self.source)

    def done(self, record: ImageRecord) -> bool:
        """Whether the output already has this input's row (its source, path and current content)."""
        return self.done_all([record])[0]

    def done_all(self, records: Sequence[ImageRecord]) -> list[bool]:
        """Per input, whether the output already has its row: the same source, path and sha256. The files of
        inputs whose (source, path) the output holds are hashed (in threads) to tell; rows of those whose content
        changed are dropped from the output (superseded: they are scored again)."""
        if self.output is None or not self.output.keys:
            return [False] * len(records)
        held = {(s, p) for s, p, _ in self.output.keys}
        where = [(display_path(self.source_of(r)), display_path(r.relpath)) for r in records]  # as written
        ask = [i for i, key in enumerate(where) if key in held]
        unknown = [i for i in ask if id(records[i]) not in self.shas]
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            hashed = dict(zip(unknown, pool.map(content_sha256, [records[i].abspath for i in unknown])))
        now = {(*where[i], hashed[i] if i in hashed else self.shas[id(records[i])]) for i in ask}
        asked = {where[i] for i in ask}
        stale = {key for key in self.output.keys if key[:2] in asked and key not in now}
        if stale:
            log.info("%s: %d rows superseded (their files changed): scored again", self.output.path, len(stale))
            self.output.drop(stale)
        flags = [False] * len(records)
        for i in ask:
            flags[i] = (*where[i], hashed[i] if i in hashed else self.shas[id(records[i])]) in self.output.keys
        return flags

    def known_shas(self) -> set[str]:
        """The content the reused cache holds."""
        return set(self.cached.index) if self.cached is not None else set()

    def probabilities(self, items: Sequence[Decoded], outputs: np.ndarray) -> list[np.ndarray | None]:
        """Per item: its probabilities (the next of ``outputs``, or from the cache's embedding), None if it failed;
        an item whose embedding or probabilities are not finite gets its ``error`` set here."""
        reused = [item.sha256 for item in items if item.known]
        predicted = np.full((len(reused), len(self.predictor.labels)), np.nan)
        if reused:
            embeddings = self.cached.get(reused)  # type: ignore[union-attr]
            finite = np.isfinite(embeddings).all(axis=1)  # a NaN / inf row gets NaN probabilities: an error row
            if finite.any():
                predicted[finite] = self.predictor.from_embeddings(embeddings[finite])  # type: ignore[misc]
        from_cache, fresh = iter(predicted), iter(outputs)
        result: list[np.ndarray | None] = []
        for item in items:
            proba: np.ndarray | None = None
            if item.error is None:
                proba = next(from_cache) if item.known else next(fresh)
                if not np.isfinite(proba).all():
                    item.error = _not_finite("cached embedding" if item.known else "embedding (or the model's output)")
                    proba = None
            result.append(proba)
        return result

    def append(self, items: Sequence[Decoded], outputs: np.ndarray) -> None:
        """Append one row per item (probabilities from ``outputs``, from the cache, or an error) durably."""
        probabilities = self.probabilities(items, outputs)
        self.output.append(
            [
                self.output.row(
                    display_path(i.record.relpath),
                    display_path(self.source_of(i.record)),
                    i.sha256,
                    i.record.label,
                    p,
                    i.error,
                )
                for i, p in zip(items, probabilities)
            ]
        )

    def close(self, finish: bool = True) -> None:
        """Close the output (Parquet: assemble it, unless ``finish`` is False)."""
        if self.output is not None:
            self.output.close(finish=finish)


def _sidecar(out: str | os.PathLike) -> Path:
    return Path(os.path.realpath(out) + ".tlpipe.json")


def check_resume(out: str | os.PathLike, identity: dict) -> None:
    """Resume only what this same model wrote.

    ``<out>.tlpipe.json`` (beside the real file) records the head / model file hash and the options that shape
    rows; an existing output written by another model or options, or a file tlpipe did not write, is refused.

    Raises
    ------
    ScoreError
        As said, or the record cannot be written.
    """
    sidecar, real = _sidecar(out), os.path.realpath(out)
    if Path(real).exists() or Path(real + ".parts").exists():
        try:
            recorded = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            raise ScoreError(
                f"{out} exists and was not written by tlpipe score (no readable {sidecar.name}); "
                f"choose another --out or remove it"
            ) from None
        if recorded != identity:
            if {k: v for k, v in identity.items() if k != "rows"} == recorded:
                raise ScoreError(
                    f"{out} was written by an earlier tlpipe, whose rows are matched by path alone (a changed file "
                    f"kept its old row); choose another --out or remove it to score again"
                )
            raise ScoreError(
                f"{out} was written by another model or options ({recorded}); a re-run resumes only "
                f"the same scoring: choose another --out or remove it"
            )
        return
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
    source: str = "",
) -> PredictionSink:
    """The output for ``out``'s extension (its folder created if missing), locked for this run whatever its name,
    after the resume check, as a sink (every engine opens it here); ``cached``: the head's feature set in the
    reused cache; ``source``: the inputs' ``source`` column.

    Raises
    ------
    ScoreError
        Another model or options wrote ``out``; another run is writing it (by any name); an extension that is not
        a format; ``out`` is a folder.
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
    identity["rows"] = ROWS_KEYED_BY
    try:
        Path(os.path.realpath(out)).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a folder should be, no permission, a read-only file system...
        raise ScoreError(f"cannot create the output's folder {out.parent}: {exc.strerror or exc}") from exc
    lock = WriteLock(out, ScoreError)  # before the resume check: it reads and writes the sidecar
    try:
        lock.pin()
        check_resume(out, identity)
        return PredictionSink(output(out, k, labelled, predictor.labels, lock), predictor, cached, source)
    except BaseException:
        lock.release()
        raise


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
    are the inputs, each known (its embedding read back, nothing decoded), with the cache's labels and sources."""

    def run(self, stage: Stage, records: Sequence[ImageRecord], model: Any, *, batch_size: int, **_: Any) -> None:
        """Commit every row not yet in the output, ``batch_size`` at a time (``records`` and ``model`` unused)."""
        sink = stage.sink
        reader = sink.cached  # type: ignore[attr-defined]
        listed: dict[int, Decoded] = {}
        for rows in reader.batches(4096):
            for path, sha, label, source in zip(*rows):
                record = ImageRecord(path, "", label, None)
                sink.sources[id(record)], sink.shas[id(record)] = source, sha  # type: ignore[attr-defined]
                listed[id(record)] = Decoded(record, sha, known=True)
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
        .csv, .jsonl or .parquet (the extension picks the format). Rows already there (same source, path and
        sha256) are kept and not scored again; a file whose content changed is scored again and its old row
        dropped; an output written by another model or options is refused, and so is one another run is writing
        (by any name).
    head : path, optional
        A saved head (its backbone comes from the model store ``store``).
    model : path, optional
        A fused classifier from :func:`tlpipe.pipeline.scoring.fuse.export_model` (``.onnx``), or a TFLite classifier
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
        raise InputError(f"top_k must be at least 1, not {top_k}")
    source = Path(source)
    from_cache = source.suffix.lower() in (".h5", ".hdf5")
    if model is not None and (from_cache or cache is not None):
        raise InputError(
            "scoring embeddings (a cache source or cache reuse) needs the head; model= is a whole image classifier"
        )
    records, skipped = [], []
    if from_cache and not source.is_file():
        raise NotFoundError(f"cache not found: {source}")
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
        where = "" if from_cache else str(Path(source).resolve())  # a cache's rows name their own sources
        sink = open_sink(out, predictor, top_k=top_k, cached=cached, labelled=labelled, source=where)
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
