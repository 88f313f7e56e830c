"""Batch scoring: images (folder or CSV manifest) or an embedding cache -> one prediction row per image;
and :func:`predict`, the same predictions in memory.

Two predictors:

- a saved head (``head=``): the model-store backbone named by the head's feature-set key embeds the
  images, then the head's ``predict_proba`` runs; with ``cache=``, images whose content that cache already
  embedded for the feature set skip the backbone (read through :class:`tlpipe.features.cache.FeatureSetReader`);
- a fused classifier (``model=``, written by :func:`tlpipe.pipeline.fuse.export_model`): one ONNX model
  from uint8 images to probabilities, with the class names in its metadata.

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
import dataclasses
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlpipe.backbones.atomic import atomic_file, atomic_write
from tlpipe.backbones.deps import MissingExtra
from tlpipe.backbones.onnx_metadata import read_metadata
from tlpipe.backbones.store import ModelStore, StoreEntry
from tlpipe.backbones.weights import sha256_file
from tlpipe.features.cache import FeatureSetReader, exclusive_lock, read_retrying, release_lock
from tlpipe.features.decoder import Decoded
from tlpipe.features.fastdecode import LEGACY_RESIZE_FILTER, RESIZE_FILTERS, recorded_resize_filter
from tlpipe.features.images import RESIZE_MODES
from tlpipe.features.sources import ImageRecord, discover
from tlpipe.features.stream import LocalEngine, StageModel, StreamSummary, run_stream

from .artifacts import HeadError, load_head

log = logging.getLogger(__name__)

OUTPUT_FORMATS = (".csv", ".jsonl", ".parquet")
PROBABILITIES = "probabilities"


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
    """

    labels: list[str]
    model: StageModel | None = None
    from_embeddings: Callable[[np.ndarray], np.ndarray] | None = None
    key: str | None = None
    model_sha256: str | None = None
    resize: str | None = None  # the resize mode its embeddings were made with, as recorded (None: not recorded)
    resize_filter: str = LEGACY_RESIZE_FILTER  # the resize filter, as recorded (antialias: made before it was)

    @property
    def input_size(self) -> int:
        """Side of the square input (0 without an image model)."""
        return self.model.input_size if self.model is not None else 0


def head_backbone(metadata: dict, store: ModelStore | str | os.PathLike | None, where: str) -> StoreEntry:
    """The model-store entry a saved head's embeddings came from, checked against the head's record.

    Raises
    ------
    HeadError
        The sidecar names no feature set, or the stored model differs from the one the head was trained on.
    tlpipe.backbones.store.StoreError
        The entry is missing or corrupt.
    """
    key = metadata.get("feature_set", {}).get("model_key") or metadata.get("feature_set", {}).get("key")
    if not key:
        raise HeadError(f"{where}: its sidecar names no feature set, so the backbone it needs is unknown")
    store = store if isinstance(store, ModelStore) else ModelStore(store)
    entry = store.resolve(key)
    entry.verify()
    recorded, actual = metadata["feature_set"].get("model_sha256"), entry.metadata.get("model_sha256")
    if recorded and actual and recorded != actual:
        raise HeadError(f"{where} was trained on backbone model {recorded[:12]}, but store entry {key} holds "
                        f"model {actual[:12]}: same key, different weights")
    return entry


def head_predictor(head: str | os.PathLike, *, trust: bool = False, store: ModelStore | str | os.PathLike | None = None,
                   backbone: bool = True) -> Predictor:
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
    predictor = Predictor(labels, from_embeddings=estimator.predict_proba, key=feature_set.get("key"),
                          model_sha256=feature_set.get("model_sha256"), resize=feature_set.get("resize"),
                          resize_filter=recorded_resize_filter(feature_set))
    if backbone:
        entry = head_backbone(metadata, store, str(head))
        predictor.model = StageModel(entry.model_path, entry.input_size, width=len(labels),
                                     then=estimator.predict_proba)
    return predictor


