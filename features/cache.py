"""The HDF5 embedding cache: one row per unique image (by sha256), several feature sets per file.

Schema (version 1; readable with plain h5py, see README):

    /                      attrs: tlpipe_cache_version, cache_id, created
    /images/               attrs: count (committed rows), class_names (JSON list)
        path    (N,)   S512    UTF-8 path relative to the source it came from
        sha256  (N,)   S64      hex digest of the file's bytes
        label   (N,)   int32    index into class_names, -1 = unlabelled
        split   (N,)   S32      "train" | "val" | "test" | "" ...
        size    (N,2)  int32    original width, height (after EXIF orientation)
    /features/<key>/       attrs: count, dim, dtype, metadata (JSON), backbone, input_size
        embeddings (K,D) float32|float16
        image_row  (K,)  int64  row in /images
    /failures/             attrs: count
        path, sha256, reason   (F,) S512, S64, S256

Crash safety: rows past a dataset's committed ``count`` are not part of the cache. A writer appends,
flushes, and only then advances ``count`` (and flushes again); on open it cuts every dataset back to
its committed count. One writer at a time: an exclusive ``flock`` on ``<cache>.lock``.

Full disk: HDF5 does not survive a failed write (the file it leaves may not open again, and the library
can crash at exit), so the writer never lets HDF5 see one. HDF5 writes into :class:`_StagedFile`, which
holds them in memory until a commit point, reserves the disk space they need, and only then writes them:
a full disk fails before the file changes, as a :class:`CacheError`, and the cache keeps its last
committed rows.
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, TypeVar

import h5py
import numpy as np

CACHE_VERSION = 1
CHUNK_ROWS = 256
# Fixed-length strings and no compression filters: variable-length data lives in HDF5's global heap and
# compressed chunks move when rewritten; a kill during a flush corrupted both beyond what the committed
# counts protect (seen in the SIGKILL test). Uncompressed chunks are rewritten in place.
PATH_BYTES, SPLIT_BYTES, REASON_BYTES = 512, 32, 256
_IMAGE_COLUMNS = {"path": f"S{PATH_BYTES}", "sha256": "S64", "label": np.int32, "split": f"S{SPLIT_BYTES}",
                  "size": (np.int32, 2)}
_FAILURE_COLUMNS = {"path": f"S{PATH_BYTES}", "sha256": "S64", "reason": f"S{REASON_BYTES}"}
READ_ATTEMPTS = 6  # a reader that catches a writer mid-commit tries again, after 10, 20, 40, 80 and 160 ms
T = TypeVar("T")


class CacheError(RuntimeError):
    """The cache cannot be used as asked (wrong version, dimension, missing feature set...)."""


class CacheLockedError(CacheError):
    """Another process is writing the cache."""


class _Torn(CacheError):
    """What a reader saw does not add up: a writer was committing (the read is retried) or the file is damaged."""


@dataclass(frozen=True)
class ImageRow:
    path: str
    sha256: str
    label: str | None
    split: str | None
    width: int
    height: int


def _storable(text: str, limit: int = PATH_BYTES) -> bytes:
    """UTF-8 bytes that fit a fixed-length column; names that are not valid UTF-8 keep backslash escapes."""
    data = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace").encode("utf-8")
    return data if len(data) <= limit else data[:limit].decode("utf-8", "ignore").encode("utf-8")


def _strings(values, limit: int = PATH_BYTES) -> np.ndarray:
    return np.array([_storable(v, limit) for v in values], dtype=f"S{limit}")


def _create_columns(group: h5py.Group, columns: dict) -> None:
    for name, dtype in columns.items():
        if isinstance(dtype, tuple):
            group.create_dataset(name, (0, dtype[1]), dtype=dtype[0], maxshape=(None, dtype[1]), chunks=(CHUNK_ROWS, dtype[1]))
        else:
            group.create_dataset(name, (0,), dtype=dtype, maxshape=(None,), chunks=(CHUNK_ROWS,))
    group.attrs["count"] = 0


def _append(dataset: h5py.Dataset, start: int, values) -> None:
    values = np.asarray(values) if not isinstance(values, list) else values
    end = start + len(values)
    if dataset.shape[0] < end:
        dataset.resize(end, axis=0)
    dataset[start:end] = values


def _reserve(fd: int, start: int, length: int) -> None:
    """Allocate the disk blocks of bytes [start, start + length) of ``fd``: ENOSPC or EFBIG is raised here."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, start, length)
        return
    zeros = bytes(min(length, 1 << 20))  # no posix_fallocate (macOS): write zeros, as glibc's fallback does
    while length > 0:
        written = os.pwrite(fd, zeros[:length], start)
        start, length = start + written, length - written


