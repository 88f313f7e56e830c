"""Batch scoring: images (folder or CSV manifest) or an embedding cache -> one prediction row per image.

Two predictors:

- a saved head (``head=``): the model-store backbone named by the head's feature-set key embeds the
  images with extraction's own decode/resize and ONNX session, then the head's ``predict_proba`` runs;
  with ``cache=``, images whose content that cache already embedded for the feature set skip the backbone;
- a fused classifier (``model=``, written by :func:`pipeline.fuse.export_model`): one ONNX session from
  uint8 images to probabilities, with the class names in its metadata.

Images are read, hashed and decoded by extraction's ``iter_loaded`` in worker threads, at most ``prefetch`` in
flight, while the main thread runs inference on full batches. Each batch's rows are appended to the
output and made durable before the next batch (CSV / JSON Lines: append, flush, fsync; Parquet: one part
file per batch in ``<out>.parts/``, assembled into ``out`` atomically at the end). A re-run reads the
paths already in the output (dropping a row cut short by a kill) and scores only the rest, so after any
number of interruptions the output holds every image exactly once.

Columns: ``path``, ``sha256``, ``label`` (predicted class name), ``probability`` (its probability), the
``top_k`` best classes and ``error`` (why an image has no prediction; empty otherwise). CSV spells the
top classes as ``top1_label, top1_prob, top2_label, ...``; JSON Lines and Parquet as the lists
``top_labels`` and ``top_probs``.
"""
from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from tlpipe.backbones.deps import MissingExtra
from tlpipe.backbones.export import INPUT_NAME
from tlpipe.backbones.weights import sha256_file
from tlpipe.backbones.runtime import CPU_MICRO_BATCH, OnnxEmbedder, create_session
from tlpipe.backbones.store import ModelStore, StoreEntry
from tlpipe.features.cache import CacheError, read_retrying
from tlpipe.features.extract import _Loaded, decode_workers, iter_loaded
from tlpipe.features.fastdecode import LEGACY_RESIZE_FILTER, check_resize_filter, recorded_resize_filter
from tlpipe.features.images import RESIZE_MODES
from tlpipe.features.sources import ImageRecord, ImageSource, discover

from .artifacts import HeadError, load_head

OUTPUT_FORMATS = (".csv", ".jsonl", ".parquet")
PROBABILITIES = "probabilities"


class ScoreError(RuntimeError):
    """Scoring cannot run as asked (bad output, wrong model, incompatible previous output...)."""


@dataclass
class ScoreSummary:
    """What a scoring run did."""

    out: str
    total: int = 0  # images in the source (rows, for a cache source)
    scored: int = 0  # predicted after running the backbone / fused model
    reused: int = 0  # predicted from an embedding read from a cache
    failed: int = 0  # error rows written
    already_done: int = 0  # in the output before this run
    failures: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # inputs that are not images (no row)
    seconds: float = 0.0
    provider: str = ""

    @property
    def written(self) -> int:
        return self.scored + self.reused + self.failed

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds else 0.0


# -- predictors ------------------------------------------------------------------------------------------
@dataclass
class Predictor:
    """Probabilities for uint8 image batches (and, for a head, for embeddings), with the column names."""

    labels: list[str]
    input_size: int = 0
    from_pixels: Callable[[np.ndarray], np.ndarray] | None = None
    from_embeddings: Callable[[np.ndarray], np.ndarray] | None = None
    key: str | None = None  # the head's feature set
    model_sha256: str | None = None  # of the backbone the head was trained on
    provider: str = ""
    resize_filter: str = LEGACY_RESIZE_FILTER  # what its embeddings were extracted with (recorded)


def head_backbone(metadata: dict, store: ModelStore | str | os.PathLike | None, where: str) -> StoreEntry:
    """The model-store entry a saved head's embeddings came from, checked against the head's record."""
    key = metadata.get("feature_set", {}).get("key")
    if not key:
        raise HeadError(f"{where}: its sidecar names no feature set, so the backbone it needs is unknown")
    store = store if isinstance(store, ModelStore) else ModelStore(store)
    key = metadata["feature_set"].get("model_key") or key  # a feature-set key names its model and filter
    entry = store.resolve(key)
    entry.verify()
    recorded, actual = metadata["feature_set"].get("model_sha256"), entry.metadata.get("model_sha256")
    if recorded and actual and recorded != actual:
        raise HeadError(f"{where} was trained on backbone model {recorded[:12]}, but store entry {key} holds "
                        f"model {actual[:12]}: same key, different weights")
    return entry