def fused_predictor(model: str | os.PathLike) -> Predictor:
    """A fused classifier written by :func:`tlpipe.pipeline.fuse.export_model` (its metadata is read; no session).

    Raises
    ------
    ScoreError
        The file does not exist or is not a tlpipe classifier.
    """
    if not Path(model).is_file():
        raise ScoreError(f"{model} does not exist")
    try:
        meta = read_metadata(model)
    except ValueError as exc:
        raise ScoreError(str(exc)) from None
    if meta.get("tlpipe.kind") != "classifier" or "tlpipe.class_names" not in meta:
        raise ScoreError(f"{model} is not a tlpipe classifier (write one with export-model); a backbone alone "
                         f"gives embeddings, not predictions: score with its head instead")
    labels = json.loads(meta["tlpipe.class_names"])
    return Predictor(labels, StageModel(Path(model), int(meta["tlpipe.input_size"]), width=len(labels),
                                        output=PROBABILITIES),
                     key=meta.get("tlpipe.key"), resize=meta.get("tlpipe.resize"),
                     resize_filter=meta.get("tlpipe.resize_filter") or LEGACY_RESIZE_FILTER)


def predictor_for(head: str | os.PathLike | None, model: str | os.PathLike | None, *, trust: bool = False,
                  store: ModelStore | str | os.PathLike | None = None, images: bool = True) -> Predictor:
    """:func:`head_predictor` or :func:`fused_predictor`, whichever of ``head`` / ``model`` is given.

    Raises
    ------
    ValueError
        Both or neither given.
    """
    if (head is None) == (model is None):
        raise ValueError("give exactly one of head (a saved head) or model (a fused classifier)")
    if head is not None:
        return head_predictor(head, trust=trust, store=store, backbone=images)
    assert model is not None
    return fused_predictor(model)