class _StagedFile(io.RawIOBase):
    """The cache file as HDF5 sees it (h5py's ``fileobj`` driver): writes stay in memory until :meth:`commit`,
    which first reserves the space they need on disk, then writes them."""

    def __init__(self, fd: int):
        self.fd = fd
        self.size = self.on_disk = os.fstat(fd).st_size  # HDF5's view / the file's
        self.pos = 0
        self.pending: list[tuple[int, bytes]] = []

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.pos = offset + {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: bytearray | memoryview) -> int:
        view = memoryview(buffer).cast("B")
        start, n = self.pos, len(view)
        got = os.preadv(self.fd, [view[: max(0, min(n, self.on_disk - start))]], start) if start < self.on_disk else 0
        view[got:] = bytes(n - got)
        for offset, data in self.pending:
            lo, hi = max(start, offset), min(start + n, offset + len(data))
            if lo < hi:
                view[lo - start:hi - start] = data[lo - offset:hi - offset]
        self.pos += n
        return n

    def write(self, data: bytes | memoryview) -> int:
        data = bytes(data)
        start, end = self.pos, self.pos + len(data)
        self.pending = [(o, d) for o, d in self.pending if not (start <= o and o + len(d) <= end)]
        self.pending.append((start, data))
        self.size, self.pos = max(self.size, end), end
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()

    def truncate(self, size: int | None = None) -> int:
        self.size = self.pos if size is None else size
        return self.size

    def commit(self) -> None:
        """Write what HDF5 wrote since the last commit. Raises OSError (ENOSPC, EFBIG...) before changing
        the file when the space cannot be reserved; the writes then stay pending."""
        if self.size > self.on_disk:
            _reserve(self.fd, self.on_disk, self.size - self.on_disk)
        for offset, data in self.pending:
            view = memoryview(data)[: max(0, self.size - offset)]
            while view:
                written = os.pwrite(self.fd, view, offset)
                view, offset = view[written:], offset + written
        if os.fstat(self.fd).st_size > self.size:
            os.ftruncate(self.fd, self.size)
        self.on_disk = self.size
        self.pending.clear()