def head_predictor(head: str | os.PathLike, *, trust: bool = False, store: ModelStore | str | os.PathLike | None = None,
                   device: str = "auto",
                   threads: int | None = None, backbone: bool = True) -> Predictor:
    """A saved head; with ``backbone`` (needed for images) its backbone session too."""
    estimator, metadata = load_head(head, trust=trust)
    labels = metadata.get("labels")
    if not labels or len(labels) != len(estimator.classes_):
        raise HeadError(f"{head}: the sidecar does not name the head's {len(estimator.classes_)} classes")
    feature_set = metadata.get("feature_set", {})
    predictor = Predictor(labels, from_embeddings=estimator.predict_proba, key=feature_set.get("key"),
                          model_sha256=feature_set.get("model_sha256"),
                          resize_filter=recorded_resize_filter(feature_set))
    if backbone:
        entry = head_backbone(metadata, store, str(head))
        embedder = OnnxEmbedder(entry.model_path, device=device, threads=threads)
        predictor.input_size = entry.input_size
        predictor.from_pixels = lambda pixels: estimator.predict_proba(embedder(pixels))
        predictor.provider = embedder.provider
    return predictor


def fused_predictor(model: str | os.PathLike, *, device: str = "auto", threads: int | None = None) -> Predictor:
    """A fused classifier written by :func:`pipeline.fuse.export_model`."""
    if not Path(model).is_file():
        raise ScoreError(f"{model} does not exist")
    session = create_session(model, device=device, threads=threads)
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get("tlpipe.kind") != "classifier" or "tlpipe.class_names" not in meta:
        raise ScoreError(f"{model} is not a tlpipe classifier (write one with export-model); a backbone alone "
                         f"gives embeddings, not predictions: score with its head instead")
    step = CPU_MICRO_BATCH if session.get_providers()[0] == "CPUExecutionProvider" else None

    def from_pixels(pixels: np.ndarray) -> np.ndarray:  # CPU: chunks whose activations stay in cache
        chunks = [pixels[i:i + step] for i in range(0, len(pixels), step)] if step and len(pixels) else [pixels]
        return np.concatenate([session.run([PROBABILITIES], {INPUT_NAME: chunk})[0] for chunk in chunks])

    return Predictor(json.loads(meta["tlpipe.class_names"]), int(meta["tlpipe.input_size"]),
                     from_pixels=from_pixels,
                     key=meta.get("tlpipe.key"), provider=session.get_providers()[0],
                     resize_filter=recorded_resize_filter({"resize_filter": meta.get("tlpipe.resize_filter")}))


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