def settle_setting(option: str, asked: str | None, recorded: str | None, where: str, *, choices: tuple[str, ...],
                   unrecorded: str) -> str:
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
    choices : tuple of str
        The allowed values.
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
        ``asked`` is not one of ``choices``.

    A model that records none (made before tlpipe recorded it) uses ``asked``, else ``unrecorded``, and says so.
    """
    if asked is not None and asked not in choices:
        raise ValueError(f"--{option} must be one of {', '.join(choices)}, not {asked!r}")
    if recorded is None:
        log.warning("%s does not record its %s; scoring with %s", where, option, asked or unrecorded)
        return asked or unrecorded
    if asked is not None and asked != recorded:
        raise ScoreError(f"--{option} {asked} disagrees with {where}, whose embeddings were made with --{option} "
                         f"{recorded}; leave --{option} out to use {recorded}")
    return recorded


def settle_resize(asked: str | None, recorded: str | None, where: str) -> str:
    """:func:`settle_setting` for the resize mode (unrecorded: squash)."""
    return settle_setting("resize", asked, recorded, where, choices=RESIZE_MODES, unrecorded="squash")


def settle_resize_filter(asked: str | None, recorded: str | None, where: str) -> str:
    """:func:`settle_setting` for the resize filter (unrecorded: antialias, tlpipe's only filter before)."""
    return settle_setting("resize-filter", asked, recorded, where, choices=RESIZE_FILTERS,
                          unrecorded=LEGACY_RESIZE_FILTER)


# -- rows --------------------------------------------------------------------------------------------------
def display_path(path: str) -> str:
    """The path (or class name) as written to the output: valid UTF-8 (undecodable bytes as backslash escapes)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _prob(p: float) -> float:
    return float(f"{p:.7g}")  # float32 precision, without float64 noise digits


def prediction_rows(paths: list[str], shas: list[str], proba: np.ndarray, labels: list[str], top_k: int) -> list[dict]:
    """One row per image from its probabilities (columns in ``labels`` order)."""
    order = np.argsort(-proba, axis=1, kind="stable")[:, :top_k]
    labels = [display_path(label) for label in labels]  # a class folder's name need not be UTF-8
    rows = []
    for path, sha, p, best in zip(paths, shas, proba, order):
        top_labels, top_probs = [labels[j] for j in best], [_prob(p[j]) for j in best]
        rows.append({"path": path, "sha256": sha, "label": top_labels[0], "probability": top_probs[0],
                     "top_labels": top_labels, "top_probs": top_probs, "error": None})
    return rows


def output_columns(top_k: int, labelled: bool = False) -> list[str]:
    """The columns of a score output, in order (the same for CSV, JSON Lines and Parquet)."""
    return ["path", "sha256", *(["true_label"] if labelled else []), "label", "probability",
            *[f"top{i}_{c}" for i in range(1, top_k + 1) for c in ("label", "prob")], "error"]


def flat_row(row: dict, top_k: int, labelled: bool = False) -> dict:
    """A row of :func:`prediction_rows` / :func:`error_row` with its top-k lists spread over ``top{i}_label``
    and ``top{i}_prob`` (None past the classes it has)."""
    flat = {"path": row["path"], "sha256": row["sha256"]}
    if labelled:
        label = row.get("true_label")
        flat["true_label"] = display_path(label) if label is not None else None
    flat |= {"label": row["label"], "probability": row["probability"]}
    for i in range(top_k):
        has = i < len(row["top_labels"])
        flat[f"top{i + 1}_label"] = row["top_labels"][i] if has else None
        flat[f"top{i + 1}_prob"] = row["top_probs"][i] if has else None
    flat["error"] = row["error"]
    return flat


def error_row(path: str, sha: str, reason: str) -> dict:
    return {"path": path, "sha256": sha, "label": None, "probability": None, "top_labels": [], "top_probs": [],
            "error": reason}


# -- outputs -----------------------------------------------------------------------------------------------
def _write_failed(path: Path, exc: OSError) -> ScoreError:
    """A write that failed (disk full...): the complete rows before it stay, and a re-run resumes after them."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)  # pyarrow's strerror is a long sentence
    return ScoreError(f"cannot write {path}: {reason}; the rows written before are kept, and a re-run "
                      f"with enough space resumes after them")


def _append_bytes(fh: io.RawIOBase, path: Path, data: bytes) -> None:
    """Append ``data`` to the unbuffered ``fh`` and fsync; a failed write leaves at most a cut last record,
    which the next open cuts off."""
    view = memoryview(data)
    try:
        while view:
            view = view[fh.write(view):]
        os.fsync(fh.fileno())
    except OSError as exc:
        raise _write_failed(path, exc) from exc


def _lock(path: Path):
    """One writer per output: an exclusive lock on ``<out>.lock`` (removed on release); a second scoring run
    is refused with ``<out> is being written by pid N; wait for it to finish``."""
    return exclusive_lock(Path(str(path) + ".lock"), path, ScoreError)


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(size)


class CsvOutput:
    """CSV with flat top-k columns. A record cut short by a kill is cut off on open."""

    def __init__(self, path: Path, top_k: int, labelled: bool = False):
        self.path, self.top_k, self.labelled = path, top_k, labelled
        self.columns = output_columns(top_k, labelled)
        self.lock = _lock(path)
        try:
            self.fh = open(path, "ab", buffering=0)
            self.paths = self._recover()
            if not path.stat().st_size:
                self._write([self.columns])
        except BaseException:
            self.close()
            raise

    def _recover(self) -> set[str]:
        """Paths of the complete records; the file is cut after the last of them."""
        consumed, good, paths = 0, 0, set()

        def lines() -> Iterator[str]:
            nonlocal consumed
            with open(self.path, "rb") as fh:
                for raw in fh:
                    if not raw.endswith(b"\n"):
                        return  # cut short by a kill
                    consumed += len(raw)
                    yield raw.decode("utf-8")

        records = csv.reader(lines())
        try:
            header = next(records, None)
            good = consumed if header == self.columns else 0
            if header not in (None, self.columns) and next(records, None) is not None:
                raise ScoreError(f"{self.path} has the columns {','.join(header)}; this run writes "
                                 f"{','.join(self.columns)} (another top_k?): choose another output")
            for record in records if good else ():
                if len(record) != len(self.columns):
                    break
                paths.add(record[0])
                good = consumed
        except (csv.Error, UnicodeDecodeError):
            pass  # a record cut inside a quoted field: keep the ones before it
        _truncate(self.path, good)
        return paths

    def _write(self, records: list[list]) -> None:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(records)
        _append_bytes(self.fh, self.path, buffer.getvalue().encode("utf-8"))

    def append(self, rows: list[dict]) -> None:
        records = [["" if v is None else v for v in flat_row(row, self.top_k, self.labelled).values()] for row in rows]
        self._write(records)

    def close(self, finish: bool = True) -> None:
        try:
            if getattr(self, "fh", None) is not None:
                self.fh.close()
        finally:
            release_lock(self.lock)


class JsonlOutput:
    """JSON Lines, one object per image. A line cut short by a kill is cut off on open."""

    def __init__(self, path: Path, top_k: int, labelled: bool = False):
        self.path, self.top_k, self.labelled = path, top_k, labelled
        self.lock = _lock(path)
        try:
            self.fh = open(path, "ab", buffering=0)
            self.paths = self._recover()
        except BaseException:
            self.close()
            raise

    def _recover(self) -> set[str]:
        good, paths = 0, set()
        with open(self.path, "rb") as fh:
            for raw in fh:
                try:
                    if not raw.endswith(b"\n"):
                        raise ValueError("cut short")
                    paths.add(json.loads(raw)["path"])
                except (ValueError, KeyError, TypeError):
                    break
                good += len(raw)
        _truncate(self.path, good)
        return paths

    def append(self, rows: list[dict]) -> None:
        data = "".join(json.dumps(flat_row(row, self.top_k, self.labelled), ensure_ascii=False) + "\n"
                       for row in rows).encode("utf-8")
        _append_bytes(self.fh, self.path, data)

    def close(self, finish: bool = True) -> None:
        try:
            if getattr(self, "fh", None) is not None:
                self.fh.close()
        finally:
            release_lock(self.lock)


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise MissingExtra(f"writing Parquet needs pyarrow, which is not installed: pip install 'tlpipe[parquet]' "
                           f"(or write .csv / .jsonl) ({exc})") from exc
    return pyarrow


class ParquetOutput:
    """Parquet: each batch is a part file in ``<out>.parts/`` (written atomically); finishing assembles
    the previous ``out`` and the parts into a new ``out``, which replaces it atomically."""

    def __init__(self, path: Path, top_k: int, labelled: bool = False):
        pa = _pyarrow()
        self.pa, self.pq = pa, pa.parquet
        self.path, self.parts = path, Path(str(path) + ".parts")
        self.top_k, self.labelled = top_k, labelled
        numeric = lambda name: name == "probability" or name.endswith("_prob")  # noqa: E731
        self.schema = pa.schema([(name, pa.float64() if numeric(name) else pa.string())
                                 for name in output_columns(top_k, labelled)])
        self.lock = _lock(path)
        try:
            self.parts.mkdir(exist_ok=True)
            for leftover in self.parts.glob(".*.tmp"):
                leftover.unlink()
            self.paths: set[str] = set()
            for file in self._files():
                self.paths.update(self.pq.read_table(file, columns=["path"]).column("path").to_pylist())
            self.next_part = len(list(self.parts.glob("part-*.parquet")))
        except BaseException:
            release_lock(self.lock)
            raise

    def _files(self) -> list[Path]:
        return ([self.path] if self.path.exists() else []) + sorted(self.parts.glob("part-*.parquet"))

    def append(self, rows: list[dict]) -> None:
        target = self.parts / f"part-{self.next_part:06d}.parquet"
        try:
            flat = [flat_row(row, self.top_k, self.labelled) for row in rows]
            with atomic_file(target) as tmp:
                self.pq.write_table(self.pa.Table.from_pylist(flat, schema=self.schema), tmp)
        except OSError as exc:
            raise _write_failed(self.path, exc) from exc
        self.next_part += 1

    def close(self, finish: bool = True) -> None:
        """With ``finish``, assemble the final file; otherwise leave the parts for the next run."""
        try:
            if finish:
                self._assemble()
        finally:
            release_lock(self.lock)

    def _assemble(self) -> None:
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


def open_output(out: str | os.PathLike, top_k: int, labelled: bool = False):
    """The writer for ``out``'s extension, holding the paths already in it; ``labelled`` adds ``true_label``."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in _OUTPUTS:
        raise ScoreError(f"{out}: the output's extension chooses its format; use one of {', '.join(OUTPUT_FORMATS)}")
    if out.is_dir():
        raise ScoreError(f"{out} is a folder; give the output file's path, e.g. {out / ('scores' + suffix)}")
    if not out.parent.is_dir():
        raise ScoreError(f"cannot write {out}: folder {out.parent} does not exist")
    return _OUTPUTS[suffix](out, top_k, labelled)


# -- the sink --------------------------------------------------------------------------------------------
class PredictionSink:
    """A score output as the stage's sink: a row per input (error rows for failures), in input order.

    Content that ``cached`` holds for the head's feature set is known: not decoded, predicted here from its
    stored embedding.
    """

    def __init__(self, output: Any, predictor: Predictor, top_k: int, cached: FeatureSetReader | None = None):
        self.output, self.predictor, self.top_k, self.cached = output, predictor, top_k, cached

    def done(self, record: ImageRecord) -> bool:
        """Whether the output already has this path's row."""
        return display_path(record.relpath) in self.output.paths

    def known(self, sha256: str) -> bool:
        """Whether the reused cache holds this content."""
        return self.cached is not None and sha256 in self.cached

    def known_shas(self) -> set[str]:
        """The content the reused cache holds."""
        return set(self.cached.index) if self.cached is not None else set()

    def append(self, items: Sequence[Decoded], outputs: np.ndarray) -> None:
        """Append one row per item (probabilities from ``outputs``, from the cache, or an error) durably."""
        proba: dict[int, np.ndarray] = {}
        decoded = [j for j, item in enumerate(items) if item.error is None and not item.known]
        proba.update(zip(decoded, outputs))
        reused = [j for j, item in enumerate(items) if item.known]
        if reused:
            assert self.cached is not None and self.predictor.from_embeddings is not None
            embeddings = self.cached.get([items[j].sha256 for j in reused])
            proba.update(zip(reused, self.predictor.from_embeddings(embeddings)))
        rows = []
        for j, item in enumerate(items):
            path = display_path(item.record.relpath)
            if j in proba:
                rows += prediction_rows([path], [item.sha256], proba[j][None], self.predictor.labels, self.top_k)
            else:
                rows.append(error_row(path, item.sha256, item.error or ""))
            rows[-1]["true_label"] = item.record.label
        self.output.append(rows)

    def close(self, finish: bool = True) -> None:
        """Close the output (Parquet: assemble it, unless ``finish`` is False)."""
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
            raise ScoreError(f"{out} exists and was not written by tlpipe score (no readable {sidecar.name}); "
                             f"choose another --out or remove it") from None
        if recorded != identity:
            raise ScoreError(f"{out} was written by another model or options ({recorded}); a re-run resumes only "
                             f"the same scoring: choose another --out or remove it")
        return
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(sidecar, json.dumps(identity))
    except OSError as exc:
        raise ScoreError(f"cannot write {sidecar}: {exc.strerror or exc}") from exc


def open_sink(out: str | os.PathLike, predictor: Predictor, *, scored_with: str | os.PathLike, top_k: int,
              resize: str, resize_filter: str = LEGACY_RESIZE_FILTER,
              cache: str | os.PathLike | None = None, labelled: bool = False) -> PredictionSink:
    """The resume check, then the output for ``out``'s extension, as a sink (every engine opens it here).

    Raises
    ------
    ScoreError
        Another model or options wrote ``out``; a bad output path or extension.
    tlpipe.features.cache.CacheError
        ``cache`` lacks the head's feature set, or it was made by another backbone.
    """
    k = min(top_k, len(predictor.labels))
    identity: dict[str, object] = {"scored_with": sha256_file(scored_with), "top_k": k, "resize": resize,
                                   "true_label": labelled}
    if resize_filter != LEGACY_RESIZE_FILTER:  # outputs written before the filter was recorded still resume
        identity["resize_filter"] = resize_filter
    check_resume(out, identity)
    cached = FeatureSetReader(cache, predictor.key, predictor.model_sha256) if cache is not None else None
    return PredictionSink(open_output(out, k, labelled), predictor, k, cached)


# -- the pipeline ----------------------------------------------------------------------------------------
def true_labels(source: str | os.PathLike, allow_outside_root: bool = False) -> dict[str, str]:
    """Label by relative path from a labelled listing of an image source (class folders, a manifest's label
    column); empty when the source has no labels or a layout a labelled listing refuses."""
    try:
        listed = discover(source, allow_outside_root=allow_outside_root)
    except (ValueError, OSError):
        return {}
    return {r.relpath: r.label for r in listed.records if r.label is not None}


def cache_labels(path: str | os.PathLike) -> dict[str, str]:
    """Class name by content hash for the labelled images of a cache (unlabelled ones are absent)."""

    def read(f) -> dict[str, str]:
        images = f["images"]
        n, names = int(images.attrs["count"]), json.loads(images.attrs["class_names"])
        return {s.decode(): names[i] for s, i in zip(images["sha256"][:n], images["label"][:n].tolist())
                if 0 <= i < len(names)}

    return read_retrying(path, read)


def _score_cache(path: Path, predictor: Predictor, sink: PredictionSink, summary: ScoreSummary, *,
                 batch_size: int, progress: Callable[[int, int], Callable[[int], None]] | None) -> None:
    """Score the committed rows of the head's feature set, a batch per (retried) read of the cache."""
    reader = FeatureSetReader(path, predictor.key, predictor.model_sha256)
    summary.total = len(reader)
    advance = progress(len(reader), 0) if progress else None
    assert predictor.from_embeddings is not None
    truth = cache_labels(path)
    for paths, shas, X in reader.batches(batch_size):
        todo = [i for i, p in enumerate(paths) if p not in sink.output.paths]
        summary.already_done += len(paths) - len(todo)
        if todo:
            proba = predictor.from_embeddings(X[todo])
            rows = prediction_rows([paths[i] for i in todo], [shas[i] for i in todo], proba, predictor.labels,
                                   sink.top_k)
            for i, row in zip(todo, rows):
                row["true_label"] = truth.get(shas[i])
            sink.output.append(rows)
            summary.known += len(todo)
        if advance:
            advance(len(paths))


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
    store: ModelStore | str | os.PathLike | None = None,
    resize: str | None = None,
    resize_filter: str | None = None,
    workers: int | None = None,
    threads: int | None = None,
    streams: int | None = None,
    allow_outside_root: bool = False,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
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
        A fused classifier from :func:`tlpipe.pipeline.fuse.export_model`. Give exactly one of the two.
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
    if (head is None) == (model is None):
        raise ValueError("give exactly one of head (a saved head) or model (a fused classifier)")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, not {top_k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    if resize is not None and resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r}; expected one of {RESIZE_MODES}")
    if resize_filter is not None and resize_filter not in RESIZE_FILTERS:
        raise ValueError(f"--resize-filter must be one of {', '.join(RESIZE_FILTERS)}, not {resize_filter!r}")
    source = Path(source)
    from_cache = source.suffix.lower() in (".h5", ".hdf5")
    if from_cache and model is not None:
        raise ValueError("scoring a cache's embeddings needs the head (model= is a whole image classifier)")
    if cache is not None and model is not None:
        raise ValueError("cache reuse needs the head (model= runs the whole classifier on images)")
    if from_cache and not source.is_file():
        raise FileNotFoundError(f"cache not found: {source}")
    images = None if from_cache else discover(source, allow_outside_root=allow_outside_root, labelled=False)
    if images is not None:  # the true label column: what a labelled listing of the same source says, where it can
        truth = true_labels(source, allow_outside_root)
        images.records = [dataclasses.replace(r, label=truth.get(r.relpath)) for r in images.records]
    if images is not None and not images.records:
        skipped = f" ({len(images.skipped)} files skipped)" if images.skipped else ""
        raise ScoreError(f"no images found in {source}{skipped}")
    predictor = predictor_for(head, model, trust=trust, store=store, images=not from_cache)
    scored_with = head if head is not None else model
    assert scored_with is not None
    resize = settle_resize(resize, predictor.resize, str(scored_with))
    resize_filter = settle_resize_filter(resize_filter, predictor.resize_filter, str(scored_with))
    if images is None:
        sink = open_sink(out, predictor, scored_with=scored_with, top_k=top_k, resize=resize,
                         resize_filter=resize_filter, labelled=bool(cache_labels(source)))
        summary = ScoreSummary(out=str(out))
        try:
            started = time.perf_counter()
            _score_cache(source, predictor, sink, summary, batch_size=batch_size, progress=progress)
            summary.seconds = time.perf_counter() - started
        except BaseException:
            sink.close(finish=False)
            raise
        sink.close()
        return summary
    assert predictor.model is not None
    if engine is None:
        # one session unless asked: as scoring always ran (two streams measured no faster here, and cost ~80 MB)
        engine = LocalEngine(device=device, workers=workers, threads=threads, streams=streams or 1)
    with engine:
        sink = open_sink(out, predictor, scored_with=scored_with, top_k=top_k, resize=resize,
                         resize_filter=resize_filter, cache=cache,
                         labelled=any(r.label is not None for r in images.records))
        summary = ScoreSummary(out=str(out), skipped=list(images.skipped))
        run_stream(images.records, predictor.model, sink, summary, engine=engine, batch_size=batch_size,
                   resize=resize, resize_filter=resize_filter, progress=progress)
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
        best = np.argmax(np.nan_to_num(self.probabilities, nan=-1.0), axis=1) if len(self.paths) else []
        return [None if e is not None else self.labels[int(b)] for b, e in zip(best, self.errors)]


class _MemorySink:
    """The stage's sink for :func:`predict`: rows into arrays, nothing written."""

    def __init__(self, n: int, classes: int):
        self.probabilities = np.full((n, classes), np.nan, np.float32)
        self.errors: list[str | None] = [None] * n
        self.sha256 = [""] * n
        self.position: dict[int, int] = {}

    def done(self, record: ImageRecord) -> bool:
        return False

    def known(self, sha256: str) -> bool:
        return False

    def known_shas(self) -> set[str]:
        return set()

    def append(self, items: Sequence[Decoded], outputs: np.ndarray) -> None:
        rows = iter(outputs)
        for item in items:
            i = self.position[id(item.record)]
            self.sha256[i] = item.sha256
            if item.error is not None:
                self.errors[i] = item.error
            else:
                self.probabilities[i] = next(rows)

    def close(self, finish: bool = True) -> None:
        pass


def predict(
    paths: Sequence[str | os.PathLike],
    *,
    head: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    trust: bool = False,
    store: ModelStore | str | os.PathLike | None = None,
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
        A fused classifier ``.onnx`` from ``tlpipe export-model``. Give exactly one of the two.
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
    predictor = predictor_for(head, model, trust=trust, store=store)
    where = str(head if head is not None else model)
    resize = settle_resize(resize, predictor.resize, where)
    resize_filter = settle_resize_filter(resize_filter, predictor.resize_filter, where)
    assert predictor.model is not None
    names = [os.fspath(p) for p in paths]
    records = [ImageRecord(name, os.path.abspath(name), None, None) for name in names]
    sink = _MemorySink(len(records), len(predictor.labels))
    sink.position = {id(r): i for i, r in enumerate(records)}
    run_stream(records, predictor.model, sink, StreamSummary(out=""), batch_size=batch_size, resize=resize,
               resize_filter=resize_filter,
               engine=LocalEngine(device=device, workers=workers, threads=threads, streams=1))
    return Predictions(names, list(predictor.labels), sink.probabilities, sink.errors, sink.sha256)