class CacheWriter:
    """The single writer of a cache file. Use as a context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            self._lock = open(self.lock_path, "a+")
        except OSError as exc:
            raise CacheError(f"cannot write next to {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            self._lock.close()
            raise CacheLockedError(f"{self.path} is being written by {holder}; wait for it to finish") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"pid {os.getpid()}")
        self._lock.flush()
        self._failed: str | None = None  # why the last write failed; nothing is written after one
        try:
            self.file = self._open()
        except BaseException:
            self._release()
            raise
        self._index: dict[str, int] | None = None
        self._covered: dict[str, set[int]] = {}
        self._class_index = {name: i for i, name in enumerate(self.class_names)}

    def _open(self) -> h5py.File:
        if not self.path.exists():
            self._create()
        try:
            self._disk = _StagedFile(os.open(self.path, os.O_RDWR | os.O_CLOEXEC))
        except OSError as exc:
            raise CacheError(f"cannot open {self.path} for writing: {exc.strerror or exc}") from exc
        try:
            f = h5py.File(self._disk, "r+")
        except OSError as exc:
            self._disk.close()
            raise CacheError(f"cannot open {self.path} for writing: {exc}") from exc
        try:
            check_version(f, self.path)
            self._committed = int(f["images"].attrs["count"])  # image rows on disk, for error messages
            self._repair(f)
            self._write()
        except BaseException:
            f.close()
            self._disk.close()
            raise
        return f

    def _create(self) -> None:
        """Write an empty cache beside the target and rename it into place: a kill never leaves half a file."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with _StagedFile(os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)) as disk:
                with h5py.File(disk, "w") as f:
                    f.attrs["tlpipe_cache_version"] = CACHE_VERSION
                    f.attrs["cache_id"] = uuid.uuid4().hex
                    f.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
                    images = f.create_group("images")
                    _create_columns(images, _IMAGE_COLUMNS)
                    images.attrs["class_names"] = "[]"
                    _create_columns(f.create_group("failures"), _FAILURE_COLUMNS)
                    f.create_group("features")
                disk.commit()
            os.replace(tmp, self.path)
        except OSError as exc:
            raise CacheError(f"cannot create {self.path}: {exc.strerror or exc}") from exc
        finally:
            if tmp.exists():
                tmp.unlink()

    def _write(self) -> None:
        """Write HDF5's changes to disk; on failure (disk full...) the file keeps its last committed state
        and this writer writes nothing more."""
        if self._failed:
            raise CacheError(self._failed)
        try:
            self._disk.commit()
        except OSError as exc:
            self._failed = (f"cannot write {self.path}: {exc.strerror or exc}; the cache keeps its last committed "
                            f"rows ({self._committed} images), and a re-run with enough space resumes from there")
            raise CacheError(self._failed) from exc

    def _flush(self) -> None:
        self.file.flush()
        self._write()

    @staticmethod
    def _repair(f: h5py.File) -> None:
        """Cut every dataset back to its committed count (a killed writer may have left a tail)."""
        groups = [f["images"], f["failures"], *f["features"].values()]
        for group in groups:
            count = int(group.attrs["count"])
            for dataset in group.values():
                if dataset.shape[0] != count:
                    dataset.resize(count, axis=0)
        f.flush()

    # -- reading what is there -------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return json.loads(self.file["images"].attrs["class_names"])

    @property
    def image_count(self) -> int:
        return int(self.file["images"].attrs["count"])

    @property
    def index(self) -> dict[str, int]:
        """sha256 -> image row."""
        if self._index is None:
            shas = self.file["images/sha256"][: self.image_count]
            self._index = {s.decode(): i for i, s in enumerate(shas)}
        return self._index

    def rows_with(self, key: str) -> set[int]:
        """Image rows that already have an embedding in feature set ``key`` (kept up to date by add)."""
        if key not in self._covered:
            group = self.file["features"].get(key)
            rows = group["image_row"][: int(group.attrs["count"])].tolist() if group is not None else []
            self._covered[key] = set(rows)
        return self._covered[key]

    def has(self, key: str, sha256: str) -> bool:
        """Whether the image with this content already has an embedding in feature set ``key``."""
        row = self.index.get(sha256)
        return row is not None and row in self.rows_with(key)

    # -- writing ---------------------------------------------------------------------------------
    def ensure_feature_set(self, key: str, dim: int, dtype: str = "float32", metadata: dict | None = None) -> None:
        """Create feature set ``key`` or check that the existing one has this dimension and dtype."""
        features = self.file["features"]
        if key in features:
            group = features[key]
            if int(group.attrs["dim"]) != dim:
                raise CacheError(f"{self.path}: feature set {key} has dimension {group.attrs['dim']}, not {dim}")
            if group.attrs["dtype"] != dtype:
                raise CacheError(f"{self.path}: feature set {key} is stored as {group.attrs['dtype']}, not {dtype}")
            return
        if dtype not in ("float32", "float16"):
            raise CacheError(f"dtype must be float32 or float16, not {dtype}")
        group = features.create_group(key)
        chunk = max(1, min(CHUNK_ROWS, (1 << 20) // (dim * np.dtype(dtype).itemsize)))
        group.create_dataset("embeddings", (0, dim), dtype=dtype, maxshape=(None, dim), chunks=(chunk, dim))
        group.create_dataset("image_row", (0,), dtype=np.int64, maxshape=(None,), chunks=(CHUNK_ROWS,))
        metadata = metadata or {}
        group.attrs.update({"dim": dim, "dtype": dtype, "metadata": json.dumps(metadata, sort_keys=True)})
        for name in ("backbone", "input_size", "pooling", "preprocessing"):
            if metadata.get(name) is not None:
                group.attrs[name] = metadata[name]
        group.attrs["count"] = 0
        self._flush()

    def note_extraction(self, key: str, record: dict) -> None:
        """Store how fast feature set ``key`` was extracted (JSON attribute ``extraction``); a figure from a
        pass over more images is not replaced by one from a smaller pass (e.g. a resume)."""
        group = self.file["features"][key]
        old = json.loads(group.attrs.get("extraction", "{}"))
        if old.get("images", 0) < record.get("images", 0):
            group.attrs["extraction"] = json.dumps(record, sort_keys=True)
            self._flush()

    def register_classes(self, names: list[str]) -> None:
        """Give these class names indices (in this order) unless they have one already."""
        for name in names:
            self._label_index(name)

    def _label_index(self, label: str | None) -> int:
        if label is None:
            return -1
        if label not in self._class_index:
            self._class_index[label] = len(self._class_index)
            self.file["images"].attrs["class_names"] = json.dumps(list(self._class_index))
        return self._class_index[label]

    def add(self, key: str, rows: list[ImageRow], embeddings: np.ndarray) -> None:
        """Append embeddings for ``rows`` to feature set ``key`` (new images get an image row) and commit.

        Rows whose content is already in the feature set, or repeated in the batch, are dropped."""
        if len(rows) != len(embeddings):
            raise ValueError("one embedding per row")
        keep, seen = [], set()
        for i, row in enumerate(rows):
            if row.sha256 not in seen and not self.has(key, row.sha256):
                seen.add(row.sha256)
                keep.append(i)
        if not keep:
            return
        rows, embeddings = [rows[i] for i in keep], embeddings[keep]
        images, group = self.file["images"], self.file["features"][key]
        index, start = self.index, self.image_count
        new = [r for r in dict((r.sha256, r) for r in rows if r.sha256 not in index).values()]
        for offset, row in enumerate(new):
            index[row.sha256] = start + offset
        if new:
            _append(images["path"], start, _strings([r.path for r in new]))
            _append(images["sha256"], start, np.array([r.sha256 for r in new], dtype="S64"))
            _append(images["label"], start, np.array([self._label_index(r.label) for r in new], dtype=np.int32))
            _append(images["split"], start, _strings([r.split or "" for r in new], SPLIT_BYTES))
            _append(images["size"], start, np.array([(r.width, r.height) for r in new], dtype=np.int32))
        done = int(group.attrs["count"])
        _append(group["embeddings"], done, embeddings.astype(group.attrs["dtype"], copy=False))
        _append(group["image_row"], done, np.array([index[r.sha256] for r in rows], dtype=np.int64))
        self._flush()
        images.attrs["count"] = start + len(new)
        group.attrs["count"] = done + len(rows)
        self._flush()
        self._committed = self.image_count
        self.rows_with(key).update(index[r.sha256] for r in rows)

    def add_failures(self, failures: list[tuple[str, str, str]]) -> None:
        """Record (path, sha256 or "", reason) for inputs that could not be used; one row per path."""
        group = self.file["failures"]
        count = int(group.attrs["count"])
        known = set(group["path"][:count].tolist()) if count else set()
        fresh = [f for f in dict((_storable(p), (s, r)) for p, s, r in failures).items() if f[0] not in known]
        if not fresh:
            return
        _append(group["path"], count, np.array([p for p, _ in fresh], dtype=f"S{PATH_BYTES}"))
        _append(group["sha256"], count, np.array([s for _, (s, _) in fresh], dtype="S64"))
        _append(group["reason"], count, _strings([r for _, (_, r) in fresh], REASON_BYTES))
        self._flush()
        group.attrs["count"] = count + len(fresh)
        self._flush()

    def note_source(self, source: str) -> None:
        sources = json.loads(self.file.attrs.get("sources", "[]"))
        if source not in sources:
            self.file.attrs["sources"] = json.dumps([*sources, source])

    def close(self) -> None:
        """Write HDF5's last changes (unless a write failed) and release the lock."""
        file, self.file = getattr(self, "file", None), None
        try:
            if file is not None:
                try:
                    file.close()
                    if not self._failed:
                        self._write()
                finally:
                    self._disk.close()
        finally:
            self._release()

    def _release(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _text(values: np.ndarray) -> np.ndarray:
    """Fixed-length UTF-8 bytes -> str array."""
    return np.array([v.decode("utf-8", "replace") for v in values.tolist()], dtype=object).astype(str) if len(values) \
        else np.array([], dtype=str)


def check_version(f: h5py.File, path) -> None:
    version = f.attrs.get("tlpipe_cache_version")
    if version is None:
        raise CacheError(f"{path} is not a tlpipe cache")
    if int(version) != CACHE_VERSION:
        raise CacheError(f"{path} has cache version {version}; this tlpipe reads version {CACHE_VERSION}")


def open_for_read(path: str | os.PathLike) -> h5py.File:
    """Open a cache read-only. No HDF5 lock, so it can be read while a writer appends (rows past the
    committed counts are ignored by every reader here)."""
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"{path} does not exist")
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as exc:
        raise CacheError(f"cannot read {path}: {exc}") from exc
    try:
        check_version(f, path)
    except BaseException:
        f.close()
        raise
    return f


def read_retrying(path: str | os.PathLike, read: Callable[[h5py.File], T]) -> T:
    """``read(f)`` on the cache opened read-only, tried again (``READ_ATTEMPTS`` in all) when it fails in a way
    a concurrent commit explains.

    Without SWMR, a reader that opens the file while the writer commits can see part of that commit: HDF5
    errors (a superblock newer than the file size it saw, addresses past its end of file) or counts of two
    different commits (:class:`_Torn`). Committed rows are never rewritten, so a later try reads a
    consistent state. What still fails is raised as a :class:`CacheError`."""
    for attempt in range(READ_ATTEMPTS):
        if attempt:
            time.sleep(0.005 * 2 ** attempt)
        try:
            with open_for_read(path) as f:
                return read(f)
        except CacheError as exc:
            if not (isinstance(exc, _Torn) or isinstance(exc.__cause__, OSError)):
                raise
            error = exc
        except (OSError, RuntimeError, KeyError, ValueError) as exc:  # h5py's errors for a half-written structure
            error = CacheError(f"cannot read {path}: {exc}")
            error.__cause__ = exc
    raise error


def _committed(dataset: h5py.Dataset, count: int, path) -> np.ndarray:
    """The first ``count`` rows of ``dataset``; fewer means the reader caught the writer mid-commit."""
    data = dataset[:count]
    if len(data) != count:
        raise _Torn(f"{path}: {dataset.name} holds {len(data)} rows, not its committed {count}; the file is damaged")
    return data


@dataclass
class FeatureSet:
    """Embeddings of one feature set with the image table rows they belong to."""

    key: str
    X: np.ndarray  # (N, D) float32
    y: np.ndarray  # (N,) int32 label index, -1 unlabelled
    split: np.ndarray  # (N,) str
    paths: np.ndarray  # (N,) str
    sha256: np.ndarray  # (N,) str
    class_names: list[str]
    metadata: dict = field(default_factory=dict)
    cache_id: str = ""

    def __len__(self) -> int:
        return len(self.X)


def list_feature_sets(path: str | os.PathLike) -> list[str]:
    return read_retrying(path, lambda f: sorted(f["features"].keys()))


def choose_feature_set(keys: list[str], key: str | None, path) -> str:
    """``key`` if given (a unique prefix is enough), else the only feature set."""
    if key is None:
        if len(keys) == 1:
            return keys[0]
        if not keys:
            raise CacheError(f"{path} holds no feature set yet: run tlpipe extract first")
        raise CacheError(f"{path} holds several feature sets; choose one with --features: {', '.join(keys)}")
    matches = [k for k in keys if k == key] or [k for k in keys if k.startswith(key)]
    if len(matches) != 1:
        raise CacheError(f"{path}: feature set {key!r} {'is ambiguous' if matches else 'not found'}; "
                         f"it holds: {', '.join(keys) or 'none'}")
    return matches[0]


def read_feature_set(path: str | os.PathLike, key: str | None = None) -> FeatureSet:
    """Load a feature set with labels, splits and paths (committed rows only; safe while a writer appends)."""

    def read(f: h5py.File) -> FeatureSet:
        name = choose_feature_set(sorted(f["features"].keys()), key, path)
        group, images = f["features"][name], f["images"]
        count, n_images = int(group.attrs["count"]), int(images.attrs["count"])
        rows = _committed(group["image_row"], count, path)
        if count and rows.max() >= n_images:
            raise _Torn(f"{path}: feature set {name} points past the image table; the file is damaged")
        X = _committed(group["embeddings"], count, path).astype(np.float32, copy=False)
        take = lambda column: _committed(images[column], n_images, path)[rows]  # noqa: E731
        y, class_names = take("label"), json.loads(images.attrs["class_names"])
        if count and y.max() >= len(class_names):
            raise _Torn(f"{path}: labels past the class names; the file is damaged")
        return FeatureSet(
            key=name, X=X, y=y, split=_text(take("split")), paths=_text(take("path")),
            sha256=take("sha256").astype(str), class_names=class_names,
            metadata=json.loads(group.attrs.get("metadata", "{}")), cache_id=str(f.attrs["cache_id"]),
        )

    return read_retrying(path, read)


def lookup_embeddings(path: str | os.PathLike, key: str, sha256s: list[str]) -> dict[str, np.ndarray]:
    """Embeddings of feature set ``key`` for the given content hashes that the cache holds."""
    fs = read_feature_set(path, key)
    wanted = set(sha256s)
    return {s: fs.X[i] for i, s in enumerate(fs.sha256) if s in wanted}


def describe(path: str | os.PathLike) -> dict:
    """What the cache holds, as plain data (``tlpipe info``)."""
    return read_retrying(path, lambda f: _describe(f, path))


def _describe(f: h5py.File, path) -> dict:
    images, failures = f["images"], f["failures"]
    n = int(images.attrs["count"])
    labels, splits = _committed(images["label"], n, path), _text(_committed(images["split"], n, path))
    class_names = json.loads(images.attrs["class_names"])
    feature_sets = {}
    for key, group in f["features"].items():
        meta = json.loads(group.attrs.get("metadata", "{}"))
        feature_sets[key] = {"rows": int(group.attrs["count"]), "dim": int(group.attrs["dim"]),
                             "dtype": str(group.attrs["dtype"]), "backbone": meta.get("backbone"),
                             "input_size": meta.get("input_size"), "layer": meta.get("layer"),
                             "pooling": meta.get("pooling"), "weights": (meta.get("weights") or {}).get("source"),
                             "tta": meta.get("tta", "none"),
                             "extraction": json.loads(group.attrs.get("extraction", "null"))}
    nf = int(failures.attrs["count"])
    return {
        "path": str(path), "version": int(f.attrs["tlpipe_cache_version"]), "cache_id": str(f.attrs["cache_id"]),
        "images": n, "class_names": class_names,
        "per_class": {c: int(np.sum(labels == i)) for i, c in enumerate(class_names)} | (
            {"(unlabelled)": int(np.sum(labels < 0))} if np.any(labels < 0) else {}),
        "per_split": {s or "(none)": int(np.sum(splits == s)) for s in sorted(set(splits.tolist()))},
        "feature_sets": feature_sets,
        "failures": [{"path": p, "reason": r} for p, r in zip(_text(_committed(failures["path"], nf, path)),
                                                              _text(_committed(failures["reason"], nf, path)))],
        "sources": json.loads(f.attrs.get("sources", "[]")),
    }