def _lock(handle, path: Path) -> None:
    """One writer per output: an exclusive ``flock`` held until ``handle`` (file object or descriptor) closes."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close() if hasattr(handle, "close") else os.close(handle)
        raise ScoreError(f"{path} is being written by another scoring run; wait for it to finish") from None


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(size)


class CsvOutput:
    """CSV with flat top-k columns. A record cut short by a kill is cut off on open."""

    def __init__(self, path: Path, top_k: int):
        self.path = path
        self.columns = ["path", "sha256", "label", "probability",
                        *[f"top{i}_{c}" for i in range(1, top_k + 1) for c in ("label", "prob")], "error"]
        self.fh = open(path, "ab", buffering=0)
        _lock(self.fh, path)
        self.paths = self._recover()
        if not path.stat().st_size:
            try:
                self._write([self.columns])
            except ScoreError:
                self.fh.close()
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
                self.fh.close()
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
        width = len(self.columns) - 5  # the top-k columns
        records = []
        for row in rows:
            top = [v for pair in zip(row["top_labels"], row["top_probs"]) for v in pair]
            probability = "" if row["probability"] is None else row["probability"]
            records.append([row["path"], row["sha256"], row["label"] or "", probability,
                            *top, *[""] * (width - len(top)), row["error"] or ""])
        self._write(records)

    def close(self, finish: bool = True) -> None:
        self.fh.close()


class JsonlOutput:
    """JSON Lines, one object per image. A line cut short by a kill is cut off on open."""

    def __init__(self, path: Path, top_k: int):
        self.path = path
        self.fh = open(path, "ab", buffering=0)
        _lock(self.fh, path)
        self.paths = self._recover()

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
        data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
        _append_bytes(self.fh, self.path, data)

    def close(self, finish: bool = True) -> None:
        self.fh.close()


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

    def __init__(self, path: Path, top_k: int):
        pa = _pyarrow()
        self.pa, self.pq = pa, pa.parquet
        self.path, self.parts = path, Path(str(path) + ".parts")
        self.schema = pa.schema([("path", pa.string()), ("sha256", pa.string()), ("label", pa.string()),
                                 ("probability", pa.float64()), ("top_labels", pa.list_(pa.string())),
                                 ("top_probs", pa.list_(pa.float64())), ("error", pa.string())])
        self.parts.mkdir(exist_ok=True)
        self.lock = os.open(self.parts, os.O_RDONLY)
        _lock(self.lock, path)
        for leftover in self.parts.glob(".*.tmp"):
            leftover.unlink()
        self.paths: set[str] = set()
        for file in self._files():
            self.paths.update(self.pq.read_table(file, columns=["path"]).column("path").to_pylist())
        self.next_part = len(list(self.parts.glob("part-*.parquet")))

    def _files(self) -> list[Path]:
        return ([self.path] if self.path.exists() else []) + sorted(self.parts.glob("part-*.parquet"))

    def append(self, rows: list[dict]) -> None:
        target = self.parts / f"part-{self.next_part:06d}.parquet"
        tmp = self.parts / f".{target.name}.tmp"
        try:
            self.pq.write_table(self.pa.Table.from_pylist(rows, schema=self.schema), tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _write_failed(self.path, exc) from exc
        self.next_part += 1

    def close(self, finish: bool = True) -> None:
        """With ``finish``, assemble the final file; otherwise leave the parts for the next run."""
        try:
            if finish:
                self._assemble()
        finally:
            os.close(self.lock)

    def _assemble(self) -> None:
        files = self._files()
        if files != [self.path]:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            os.close(fd)
            try:
                with self.pq.ParquetWriter(tmp, self.schema) as writer:
                    for file in files:
                        writer.write_table(self.pq.read_table(file, schema=self.schema))
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            except BaseException as exc:
                Path(tmp).unlink(missing_ok=True)
                if isinstance(exc, OSError):
                    raise _write_failed(self.path, exc) from exc
                raise
        shutil.rmtree(self.parts)


_OUTPUTS = {".csv": CsvOutput, ".jsonl": JsonlOutput, ".parquet": ParquetOutput}


def open_output(out: str | os.PathLike, top_k: int):
    """The writer for ``out``'s extension, holding the paths already in it."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in _OUTPUTS:
        raise ScoreError(f"{out}: the output's extension chooses its format; use one of {', '.join(OUTPUT_FORMATS)}")
    if out.is_dir():
        raise ScoreError(f"{out} is a folder; give the output file's path, e.g. {out / ('scores' + suffix)}")
    if not out.parent.is_dir():
        raise ScoreError(f"cannot write {out}: folder {out.parent} does not exist")
    return _OUTPUTS[suffix](out, top_k)


# -- embeddings already in a cache -------------------------------------------------------------------------
def head_feature_set(f, path, key: str | None, model_sha256: str | None):
    """The head's feature set in an open cache: (group, image group, committed image row of each embedding)."""
    features = f["features"]
    if key not in features:
        raise CacheError(f"{path} holds no feature set {key} (the head's); it holds: {', '.join(features) or 'none'}")
    group, images = features[key], f["images"]
    made_by = json.loads(group.attrs.get("metadata", "{}")).get("model_sha256")
    if model_sha256 and made_by and made_by != model_sha256:
        raise CacheError(f"{path}: feature set {key} was made by backbone model {made_by[:12]}, the head's "
                         f"embeddings by {model_sha256[:12]}")
    count, n_images = int(group.attrs["count"]), int(images.attrs["count"])
    rows = group["image_row"][:count]
    if count and rows.max() >= n_images:
        raise CacheError(f"{path}: feature set {key} points past the image table; the file is damaged")
    return group, images, rows


class CachedEmbeddings:
    """Embeddings of one feature set of a cache, looked up by content hash.

    Only the sha256 -> row index is held in memory; embeddings are read per batch. Every read opens the
    cache afresh through :func:`features.cache.read_retrying`, so scoring may run while an extract appends."""

    def __init__(self, path: str | os.PathLike, key: str | None, model_sha256: str | None):
        def index(f) -> dict[str, int]:
            _, images, rows = head_feature_set(f, path, key, model_sha256)
            shas = images["sha256"][: int(images.attrs["count"])]
            return {shas[row].decode(): i for i, row in enumerate(rows.tolist())}

        self.path, self.key = path, key
        self.index = read_retrying(path, index)

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self.index

    def get(self, sha256s: list[str]) -> np.ndarray:
        rows, inverse = np.unique([self.index[s] for s in sha256s], return_inverse=True)
        embeddings = read_retrying(self.path, lambda f: f["features"][self.key]["embeddings"][rows])
        return embeddings[inverse].astype(np.float32, copy=False)


# -- the pipeline ----------------------------------------------------------------------------------------
def _score_images(records: list[ImageRecord], predictor: Predictor, output, summary: ScoreSummary,
                  cached: CachedEmbeddings | None, *, top_k: int, batch_size: int, resize: str, workers: int,
                  prefetch: int, advance: Callable[[int], None] | None) -> None:
    batch: list[_Loaded] = []

    def commit() -> None:
        proba: dict[int, np.ndarray] = {}
        decoded_rows = [i for i, b in enumerate(batch) if b.pixels is not None]
        if decoded_rows:
            pixels = np.stack([batch[i].pixels for i in decoded_rows])
            proba.update(zip(decoded_rows, predictor.from_pixels(pixels)))
        reused_rows = [i for i, b in enumerate(batch) if b.cached]
        if reused_rows:
            embeddings = cached.get([batch[i].sha256 for i in reused_rows])
            proba.update(zip(reused_rows, predictor.from_embeddings(embeddings)))
        rows = []
        for i, b in enumerate(batch):
            path = display_path(b.record.relpath)
            if i in proba:
                rows += prediction_rows([path], [b.sha256], proba[i][None], predictor.labels, top_k)
            else:
                rows.append(error_row(path, b.sha256, b.error))
                summary.failures.append((path, b.error))
        output.append(rows)
        summary.failed += sum(b.error is not None for b in batch)
        summary.reused += sum(b.cached for b in batch)
        summary.scored += sum(b.pixels is not None for b in batch)
        if advance:
            advance(len(batch))
        batch.clear()

    is_cached = (lambda sha: sha in cached) if cached is not None else (lambda sha: False)
    for loaded in iter_loaded(records, predictor.input_size, resize, is_cached, workers=workers, prefetch=prefetch,
                              resize_filter=predictor.resize_filter):
        batch.append(loaded)
        if len(batch) >= batch_size:
            commit()
    if batch:
        commit()


def _score_cache(path: Path, predictor: Predictor, output, summary: ScoreSummary, *, top_k: int, batch_size: int,
                 progress: Callable[[int, int], Callable[[int], None]] | None) -> None:
    """Score the committed rows of the head's feature set, a batch per (retried) read of the cache."""
    image_rows = read_retrying(path, lambda f: head_feature_set(f, path, predictor.key, predictor.model_sha256)[2])
    count = len(image_rows)
    summary.total = count
    advance = progress(count, 0) if progress else None

    def batch(f, start: int):
        rows, inverse = np.unique(image_rows[start:start + batch_size], return_inverse=True)
        images = f["images"]
        paths = [p.decode("utf-8", "replace") for p in images["path"][rows][inverse]]
        shas = [s.decode() for s in images["sha256"][rows][inverse]]
        return paths, shas, f["features"][predictor.key]["embeddings"][start:start + batch_size]

    for start in range(0, count, batch_size):
        paths, shas, X = read_retrying(path, lambda f: batch(f, start))
        todo = [i for i, p in enumerate(paths) if p not in output.paths]
        summary.already_done += len(paths) - len(todo)
        if todo:
            proba = predictor.from_embeddings(X[todo].astype(np.float32, copy=False))
            output.append(prediction_rows([paths[i] for i in todo], [shas[i] for i in todo], proba,
                                          predictor.labels, top_k))
            summary.reused += len(todo)
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
    resize: str = "squash",
    workers: int | None = None,
    threads: int | None = None,
    allow_outside_root: bool = False,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    resize_filter: str | None = None,
) -> ScoreSummary:
    """Predict a class for every image of ``source`` and write one row per image to ``out``.

    ``source`` is a folder or CSV manifest of images, or (with ``head``) an HDF5 cache whose rows for the
    head's feature set are scored without decoding anything. Give exactly one of ``head`` (a saved head;
    its backbone comes from the model store ``store``) or ``model`` (a fused classifier from
    :func:`pipeline.fuse.export_model`). ``cache``: images whose content it already embedded for the
    head's feature set reuse that embedding. ``resize`` must be the mode the head's embeddings were
    extracted with. ``resize_filter`` is taken from the head's (or fused model's) record (``antialias`` for
    those made before it was recorded); an explicit value that disagrees is refused. ``out``'s extension picks the format (.csv, .jsonl, .parquet); rows already there
    (by path) are kept and not scored again. Unreadable images get a row with the reason in ``error``.
    ``workers`` decode threads and ``threads`` ONNX Runtime threads default to the cores, as in extract.
    ``progress``, if given, is called with (total, already_done) and returns a per-image callback.
    ``ScoreSummary.seconds`` times the stream (after the sessions are created), as extract's does.
    """
    if (head is None) == (model is None):
        raise ValueError("give exactly one of head (a saved head) or model (a fused classifier)")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, not {top_k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r}; expected one of {RESIZE_MODES}")
    source = Path(source)
    from_cache = source.suffix.lower() in (".h5", ".hdf5")
    if from_cache and model is not None:
        raise ValueError("scoring a cache's embeddings needs the head (model= is a whole image classifier)")
    if cache is not None and model is not None:
        raise ValueError("cache reuse needs the head (model= runs the whole classifier on images)")
    if from_cache and not source.is_file():
        raise FileNotFoundError(f"cache not found: {source}")
    images = None if from_cache else discover(source, allow_outside_root=allow_outside_root)
    if images is not None and not images.records:
        skipped = f" ({len(images.skipped)} files skipped)" if images.skipped else ""
        raise ScoreError(f"no images found in {source}{skipped}")

    if head is not None:
        predictor = head_predictor(head, trust=trust, store=store, device=device, threads=threads,
                                   backbone=not from_cache)
    else:
        predictor = fused_predictor(model, device=device, threads=threads)
    check_filter(predictor, resize_filter)
    k = min(top_k, len(predictor.labels))
    check_resume(out, {"scored_with": sha256_file(head if head is not None else model), "top_k": k, "resize": resize}
                 | ({} if predictor.resize_filter == LEGACY_RESIZE_FILTER else {"resize_filter": predictor.resize_filter}))
    summary = ScoreSummary(out=str(out), provider=predictor.provider)
    cached = CachedEmbeddings(cache, predictor.key, predictor.model_sha256) if cache is not None else None
    output = open_output(out, k)
    started = time.perf_counter()  # as extract's: the stream, not the session start
    try:
        _run(source, images, predictor, output, summary, cached, top_k=k, batch_size=batch_size, resize=resize,
             workers=workers, progress=progress)
    except BaseException:
        output.close(finish=False)
        raise
    output.close()
    summary.seconds = time.perf_counter() - started
    return summary


def check_filter(predictor: Predictor, resize_filter: str | None) -> None:
    """Refuse an explicit ``resize_filter`` other than the one the predictor's embeddings were made with."""
    if resize_filter is None:
        return
    check_resize_filter(resize_filter)
    if resize_filter != predictor.resize_filter:
        raise ScoreError(f"--resize-filter {resize_filter}: this head's embeddings were extracted with the "
                         f"{predictor.resize_filter} filter; scoring must resize the same way (omit the option)")


def check_resume(out: Path, identity: dict) -> None:
    """Resume only what this same model wrote: ``<out>.tlpipe.json`` records the head/model file hash and
    the options that shape rows; another model, or a file tlpipe did not write, is refused."""
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
        sidecar.write_text(json.dumps(identity))
    except OSError as exc:
        raise ScoreError(f"cannot write {sidecar}: {exc.strerror or exc}") from exc


def _run(source: Path, images: ImageSource | None, predictor: Predictor, output, summary: ScoreSummary,
         cached: CachedEmbeddings | None, *, top_k: int, batch_size: int, resize: str, workers: int | None,
         progress: Callable[[int, int], Callable[[int], None]] | None) -> None:
    if images is None:
        _score_cache(source, predictor, output, summary, top_k=top_k, batch_size=batch_size, progress=progress)
        return
    todo = [r for r in images.records if display_path(r.relpath) not in output.paths]
    summary.total, summary.already_done = len(images.records), len(images.records) - len(todo)
    summary.skipped = list(images.skipped)
    workers = workers or decode_workers()
    _score_images(todo, predictor, output, summary, cached, top_k=top_k, batch_size=batch_size, resize=resize,
                  workers=workers, prefetch=max(2 * batch_size, 4 * workers),
                  advance=progress(summary.total, summary.already_done) if progress else None)
