"""The HDF5 embedding cache: one row per unique image (by sha256), several feature sets per file.

Schema (version 2; readable with plain h5py, see docs/guide/extract.md):

    /                      attrs: tlpipe_cache_version, cache_id, created, sources (JSON list of source roots)
    /images/               attrs: count (committed rows), class_names (JSON list), path_bytes (committed blob bytes)
        path_utf8 (B,)   uint8    paths as the file system's bytes (UTF-8 for UTF-8 names), concatenated (no length
                                  limit, no HDF5 heap); a name that is not UTF-8 keeps its own bytes
        path_span (N,2)  int64    [start, end) of each row's path in path_utf8, relative to its source
        source  (N,)   int32    index into the root attr ``sources``
        sha256  (N,)   S64      hex digest of the file's bytes
        label   (N,)   int32    index into class_names, -1 = unlabelled
        split   (N,)   S32      "train" | "val" | "test" | "" ...
        size    (N,2)  int32    original width, height (after EXIF orientation)
        missing (N,)   uint8    0: the source file was listed by the last extract of its source; 1: gone (no
                                longer listed); 2: changed (its path now holds other content)   [optional]
    /features/<key>/       attrs: count, dim, dtype, resize, metadata (JSON), backbone, input_size
        embeddings (K,D) float32|float16
        image_row  (K,)  int64  row in /images
    /failures/             attrs: count, path_bytes
        path_utf8, path_span, source, sha256, reason, stage   inputs skipped ("listing") or failed ("decode")
    /label_conflicts/      attrs: current ("a" | "b" | ""), length
        a, b  (L,) uint8   JSON of the label conflicts, written to the idle buffer and then switched to
    /augmented/<key>/      attrs: count, dim, dtype, views, seed, recipe (JSON), format (1)   [optional]
        embeddings (M,D) float32|float16  augmented views of images of feature set <key> (extract --augment N)
        image_row  (M,)  int64  row in /images of the image the view was made from
        view       (M,)  int32  view index, 0 .. views-1 (see tlpipe.features.augment)

``/images/missing`` is an addition within version 2 too: a cache without it reads as "all present", and the
writer adds it (zeros) when it opens such a cache. Readers leave missing rows out by default
(:func:`read_feature_set` ``keep_missing``).

``/augmented`` is an addition within version 2: caches without it read as before, and readers that do not
know it never open it (it sits outside ``/features``). Its rows are training rows only (see
:func:`read_views`).

Version 1 caches (paths cut at 512 bytes, feature sets that do not record their resize mode) are refused with a
message: migrating them would have to guess which resize mode made their embeddings.

Crash safety: rows past a dataset's committed ``count`` are not part of the cache. A writer appends,
flushes, and only then advances ``count`` (and flushes again); on open it cuts every dataset back to
its committed count. One writer at a time, whatever name reaches the file (:class:`WriteLock`): an exclusive lock
on ``<real path>.lock`` (:func:`exclusive_lock`: ``filelock``, so flock on POSIX and LockFileEx on Windows),
removed again when the writer closes, and an OFD lock on the file itself (Linux), which hard links share.

Full disk: HDF5 does not survive a failed write (the file it leaves may not open again, and the library
can crash at exit), so the writer never lets HDF5 see one. HDF5 writes into :class:`_StagedFile`, which
holds them in memory until a commit point, reserves the disk space they need, and only then writes them:
a full disk fails before the file changes, as a :class:`CacheError`, and the cache keeps its last
committed rows.
"""

from __future__ import annotations

import errno
import io
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import h5py
import numpy as np

from tlpipe.errors import InputError, TlpipeError

from .colour import MIXED_COLOUR, recorded_colour
from .fastdecode import DEFAULT_RESIZE_FILTER, LEGACY_RESIZE_FILTER, check_resize_filter, recorded_resize_filter
from .names import display_name, normalize_split

__all__ = [
    "BLOB_CHUNK",
    "CACHE_VERSION",
    "CHUNK_ROWS",
    "CacheError",
    "CacheLockedError",
    "CacheWriter",
    "DIMENSION_LABELS",
    "EXPORT_FORMATS",
    "FeatureSet",
    "FeatureSetReader",
    "ImageRow",
    "READ_ATTEMPTS",
    "RESIZE_DEFAULT",
    "T",
    "Views",
    "check_version",
    "choose_feature_set",
    "describe",
    "exclude_rows",
    "exclusive_lock",
    "export_cache",
    "feature_set_key",
    "list_feature_sets",
    "lookup_embeddings",
    "open_for_read",
    "read_exclude_list",
    "read_feature_set",
    "read_paths",
    "read_retrying",
    "read_views",
    "release_lock",
    "source_root",
    "split_feature_set_key",
    "to_pandas",
]

CACHE_VERSION = 2
CHUNK_ROWS = 256
BLOB_CHUNK = 1 << 16
# Fixed-length strings and no compression filters: variable-length data lives in HDF5's global heap and
# compressed chunks move when rewritten; a kill during a flush corrupted both beyond what the committed
# counts protect (seen in the SIGKILL test). Uncompressed chunks are rewritten in place.
# Paths have no fixed width: each is a span of one growing uint8 blob (``path_utf8``), so nothing is cut.
SPLIT_BYTES, REASON_BYTES, STAGE_BYTES = 32, 256, 16
_IMAGE_COLUMNS = {
    "path_span": (np.int64, 2),
    "source": np.int32,
    "sha256": "S64",
    "label": np.int32,
    "split": f"S{SPLIT_BYTES}",
    "size": (np.int32, 2),
    "missing": np.uint8,
}
PRESENT, GONE, CHANGED = 0, 1, 2  # /images/missing
MISSING_REASONS = {GONE: "gone", CHANGED: "changed"}
_FAILURE_COLUMNS = {
    "path_span": (np.int64, 2),
    "source": np.int32,
    "sha256": "S64",
    "reason": f"S{REASON_BYTES}",
    "stage": f"S{STAGE_BYTES}",
}
RESIZE_DEFAULT = "squash"
READ_ATTEMPTS = 6  # a reader that catches a writer mid-commit tries again, after 10, 20, 40, 80 and 160 ms
T = TypeVar("T")


class CacheError(TlpipeError, RuntimeError):
    """The cache cannot be used as asked (wrong version, dimension, missing feature set...)."""


class CacheLockedError(CacheError):
    """Another process is writing the cache."""


class _StaleLock(OSError):
    """The lock file was removed by the holder that released it just as this process opened it."""


def exclusive_lock(path: str | os.PathLike, target: str | os.PathLike, error: type[Exception] = CacheLockedError):
    """Hold an exclusive, non-blocking lock on the lock file ``path`` that guards ``target``; release it with
    :func:`release_lock`, which also removes the lock file.

    The lock is ``filelock``'s (``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows: released by the
    kernel if the holder dies, so a killed run never leaves a stale lock). The holder writes ``pid N`` into
    the file, so a second writer is refused with ``<target> is being written by pid N; wait for it to finish``.
    A lock file removed by a releasing holder between this process's open and lock is detected (its inode is
    no longer the path's) and the lock is taken again on the new file.

    Parameters
    ----------
    path : path-like
        The lock file, e.g. ``cache.h5.lock``.
    target : path-like
        What it guards, for the message.
    error : exception class
        Raised (with the message above) when another process holds the lock.

    Returns
    -------
    filelock.BaseFileLock
        The held lock.

    Raises
    ------
    error
        Another process holds the lock.
    CacheError
        The lock file cannot be created (e.g. a read-only folder).
    """
    from filelock import FileLock, Timeout

    path = os.fspath(path)

    def claim(fd: int) -> None:
        held, now = os.fstat(fd), os.stat(path) if os.path.exists(path) else None
        if now is None or (now.st_ino, now.st_dev) != (held.st_ino, held.st_dev):
            raise _StaleLock(path)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"pid {os.getpid()}".encode())

    for _ in range(10):
        lock = FileLock(path, timeout=0, thread_local=False, on_acquired=claim)
        try:
            lock.acquire()
            return lock
        except _StaleLock:
            continue
        except Timeout:
            try:
                with open(path, encoding="utf-8", errors="replace") as fh:
                    holder = fh.read().strip()
            except OSError:  # Windows: the holder's locked byte cannot be read
                holder = ""
            raise error(f"{target} is being written by {holder or 'another process'}; wait for it to finish") from None
        except OSError as exc:
            raise CacheError(f"cannot write next to {target}: {exc.strerror or exc}") from exc
    raise error(f"{target} is being written by another process; wait for it to finish")


def release_lock(lock) -> None:
    """Remove the lock file and release the lock taken by :func:`exclusive_lock` (no-op when not held).

    On POSIX the file is removed while still locked, so a process that opened it meanwhile sees a removed
    inode and retries; Windows cannot remove an open file, so there it is removed after the release when
    no one else holds it."""
    if lock is None or not lock.is_locked:
        return
    if os.name != "nt":
        try:
            os.unlink(lock.lock_file)
        except OSError:
            pass
        lock.release()
        return
    lock.release()
    try:
        os.unlink(lock.lock_file)
    except OSError:
        pass


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file that guards ``target``: beside the real file, named after it (``<real path>.lock``).

    Every spelling of the path that resolves to the same place (a symlink, a relative path, ``..``, a
    symlinked folder) gives the same lock file, and a folder reached through a bind mount is one folder, so
    its lock file is one file too. Hard links are the one case a name cannot catch: :meth:`WriteLock.pin`.
    """
    return Path(os.path.realpath(target) + ".lock")


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _ofd_lock(fd: int) -> bool:
    """Take an exclusive open-file-description lock on the whole file ``fd`` is open on (Linux ``F_OFD_SETLK``):
    held by this open file, whatever name opened it, until it is closed; unlike POSIX record locks, not lost
    when this process closes another descriptor of the same file, and independent of ``flock`` (HDF5's lock).
    False when another open file holds it; True also where there are no such locks (nothing to check)."""
    try:
        import fcntl
        import struct
    except ImportError:  # Windows
        return True
    command = getattr(fcntl, "F_OFD_SETLK", None)
    if command is None:  # macOS, BSD: no OFD locks (hard links are then caught by name only: not at all)
        return True
    request = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)  # struct flock: the whole file, l_pid 0
    try:
        fcntl.fcntl(fd, command, request)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        return True  # a file system without record locks (some FUSE / network mounts): the named lock still holds
    return True


def _ofd_holder(fd: int) -> str:
    """``pid N`` of the process holding an OFD write lock on the file ``fd`` is open on, found in
    ``/proc/*/fdinfo`` (an OFD lock records no pid of its own); "" when it cannot be told."""
    st = os.fstat(fd)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as fh:
            if not any("OFDLCK" in line and device in line for line in fh):
                return ""
        pids = [entry.name for entry in os.scandir("/proc") if entry.name.isdigit()]
    except OSError:
        return ""
    for pid in pids:
        if int(pid) == os.getpid():
            continue
        try:
            entries = list(os.scandir(f"/proc/{pid}/fdinfo"))
        except OSError:
            continue
        for entry in entries:
            try:
                with open(entry.path, encoding="ascii", errors="replace") as fh:
                    text = fh.read()
            except OSError:
                continue
            if any("OFDLCK" in line and "WRITE" in line and device in line for line in text.splitlines()):
                return f"pid {pid}"
    return ""


class WriteLock:
    """The one writer of a file, whatever name reaches it: used by the cache writer and every output writer.

    Two locks, both released by the kernel if the holder dies:

    - :func:`exclusive_lock` on :func:`lock_path` (the lock file beside the *real* file, so symlinks, relative
      paths and bind mounts agree), holding ``pid N`` for the refusal message;
    - once the file exists, :meth:`pin`: an exclusive OFD lock (Linux) on the file itself, which a second writer
      meets through any hard link too.

    A second writer, by any name, is refused with ``<target> is being written by pid N; wait for it to finish``.

    Parameters
    ----------
    target : path-like
        The file written (it need not exist yet).
    error : exception class
        Raised when another writer holds it.

    Raises
    ------
    error
        Another process (or another writer in this one) holds it.
    CacheError
        The lock file cannot be created.
    """

    def __init__(self, target: str | os.PathLike, error: type[Exception] = CacheLockedError):
        self.target, self.error = target, error
        self.real = Path(os.path.realpath(target))
        self.named = exclusive_lock(lock_path(target), target, error)
        self.fd: int | None = None

    def pin(self, path: str | os.PathLike | None = None) -> None:
        """Lock the file itself (``path``, default the target; after an atomic replacement, the new file), so a
        writer reaching it through a hard link is refused too; nothing to do while it does not exist.

        Raises
        ------
        error
            Another writer holds the file (through another name).
        """
        try:
            fd = os.open(os.path.realpath(path if path is not None else self.real), os.O_RDWR | os.O_CLOEXEC)
        except OSError:  # not there yet, or not writable (the writer itself will say so)
            return
        if self.fd is not None and _same_file(os.fstat(fd), os.fstat(self.fd)):
            os.close(fd)  # pinned already (a second lock from this process would conflict with the first)
            return
        if not _ofd_lock(fd):
            holder = _ofd_holder(fd)
            os.close(fd)
            raise self.error(
                f"{self.target} is being written by {holder or 'another process'}; wait for it to finish"
            ) from None
        self._close()
        self.fd = fd

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def release(self) -> None:
        """Release both locks and remove the lock file (no-op when released already)."""
        try:
            self._close()
        finally:
            release_lock(self.named)


_HELD: dict[str, int] = {}  # real paths this process holds through `writing` (re-entered, not locked twice)


@contextmanager
def writing(target: str | os.PathLike, error: type[Exception] = CacheLockedError) -> Iterator[None]:
    """Hold :class:`WriteLock` on ``target`` (pinned if it exists) for the block; re-entrant within this process
    (``fit-head`` holds its head for the whole run, and saving it inside takes it again).

    Raises
    ------
    error
        Another writer holds ``target``, by any name.
    """
    real = os.path.realpath(target)
    if _HELD.get(real):
        _HELD[real] += 1
        try:
            yield
        finally:
            _HELD[real] -= 1
        return
    lock = WriteLock(target, error)
    try:
        lock.pin()
        _HELD[real] = 1
        yield
    finally:
        _HELD.pop(real, None)
        lock.release()


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
    source: int = -1  # index into the cache's sources (CacheWriter.note_source)


def feature_set_key(model_key: str, resize: str = RESIZE_DEFAULT, resize_filter: str = DEFAULT_RESIZE_FILTER) -> str:
    """The cache key of a feature set: the model-store key plus every setting that changes an embedding.

    The one place the key grammar lives::

        <model_key>[-resize-<mode>][-filter-<filter>]

    Each setting adds its suffix only when it differs from the value feature sets were made with before it was
    recorded, so keys written then keep their meaning: ``squash`` (the default mode) and ``antialias`` (Pillow's
    filter, tlpipe's only one before the filter was a choice) add nothing. So the key of the default
    (``squash``, ``bilinear``) is ``<model_key>-filter-bilinear``, and two settings never share a key.

    Parameters
    ----------
    model_key : str
        Key of the model-store entry that computes the embeddings.
    resize : str
        Resize mode of the images (``squash`` | ``crop``). ``squash``, the default, adds nothing; any other mode
        adds ``-resize-<mode>``.
    resize_filter : str
        Resize filter (:data:`tlpipe.features.fastdecode.RESIZE_FILTERS`: ``bilinear``, the default, | ``antialias``).
        ``antialias`` adds nothing; ``bilinear`` adds ``-filter-bilinear``.

    Returns
    -------
    str

    Raises
    ------
    ValueError
        An unknown ``resize_filter``.
    """
    check_resize_filter(resize_filter)
    key = model_key if resize == RESIZE_DEFAULT else f"{model_key}-resize-{resize}"
    return key if resize_filter == LEGACY_RESIZE_FILTER else f"{key}-filter-{resize_filter}"


def source_root(source: str) -> str:
    """The folder a source's cached paths are relative to: the folder itself, or a CSV manifest's folder.

    The one home of the "cached path -> file on disk" rule: a row's file is
    ``os.path.join(source_root(sources[row.source]), row.path)`` (see :func:`tlpipe.pipeline.reports.images.resolve_image`).
    """
    return source if os.path.isdir(source) or not os.path.splitext(source)[1] else os.path.dirname(source)


def _recorded_sources(f: h5py.File) -> list[str]:
    """The paths of the sources an open cache records (plain strings, or ``{"path": ...}`` records)."""
    raw = f.attrs.get("sources")
    if raw is None:
        return []
    items = json.loads(raw)
    return [s["path"] if isinstance(s, dict) else str(s) for s in items]


def split_feature_set_key(key: str) -> tuple[str, str | None, str | None]:
    """The inverse of :func:`feature_set_key`: ``(model_key, resize, resize_filter)`` from a feature-set key.

    A setting the key spells out (``-resize-<mode>``, ``-filter-<filter>``) is returned; one it does not is
    None, because a key without suffixes is also a plain model-store key (whose feature set then takes the
    defaults). So ``tlpipe extract --backbone KEY`` takes the key ``tlpipe info`` prints as well as the
    model-store key.

    Parameters
    ----------
    key : str
        A feature-set key or a model-store key.

    Returns
    -------
    tuple of (str, str or None, str or None)
    """
    from tlpipe.features.fastdecode import RESIZE_FILTERS
    from tlpipe.features.images import RESIZE_MODES

    resize_filter = resize = None
    for name in RESIZE_FILTERS:
        if key.endswith(f"-filter-{name}"):
            key, resize_filter = key[: -len(f"-filter-{name}")], name
            break
    for mode in RESIZE_MODES:
        if key.endswith(f"-resize-{mode}"):
            key, resize = key[: -len(f"-resize-{mode}")], mode
            break
    return key, resize, resize_filter


def _storable(text: str, limit: int | None = None) -> bytes:
    """UTF-8 bytes; names that are not valid UTF-8 keep backslash escapes. Only ``limit``-byte columns (reasons,
    splits) are cut, at a character boundary; paths never are."""
    data = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace").encode("utf-8")
    return data if limit is None or len(data) <= limit else data[:limit].decode("utf-8", "ignore").encode("utf-8")


def _path_bytes(path: str) -> bytes:
    """A path as stored: the file system's bytes (``os.fsencode`` on POSIX: UTF-8, and the bytes of a name that
    is not UTF-8 kept as they are), so it reads back equal to the listing's path (lossless)."""
    try:
        return path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that did not come from a byte: no bytes to keep
        return _storable(path)


def _strings(values, limit: int) -> np.ndarray:
    return np.array([_storable(v, limit) for v in values], dtype=f"S{limit}")


# HDF5 dimension labels (h5py ``dataset.dims[i].label``; shown by h5dump, xarray, HDFView)
DIMENSION_LABELS = {
    "images": ("image",),
    "images/size": ("image", "width_height"),
    "failures": ("failure",),
    "images/path_span": ("image", "start_end"),
    "failures/path_span": ("failure", "start_end"),
    "embeddings": ("row", "dimension"),
    "image_row": ("row",),
}


def _label_dims(dataset: h5py.Dataset, labels: tuple[str, ...]) -> None:
    for dim, label in zip(dataset.dims, labels):
        dim.label = label


def _create_columns(group: h5py.Group, columns: dict) -> None:
    for name, dtype in columns.items():
        if isinstance(dtype, tuple):
            dataset = group.create_dataset(
                name, (0, dtype[1]), dtype=dtype[0], maxshape=(None, dtype[1]), chunks=(CHUNK_ROWS, dtype[1])
            )
        else:
            dataset = group.create_dataset(name, (0,), dtype=dtype, maxshape=(None,), chunks=(CHUNK_ROWS,))
        _label_dims(
            dataset, DIMENSION_LABELS.get(f"{group.name.strip('/')}/{name}", DIMENSION_LABELS[group.name.strip("/")])
        )
    if "path_span" in columns:
        blob = group.create_dataset("path_utf8", (0,), dtype=np.uint8, maxshape=(None,), chunks=(BLOB_CHUNK,))
        _label_dims(blob, ("byte",))
        group.attrs["path_bytes"] = 0
    group.attrs["count"] = 0


def _append_paths(group: h5py.Group, row: int, paths) -> int:
    """Write ``paths`` into ``group``'s blob after its committed bytes and their spans at ``row``; returns the blob's
    new length (to commit as ``path_bytes`` together with the count)."""
    encoded = [_path_bytes(p) for p in paths]
    start = int(group.attrs["path_bytes"])
    ends = start + np.cumsum([len(e) for e in encoded], dtype=np.int64)
    spans = np.stack([ends - [len(e) for e in encoded], ends], axis=1) if encoded else np.zeros((0, 2), np.int64)
    blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    _append(group["path_utf8"], start, blob)
    _append(group["path_span"], row, spans)
    return int(ends[-1]) if encoded else start


def _decode_paths(group: h5py.Group, spans: np.ndarray, path, raw: bool = False) -> list[str]:
    """The paths of ``spans`` (rows of ``path_span``), read from the blob: as the file system's names (``raw``:
    bytes that are not UTF-8 as surrogate escapes) or in display form (as backslash escapes)."""
    if not len(spans):
        return []
    end = int(spans[:, 1].max())
    blob = group["path_utf8"][:end].tobytes()
    if len(blob) < end:
        raise _Torn(
            f"{path}: {group.name}/path_utf8 holds {len(blob)} bytes, its paths need {end}; the file is damaged"
        )
    errors = "surrogateescape" if raw else "backslashreplace"
    return [blob[a:b].decode("utf-8", errors) for a, b in spans.tolist()]


def read_paths(group: h5py.Group, rows=None, path="cache", *, raw: bool = False) -> list[str]:
    """Paths of the committed rows of an open ``/images`` or ``/failures`` group (all, or the given ``rows``).

    Parameters
    ----------
    group : h5py.Group
        ``f["images"]`` or ``f["failures"]`` of a cache opened with :func:`open_for_read`.
    rows : array of int, optional
        Row numbers (any order, repeats allowed); default all committed rows.
    path : str
        The file, for error messages.
    raw : bool
        The names as the file system has them (bytes that are not UTF-8 as surrogate escapes, so a path opens its
        file and compares equal to a listing's); default the display form (such bytes as backslash escapes: valid
        UTF-8, for reports, JSON, Parquet).

    Returns
    -------
    list of str
        Paths relative to their source.
    """
    n = int(group.attrs["count"])
    spans = _committed(group["path_span"], n, path)
    return _decode_paths(group, spans if rows is None else spans[np.asarray(rows, dtype=np.int64)], path, raw)


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

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        start, n = self.pos, len(view)
        got = os.preadv(self.fd, [view[: max(0, min(n, self.on_disk - start))]], start) if start < self.on_disk else 0
        view[got:] = bytes(n - got)
        for offset, data in self.pending:
            lo, hi = max(start, offset), min(start + n, offset + len(data))
            if lo < hi:
                view[lo - start : hi - start] = data[lo - offset : hi - offset]
        self.pos += n
        return n

    def write(self, data: bytes | memoryview) -> int:  # type: ignore[override]
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
        self.lock_path = lock_path(self.path)  # beside the real file: any name of it takes the same lock
        self._lock = WriteLock(self.path)
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
        self._lock.pin()  # the file itself: a writer reaching it through a hard link is refused too
        try:
            self._disk = _StagedFile(os.open(self.path, os.O_RDWR | os.O_CLOEXEC))
        except OSError as exc:
            raise CacheError(f"cannot open {self.path} for writing: {exc.strerror or exc}") from exc
        try:
            # HDF5's own file lock (flock on the .h5, as the HDF5 library takes it): shared, so plain h5py readers
            # (which take it shared) go on, but a program holding the file open for writing (exclusive) is
            # detected here, and one that opens it for writing while this writer runs is refused by HDF5.
            import fcntl  # POSIX only (imported here: the module stays importable on Windows, which has no flock)

            fcntl.flock(self._disk.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            self._disk.close()
            raise CacheLockedError(
                f"{self.path} is open for writing in another program (it holds HDF5's file lock, "
                "e.g. h5py.File(..., 'a') in a notebook); close the file there and run again"
            ) from None
        except (OSError, ImportError):
            pass  # no flock (Windows, some file systems): the .lock file still keeps tlpipe writers apart
        try:
            f = h5py.File(self._disk, "r+")
        except OSError as exc:
            self._disk.close()
            raise CacheError(f"cannot open {self.path} for writing: {exc}") from exc
        try:
            check_version(f, self.path)
            self._committed = int(f["images"].attrs["count"])  # image rows on disk, for error messages
            self._repair(f)
            self._upgrade(f)
            self._write()
        except BaseException:
            f.close()
            self._disk.close()
            raise
        return f

    def _create(self) -> None:
        """Write an empty cache beside the target and rename it into place: a kill never leaves half a file. The
        target is the real path (a symlink to a file not there yet is followed, not replaced)."""
        real = Path(os.path.realpath(self.path))
        tmp = real.with_name(f".{real.name}.{os.getpid()}.tmp")
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
                    conflicts = f.create_group("label_conflicts")
                    for name in ("a", "b"):
                        conflicts.create_dataset(name, (0,), dtype=np.uint8, maxshape=(None,), chunks=(BLOB_CHUNK,))
                    conflicts.attrs.update({"current": "", "length": 0})
                disk.commit()
            os.replace(tmp, real)
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
            self._failed = (
                f"cannot write {self.path}: {exc.strerror or exc}; the cache keeps its last committed "
                f"rows ({self._committed} images), and a re-run with enough space resumes from there"
            )
            raise CacheError(self._failed) from exc

    def _flush(self) -> None:
        self.file.flush()
        self._write()

    @staticmethod
    def _repair(f: h5py.File) -> None:
        """Cut every dataset back to its committed count (a killed writer may have left a tail)."""
        augmented = f["augmented"].values() if "augmented" in f else []
        groups = [f["images"], f["failures"], *f["features"].values(), *augmented]
        for group in groups:
            count = int(group.attrs["count"])
            for name, dataset in group.items():
                rows = int(group.attrs["path_bytes"]) if name == "path_utf8" else count
                if dataset.shape[0] != rows:
                    dataset.resize(rows, axis=0)
        f.flush()

    @staticmethod
    def _upgrade(f: h5py.File) -> None:
        """Additions within version 2 for a cache written before them: ``/images/missing`` (all present), and
        class names in display form (names that were not UTF-8 were stored with surrogate escapes)."""
        images = f["images"]
        if "missing" not in images:
            count = int(images.attrs["count"])
            missing = images.create_dataset(
                "missing", (count,), dtype=np.uint8, maxshape=(None,), chunks=(CHUNK_ROWS,), fillvalue=PRESENT
            )
            _label_dims(missing, DIMENSION_LABELS["images"])
        names = json.loads(images.attrs["class_names"])
        if any(display_name(n) != n for n in names):
            images.attrs["class_names"] = json.dumps([display_name(n) for n in names])
        f.flush()

    # -- reading what is there -------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return _class_names(self.file["images"])

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
    def ensure_feature_set(
        self, key: str, dim: int, dtype: str = "float32", metadata: dict | None = None
    ) -> str | None:
        """Create feature set ``key`` or check that the existing one has this dimension and dtype.

        Returns the colour handling (:func:`tlpipe.features.colour.recorded_colour`) an existing feature set
        recorded when ``metadata`` names another one (a set made before embedded colour profiles were rendered
        to sRGB): the set then records ``mixed`` (attribute ``colour`` and its metadata), and the caller says so.
        None otherwise.
        """
        features = self.file["features"]
        if key in features:
            group = features[key]
            if int(group.attrs["dim"]) != dim:
                raise CacheError(f"{self.path}: feature set {key} has dimension {group.attrs['dim']}, not {dim}")
            if group.attrs["dtype"] != dtype:
                raise CacheError(f"{self.path}: feature set {key} is stored as {group.attrs['dtype']}, not {dtype}")
            stored = json.loads(group.attrs.get("metadata", "{}"))
            before = str(group.attrs.get("colour", recorded_colour(stored)))
            if metadata and metadata.get("colour") and before not in (metadata["colour"], MIXED_COLOUR):
                group.attrs["colour"] = MIXED_COLOUR
                group.attrs["metadata"] = json.dumps(stored | {"colour": MIXED_COLOUR}, sort_keys=True)
                self._flush()
                return before
            return None
        if dtype not in ("float32", "float16"):
            raise CacheError(f"dtype must be float32 or float16, not {dtype}")
        group = features.create_group(key)
        chunk = max(1, min(CHUNK_ROWS, (1 << 20) // (dim * np.dtype(dtype).itemsize)))
        group.create_dataset("embeddings", (0, dim), dtype=dtype, maxshape=(None, dim), chunks=(chunk, dim))
        group.create_dataset("image_row", (0,), dtype=np.int64, maxshape=(None,), chunks=(CHUNK_ROWS,))
        _label_dims(group["embeddings"], DIMENSION_LABELS["embeddings"])
        _label_dims(group["image_row"], DIMENSION_LABELS["image_row"])
        metadata = metadata or {}
        group.attrs.update(
            {
                "dim": dim,
                "dtype": dtype,
                "metadata": json.dumps(metadata, sort_keys=True),
                "resize": metadata.get("resize") or RESIZE_DEFAULT,
                "resize_filter": recorded_resize_filter(metadata),
                "colour": recorded_colour(metadata),
            }
        )
        for name in ("backbone", "input_size", "pooling", "preprocessing"):
            if metadata.get(name) is not None:
                group.attrs[name] = metadata[name]
        group.attrs["count"] = 0
        self._flush()
        return None

    def note_extraction(self, key: str, record: dict) -> None:
        """Store how fast feature set ``key`` was extracted (JSON attribute ``extraction``); a figure from a
        pass over more images is not replaced by one from a smaller pass (e.g. a resume)."""
        group = self.file["features"][key]
        old = json.loads(group.attrs.get("extraction", "{}"))
        if old.get("images", 0) < record.get("images", 0):
            group.attrs["extraction"] = json.dumps(record, sort_keys=True)
            self._flush()

    # -- augmented views (extract --augment N): training rows stored beside a feature set -------------------
    def ensure_augmented(self, key: str, views: int, seed: int, recipe: dict, dtype: str = "float32") -> None:
        """Create the augmented rows of feature set ``key`` or check that they were made with ``seed`` and
        ``recipe`` (then ``views`` may grow: the views already stored are kept).

        Raises
        ------
        CacheError
            ``key`` is not a feature set of the cache, or its views were made with another seed or recipe.
        """
        features = self.file["features"]
        if key not in features:
            raise CacheError(f"{self.path}: no feature set {key}; extract it before its augmented views")
        parent = self.file.require_group("augmented")
        recipe_text = json.dumps(recipe, sort_keys=True)
        if key in parent:
            group = parent[key]
            if int(group.attrs["seed"]) != seed or group.attrs["recipe"] != recipe_text:
                raise CacheError(
                    f"{self.path}: the augmented views of {key} were made with seed {group.attrs['seed']} "
                    f"and recipe {group.attrs['recipe']}; one set of views per feature set: use seed "
                    f"{group.attrs['seed']}, or extract into another cache"
                )
            if views > int(group.attrs["views"]):
                group.attrs["views"] = views
                self._flush()
            return
        dim, dtype = int(features[key].attrs["dim"]), str(features[key].attrs["dtype"])
        group = parent.create_group(key)
        chunk = max(1, min(CHUNK_ROWS, (1 << 20) // (dim * np.dtype(dtype).itemsize)))
        group.create_dataset("embeddings", (0, dim), dtype=dtype, maxshape=(None, dim), chunks=(chunk, dim))
        group.create_dataset("image_row", (0,), dtype=np.int64, maxshape=(None,), chunks=(CHUNK_ROWS,))
        group.create_dataset("view", (0,), dtype=np.int32, maxshape=(None,), chunks=(CHUNK_ROWS,))
        group.attrs.update(
            {"dim": dim, "dtype": dtype, "views": views, "seed": seed, "recipe": recipe_text, "format": 1, "count": 0}
        )
        self._flush()

    def augmented_views(self, key: str) -> dict[int, set[int]]:
        """Image row -> the view indices stored for it in the augmented rows of ``key`` (empty when none)."""
        group = self.file["augmented"].get(key) if "augmented" in self.file else None
        if group is None:
            return {}
        count = int(group.attrs["count"])
        have: dict[int, set[int]] = {}
        for row, view in zip(group["image_row"][:count].tolist(), group["view"][:count].tolist()):
            have.setdefault(row, set()).add(view)
        return have

    def add_augmented(self, key: str, rows: list[int], views: list[int], embeddings: np.ndarray) -> None:
        """Append augmented views (image row, view index, embedding) of feature set ``key`` and commit."""
        if not (len(rows) == len(views) == len(embeddings)):
            raise InputError("one image row and one view index per embedding")
        group = self.file["augmented"][key]
        done = int(group.attrs["count"])
        _append(group["embeddings"], done, embeddings.astype(group.attrs["dtype"], copy=False))
        _append(group["image_row"], done, np.asarray(rows, dtype=np.int64))
        _append(group["view"], done, np.asarray(views, dtype=np.int32))
        self._flush()
        group.attrs["count"] = done + len(rows)
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
            raise InputError("one embedding per row")
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
        path_bytes = int(images.attrs["path_bytes"])
        if new:
            path_bytes = _append_paths(images, start, [r.path for r in new])
            _append(images["source"], start, np.array([r.source for r in new], dtype=np.int32))
            _append(images["sha256"], start, np.array([r.sha256 for r in new], dtype="S64"))
            _append(images["label"], start, np.array([self._label_index(r.label) for r in new], dtype=np.int32))
            _append(images["split"], start, _strings([r.split or "" for r in new], SPLIT_BYTES))
            _append(images["size"], start, np.array([(r.width, r.height) for r in new], dtype=np.int32))
            _append(images["missing"], start, np.zeros(len(new), dtype=np.uint8))
        done = int(group.attrs["count"])
        _append(group["embeddings"], done, embeddings.astype(group.attrs["dtype"], copy=False))
        _append(group["image_row"], done, np.array([index[r.sha256] for r in rows], dtype=np.int64))
        self._flush()
        images.attrs["path_bytes"] = path_bytes
        images.attrs["count"] = start + len(new)
        group.attrs["count"] = done + len(rows)
        self._flush()
        self._committed = self.image_count
        self.rows_with(key).update(index[r.sha256] for r in rows)

    def add_failures(self, failures: list[tuple[str, str, str]], *, stage: str = "decode", source: int = -1) -> None:
        """Record (path, sha256 or "", reason) for inputs that could not be used; one row per (source, full path).

        ``stage`` is ``"listing"`` for inputs skipped while listing the source, ``"decode"`` for files that failed
        to read or decode."""
        group = self.file["failures"]
        count = int(group.attrs["count"])
        known = (
            set(
                zip(
                    _committed(group["source"], count, self.path).tolist(), read_paths(group, None, self.path, raw=True)
                )
            )
            if count
            else set()
        )
        fresh = [(p, v) for p, v in dict(((p, (s, r)) for p, s, r in failures)).items() if (source, p) not in known]
        if not fresh:
            return
        path_bytes = _append_paths(group, count, [p for p, _ in fresh])
        _append(group["source"], count, np.full(len(fresh), source, dtype=np.int32))
        _append(group["sha256"], count, np.array([s for _, (s, _) in fresh], dtype="S64"))
        _append(group["reason"], count, _strings([r for _, (_, r) in fresh], REASON_BYTES))
        _append(group["stage"], count, _strings([stage] * len(fresh), STAGE_BYTES))
        self._flush()
        group.attrs["path_bytes"] = path_bytes
        group.attrs["count"] = count + len(fresh)
        self._flush()

    def note_source(self, source: str) -> int:
        """Record a source (folder or manifest) and return its index (the rows' ``source`` column)."""
        sources = json.loads(self.file.attrs.get("sources", "[]"))
        if source not in sources:
            sources.append(source)
            self.file.attrs["sources"] = json.dumps(sources)
        return sources.index(source)

    # -- labels: conflicts and fixes --------------------------------------------------------------------
    def label_conflicts(self) -> dict[str, dict]:
        """sha256 -> {"row", "occurrences": [{"source", "path", "label", "split"}, ...]} as last written."""
        return {c["sha256"]: c for c in _read_conflicts(self.file, self.path)}

    def _write_conflicts(self, conflicts: list[dict]) -> None:
        """Write the conflict list into the idle buffer, commit, then switch to it (a kill keeps the old list)."""
        group = self.file["label_conflicts"]
        idle = "b" if group.attrs["current"] == "a" else "a"
        data = np.frombuffer(json.dumps(conflicts, sort_keys=True).encode("utf-8"), dtype=np.uint8)
        dataset = group[idle]
        dataset.resize(len(data), axis=0)
        dataset[:] = data
        self._flush()
        group.attrs.update({"current": idle, "length": len(data)})
        self._flush()

    def reconcile(
        self, source: int, seen: dict[str, list[tuple[str, str | None, str | None]]]
    ) -> tuple[int, list[dict]]:
        """Bring the image table in line with what a complete listing of ``source`` found, without re-embedding.

        Parameters
        ----------
        source : int
            The source's index (:meth:`note_source`).
        seen : dict
            sha256 -> [(path, label, split), ...]: every readable file of the source, by content.

        Returns
        -------
        changed : int
            Rows of this source whose path, label or split changed (a file moved, or was relabelled).
        conflicts : list of dict
            Every content that now carries two or more different labels, with all its occurrences (this source's
            and other sources'); such rows are left out of training and evaluation by :func:`read_feature_set`.
            A conflict is never settled by which path sorts first.
        """
        images = self.file["images"]
        n = self.image_count
        if not n:
            return 0, []
        sources = _committed(images["source"], n, self.path)
        labels = _committed(images["label"], n, self.path)
        splits = _text(_committed(images["split"], n, self.path))
        paths = read_paths(images, None, self.path, raw=True)  # as the listing has them, to compare
        missing = _missing(images, n, self.path)
        names = self.class_names
        index = self.index
        previous = self.label_conflicts()
        conflicts: dict[str, dict] = {}
        updates: list[tuple[int, str, str | None, str | None]] = []

        def occurrence(src: int, path: str, label: str | None, split: str | None) -> dict:
            return {"source": int(src), "path": path, "label": label, "split": split or None}

        for sha, found in seen.items():
            row = index.get(sha)
            if row is None:
                continue
            here = [occurrence(source, *item) for item in sorted(found, key=lambda item: item[0])]
            others = [o for o in previous.get(sha, {}).get("occurrences", []) if o["source"] != source]
            if sources[row] != source and not missing[row] and not any(o["source"] == sources[row] for o in others):
                label = names[labels[row]] if labels[row] >= 0 else None
                others.append(occurrence(sources[row], paths[row], label, splits[row]))
            everywhere = others + here
            if len({o["label"] for o in everywhere if o["label"] is not None}) > 1:
                conflicts[sha] = {"sha256": sha, "row": int(row), "occurrences": everywhere}
            if sources[row] in (source, -1) or missing[row]:  # a row whose file was gone is taken up where it is now
                first = here[0]
                label = names[labels[row]] if labels[row] >= 0 else None
                if (
                    (first["path"], first["label"], first["split"] or "") != (paths[row], label, splits[row])
                    or sources[row] != source
                    or missing[row]
                ):
                    updates.append((int(row), first["path"], first["label"], first["split"]))
        for sha, record in previous.items():  # conflicts this listing did not see: its files are gone from it
            if sha in seen:
                continue
            rest = [o for o in record["occurrences"] if o["source"] != source]
            if len({o["label"] for o in rest if o["label"] is not None}) > 1:
                conflicts[sha] = record | {"occurrences": rest}
        changed = sum(1 for row, *_ in updates if sources[row] == source)
        if updates:
            self._update_rows(source, updates)
        ordered = sorted(conflicts.values(), key=lambda c: c["row"])
        if ordered or previous:
            self._write_conflicts(ordered)
        return changed, ordered

    def mark_missing(
        self, source: int, seen: dict[str, list], listed: set[str], root: str | None = None
    ) -> list[tuple[str, str]]:
        """Mark the rows of ``source`` whose content a complete listing of it no longer holds (after
        :meth:`reconcile`, which has taken up rows whose content is still listed).

        Parameters
        ----------
        source : int
            The source's index (:meth:`note_source`).
        seen : dict
            sha256 -> occurrences: every readable file of the listing, by content (as for :meth:`reconcile`).
        listed : set of str
            Every path of the listing (readable or not), relative to the source.
        root : str, optional
            The folder of a folder source: a row whose file still exists there, though this listing did not take
            it (e.g. loose photos beside class folders), is neither gone nor changed and is not marked. None (a
            manifest): a path the manifest no longer lists is gone from the source.

        Returns
        -------
        list of (str, str)
            (path in display form, ``"gone"`` | ``"changed"``) of each row marked now: ``gone`` when its path is no
            longer listed (deleted, moved out of the source, no longer in the manifest), ``changed`` when its path
            now holds other content (edited in place; the new content has a row of its own). Rows marked before
            are not repeated. Such rows stay in the cache (a file that comes back is used again without
            re-embedding) and are left out by :func:`read_feature_set` unless ``keep_missing``.
        """
        images = self.file["images"]
        n = self.image_count
        if not n:
            return []
        sources = _committed(images["source"], n, self.path)
        missing = _missing(images, n, self.path)
        held = np.zeros(n, dtype=bool)
        rows = [self.index[sha] for sha in seen if sha in self.index]
        held[rows] = True
        gone = np.flatnonzero((sources == source) & (missing == PRESENT) & ~held)
        if not len(gone):
            return []
        paths = read_paths(images, gone, self.path, raw=True)
        if root is not None:  # still on disk, only not listed this time: not gone
            kept = [i for i, p in enumerate(paths) if p in listed or not os.path.isfile(os.path.join(root, p))]
            gone, paths = gone[kept], [paths[i] for i in kept]
            if not len(gone):
                return []
        codes = np.array([CHANGED if p in listed else GONE for p in paths], dtype=np.uint8)
        images["missing"][gone] = codes
        self._flush()
        return [(display_name(p), MISSING_REASONS[int(c)]) for p, c in zip(paths, codes)]

    def _update_rows(self, source: int, updates: list[tuple[int, str, str | None, str | None]]) -> None:
        """Rewrite path, label, split and source of committed rows in place (each row's file is listed: it is
        present). The new paths are appended to the blob and committed first, so a reader (or a kill) sees each
        row's old or new span, both whole."""
        images = self.file["images"]
        start = int(images.attrs["path_bytes"])
        encoded = [_path_bytes(path) for _, path, _, _ in updates]
        blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        _append(images["path_utf8"], start, blob)
        self._flush()
        images.attrs["path_bytes"] = start + len(blob)
        self._flush()
        offset = start
        for (row, _, label, split), data in zip(updates, encoded):
            images["path_span"][row] = (offset, offset + len(data))
            images["label"][row] = self._label_index(label)
            images["split"][row] = _storable(split or "", SPLIT_BYTES)
            images["source"][row] = source
            images["missing"][row] = PRESENT
            offset += len(data)
        self._flush()

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
        self._lock.release()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _text(values: np.ndarray) -> np.ndarray:
    """Fixed-length UTF-8 bytes -> str array."""
    return (
        np.array([v.decode("utf-8", "replace") for v in values.tolist()], dtype=object).astype(str)
        if len(values)
        else np.array([], dtype=str)
    )


def missing_note(count: int) -> str:
    """The note heads, compare, audit and evaluate add when :func:`read_feature_set` left out ``count`` rows whose
    source file is gone or changed."""
    return (
        f"{count} row{'s' if count != 1 else ''} whose source file is gone or changed since extract left out "
        "(--keep-missing keeps them)"
    )


def _missing(images: h5py.Group, n: int, path) -> np.ndarray:
    """The committed ``/images/missing`` column (all present for a cache written before it existed)."""
    if "missing" not in images:
        return np.zeros(n, dtype=np.uint8)
    return _committed(images["missing"], n, path)


def _class_names(images: h5py.Group) -> list[str]:
    """The class names, in display form (a cache written before stored names that were not UTF-8 as surrogates)."""
    return [display_name(n) for n in json.loads(images.attrs["class_names"])]


def _splits(values: np.ndarray) -> np.ndarray:
    """The split column as tlpipe uses it: the shared split names (:func:`tlpipe.features.names.normalize_split`),
    so a cache written before an alias was known reads as one written now."""
    text = _text(values)
    if not len(text):
        return text
    unique, inverse = np.unique(text, return_inverse=True)
    return np.array([normalize_split(s) if s else "" for s in unique.tolist()], dtype=str)[inverse]


def check_version(f: h5py.File, path) -> None:
    version = f.attrs.get("tlpipe_cache_version")
    if version is None:
        raise CacheError(f"{path} is not a tlpipe cache")
    if int(version) == 1:
        raise CacheError(
            f"{path} is a version 1 cache, which this tlpipe cannot use: its feature sets do not record "
            "the resize mode that made them and its paths were cut at 512 bytes; extract into a new cache "
            "file (the model store keeps the exports, so only embedding is redone)"
        )
    if int(version) != CACHE_VERSION:
        raise CacheError(f"{path} has cache version {version}; this tlpipe reads version {CACHE_VERSION}")


def _read_conflicts(f: h5py.File, path) -> list[dict]:
    """The label conflicts recorded in an open cache (the buffer ``current`` points at)."""
    group = f["label_conflicts"]
    current, length = str(group.attrs["current"]), int(group.attrs["length"])
    if not current or not length:
        return []
    data = group[current][:length].tobytes()
    if len(data) != length:
        raise _Torn(f"{path}: the label conflict list holds {len(data)} bytes, not {length}; the file is damaged")
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError as exc:
        raise _Torn(f"{path}: the label conflict list cannot be read ({exc}); the file is damaged") from exc


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
            time.sleep(0.005 * 2**attempt)
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
    excluded: int = 0  # rows left out by an exclude list (read_feature_set(..., exclude=...))
    source: np.ndarray | None = None  # (N,) int32 index into the cache's sources
    label_conflicts: list[dict] = field(default_factory=list)  # every conflict recorded in the cache
    excluded_conflicts: int = 0  # rows left out because their content carries two labels
    sources: list[str] = field(default_factory=list)  # the cache's recorded sources; ``source`` indexes them

    def source_root_of(self, row: int) -> str:
        """The folder row ``row``'s path is relative to ("" when the cache records no source for it)."""
        return source_root(self.source_of(row) or "")

    def source_of(self, row: int) -> str | None:
        """The recorded source (folder or manifest) of row ``row``, or None."""
        if self.source is None:
            return None
        index = int(self.source[row])
        return self.sources[index] if 0 <= index < len(self.sources) else None

    excluded_missing: int = 0  # rows left out because their source file is gone or changed (CacheWriter.mark_missing)

    def __len__(self) -> int:
        return len(self.X)

    @property
    def resize(self) -> str:
        """The resize mode the embeddings were made with (part of the feature set's identity)."""
        return str(self.metadata.get("resize") or RESIZE_DEFAULT)

    @property
    def resize_filter(self) -> str:
        """The resize filter the embeddings were made with (part of the identity; ``antialias`` when not recorded:
        made before the filter was a choice)."""
        return recorded_resize_filter(self.metadata)

    @property
    def colour(self) -> str:
        """How colour profiles were handled (part of the identity): ``srgb-icc`` (embedded ICC profiles rendered to
        sRGB), ``none`` (not recorded: made before, code values as stored) or ``mixed`` (rows of both)."""
        return recorded_colour(self.metadata)


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
        raise CacheError(
            f"{path}: feature set {key!r} {'is ambiguous' if matches else 'not found'}; "
            f"it holds: {', '.join(keys) or 'none'}"
        )
    return matches[0]


def read_feature_set(
    path: str | os.PathLike,
    key: str | None = None,
    *,
    exclude_conflicts: bool = True,
    exclude: str | os.PathLike | None = None,
    keep_missing: bool = False,
) -> FeatureSet:
    """Load a feature set with labels, splits and paths (committed rows only; safe while a writer appends).

    Parameters
    ----------
    path : str or path
        The cache.
    key : str, optional
        Feature set key or a unique prefix; default the only one.
    exclude_conflicts : bool
        Leave out rows whose content carries two or more labels (a label conflict, see
        :meth:`CacheWriter.reconcile`). True by default so that no head trains or is evaluated on a label
        decided by which copy was listed first; the count is in ``excluded_conflicts`` and the conflicts
        themselves in ``label_conflicts``. Pass False to score or inspect every row.
    exclude : str or path, optional
        An exclude list (:func:`read_exclude_list`, e.g. written by ``tlpipe audit --write-exclude``): its
        rows are left out and counted in ``excluded``.
    keep_missing : bool
        Keep the rows whose source file the last ``extract`` of their source found gone or changed
        (:meth:`CacheWriter.mark_missing`). False by default: they are left out, counted in ``excluded_missing``,
        so heads train and are evaluated on the folder as it is now.

    Returns
    -------
    FeatureSet
        ``X`` (N, D) float32, ``y`` (N,) int32 label index (-1 unlabelled), ``split`` (the shared split names,
        :func:`tlpipe.features.names.normalize_split`), ``paths`` (display form: bytes that are not UTF-8 as
        backslash escapes), ``sha256`` (N,) str, ``source`` (N,) int32; ``class_names`` in display form.

    Raises
    ------
    CacheError
        No such feature set, several without ``key``, a damaged or foreign file.
    """

    def read(f: h5py.File) -> FeatureSet:
        name = choose_feature_set(sorted(f["features"].keys()), key, path)
        group, images = f["features"][name], f["images"]
        count, n_images = int(group.attrs["count"]), int(images.attrs["count"])
        rows = _committed(group["image_row"], count, path)
        if count and rows.max() >= n_images:
            raise _Torn(f"{path}: feature set {name} points past the image table; the file is damaged")
        X = _committed(group["embeddings"], count, path).astype(np.float32, copy=False)
        take = lambda column: _committed(images[column], n_images, path)[rows]  # noqa: E731
        y, class_names = take("label"), _class_names(images)
        if count and y.max() >= len(class_names):
            raise _Torn(f"{path}: labels past the class names; the file is damaged")
        conflicts = _read_conflicts(f, path)
        fs = FeatureSet(
            key=name,
            X=X,
            y=y,
            split=_splits(take("split")),
            paths=np.array(read_paths(images, rows, path), dtype=object).astype(str)
            if count
            else np.array([], dtype=str),
            sha256=take("sha256").astype(str),
            class_names=class_names,
            metadata=json.loads(group.attrs.get("metadata", "{}")),
            cache_id=str(f.attrs["cache_id"]),
            source=take("source"),
            label_conflicts=conflicts,
            sources=_recorded_sources(f),
        )
        keep = np.ones(count, dtype=bool)
        if exclude_conflicts and conflicts:
            keep &= ~np.isin(rows, [c["row"] for c in conflicts])
            fs.excluded_conflicts = int(count - keep.sum())
        if not keep_missing:
            gone = _missing(images, n_images, path)[rows] != PRESENT
            fs.excluded_missing = int((keep & gone).sum())
            keep &= ~gone
        if not keep.all():
            for column in ("X", "y", "split", "paths", "sha256", "source"):
                setattr(fs, column, getattr(fs, column)[keep])
        return fs

    fs = read_retrying(path, read)
    return fs if exclude is None else exclude_rows(fs, read_exclude_list(exclude))


@dataclass
class Views:
    """Augmented views of the images of a :class:`FeatureSet`, as extra training rows.

    ``X`` (M, D) float32 embeddings; ``owner`` (M,) int64 the position in the feature set's rows of the image
    each view was made from; ``view`` (M,) int32 the view index. Views of images the feature set does not hold
    (left out by an exclude list, a label conflict, or cut to common rows) are not included.
    """

    X: np.ndarray
    owner: np.ndarray
    view: np.ndarray
    views: int = 0  # views per image asked for
    seed: int = 0
    recipe: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.X)


def read_views(path: str | os.PathLike, fs: FeatureSet) -> Views | None:
    """The augmented views of feature set ``fs`` (``extract --augment N``), matched to its rows by content.

    Parameters
    ----------
    path : path
        The cache ``fs`` was read from.
    fs : FeatureSet
        As read (and perhaps filtered); each view's ``owner`` is a position in its rows.

    Returns
    -------
    Views or None
        None when the cache holds no augmented views of ``fs.key``.
    """

    def read(f: h5py.File) -> Views | None:
        if "augmented" not in f or fs.key not in f["augmented"]:
            return None
        group, images = f["augmented"][fs.key], f["images"]
        count, n_images = int(group.attrs["count"]), int(images.attrs["count"])
        rows = _committed(group["image_row"], count, path)
        if count and rows.max() >= n_images:
            raise _Torn(f"{path}: augmented views of {fs.key} point past the image table; the file is damaged")
        shas = _committed(images["sha256"], n_images, path)[rows].astype(str)
        position = {s: i for i, s in enumerate(fs.sha256)}
        owner = np.array([position.get(s, -1) for s in shas], dtype=np.int64)
        keep = owner >= 0
        X = _committed(group["embeddings"], count, path)[keep].astype(np.float32, copy=False)
        return Views(
            X=X,
            owner=owner[keep],
            view=_committed(group["view"], count, path)[keep],
            views=int(group.attrs["views"]),
            seed=int(group.attrs["seed"]),
            recipe=json.loads(group.attrs["recipe"]),
        )

    return read_retrying(path, read)


def read_exclude_list(path: str | os.PathLike) -> set[str]:
    """The sha256 digests of an exclude list: one per line, ``#`` starts a comment, blank lines ignored.

    Raises CacheError naming the file and line for anything that is not a 64-digit hex digest."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CacheError(f"cannot read exclude list {path}: {exc.strerror or exc}") from exc
    digests = set()
    for number, line in enumerate(text.splitlines(), 1):
        value = line.split("#", 1)[0].strip().lower()
        if not value:
            continue
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise CacheError(f"{path}, line {number}: {value[:80]!r} is not a sha256 (64 hex digits)")
        digests.add(value)
    return digests


def exclude_rows(fs: FeatureSet, sha256s: set[str]) -> FeatureSet:
    """``fs`` without the rows whose content hash is in ``sha256s``; ``excluded`` counts them."""
    keep = ~np.isin(fs.sha256, list(sha256s)) if sha256s else np.ones(len(fs), dtype=bool)
    if keep.all():
        return fs
    import dataclasses

    per_row = {
        f.name: getattr(fs, f.name)[keep]
        for f in dataclasses.fields(fs)
        if isinstance(getattr(fs, f.name), np.ndarray) and len(getattr(fs, f.name)) == len(keep)
    }
    return dataclasses.replace(fs, **per_row, excluded=fs.excluded + int((~keep).sum()))


def lookup_embeddings(path: str | os.PathLike, key: str, sha256s: list[str]) -> dict[str, np.ndarray]:
    """Embeddings of feature set ``key`` for the given content hashes that the cache holds.

    Through :class:`FeatureSetReader`: the hash index, then only the embedding rows asked for (not the
    whole feature set). A missing cache or feature set gives ``{}``.
    """
    if not Path(path).is_file() or key not in list_feature_sets(path):
        return {}
    reader = FeatureSetReader(path, key)
    present = [s for s in dict.fromkeys(sha256s) if s in reader]
    return dict(zip(present, reader.get(present))) if present else {}


def describe(path: str | os.PathLike, embeddings: bool = False) -> dict:
    """What the cache holds, as plain data (``tlpipe info``).

    Parameters
    ----------
    path : path-like
        The cache.
    embeddings : bool
        Also read every embedding (in blocks) and report, per feature set, the rows holding a NaN or an infinity:
        ``nonfinite_rows`` (a count) and ``nonfinite`` (their ``path`` and ``sha256``). Such rows get an error
        row in ``score`` and are left out of ``fit-head``, ``compare`` and ``audit``.
    """
    return read_retrying(path, lambda f: _describe(f, path, embeddings))


def _nonfinite(group: h5py.Group, images: h5py.Group, path, block_rows: int = 16384) -> list[dict]:
    """The committed rows of a feature set whose embedding holds a NaN or an infinity: their path and sha256."""
    count = int(group.attrs["count"])
    bad = [
        start + np.flatnonzero(~np.isfinite(group["embeddings"][start : min(start + block_rows, count)]).all(axis=1))
        for start in range(0, count, block_rows)
    ]
    rows = np.concatenate(bad) if bad else np.array([], dtype=np.intp)
    if not len(rows):
        return []
    image_rows = _committed(group["image_row"], count, path)[rows]
    paths = read_paths(images, image_rows, path)
    return [{"path": p, "sha256": images["sha256"][r].decode()} for p, r in zip(paths, image_rows.tolist())]


def _describe(f: h5py.File, path, embeddings: bool = False) -> dict:
    images, failures = f["images"], f["failures"]
    n = int(images.attrs["count"])
    labels, splits = _committed(images["label"], n, path), _splits(_committed(images["split"], n, path))
    row_sources = _committed(images["source"], n, path)
    missing = _missing(images, n, path)
    present = missing == PRESENT
    class_names = _class_names(images)
    sources = json.loads(f.attrs.get("sources", "[]"))
    feature_sets = {}
    for key, group in f["features"].items():
        if group is None:  # its link is there, the group not yet (a writer creating it): read again
            raise _Torn(f"{path}: feature set {key} is being created")
        meta = json.loads(group.attrs.get("metadata", "{}"))
        feature_sets[key] = {
            "rows": int(group.attrs["count"]),
            "dim": int(group.attrs["dim"]),
            "dtype": str(group.attrs["dtype"]),
            "backbone": meta.get("backbone"),
            "input_size": meta.get("input_size"),
            "layer": meta.get("layer"),
            "pooling": meta.get("pooling"),
            "weights": (meta.get("weights") or {}).get("source"),
            "resize": str(group.attrs.get("resize", meta.get("resize") or RESIZE_DEFAULT)),
            "resize_filter": str(group.attrs.get("resize_filter", recorded_resize_filter(meta))),
            "colour": str(group.attrs.get("colour", recorded_colour(meta))),
            "model_key": meta.get("key"),
            "tta": meta.get("tta", "none"),
            "extraction": json.loads(group.attrs.get("extraction", "null")),
        }
        if embeddings:
            bad = _nonfinite(group, images, path)
            feature_sets[key] |= {"nonfinite_rows": len(bad), "nonfinite": bad}
        if "augmented" in f and key in f["augmented"]:
            views = f["augmented"][key]
            feature_sets[key]["augmented"] = {
                "rows": int(views.attrs["count"]),
                "views": int(views.attrs["views"]),
                "seed": int(views.attrs["seed"]),
            }
    nf = int(failures.attrs["count"])
    failure_sources = _committed(failures["source"], nf, path)
    stages = _text(_committed(failures["stage"], nf, path))
    conflicts = _read_conflicts(f, path)
    name = lambda i: sources[i] if 0 <= i < len(sources) else None  # noqa: E731
    in_conflict = np.zeros(n, dtype=bool)
    in_conflict[[c["row"] for c in conflicts if c["row"] < n]] = True
    counted = np.where(in_conflict, -2, labels)[present]  # a row in conflict has no label to count
    gone_rows = np.flatnonzero(~present)
    return {
        "path": str(path),
        "version": int(f.attrs["tlpipe_cache_version"]),
        "cache_id": str(f.attrs["cache_id"]),
        "images": int(present.sum()),  # rows whose source file is there (as the last extract of its source found)
        "class_names": class_names,
        "per_class": {c: int(np.sum(counted == i)) for i, c in enumerate(class_names)}
        | ({"(unlabelled)": int(np.sum(counted == -1))} if np.any(counted == -1) else {})
        | ({"(label conflict)": int(np.sum(counted == -2))} if np.any(counted == -2) else {}),
        "per_split": {s or "(none)": int(np.sum(splits[present] == s)) for s in sorted(set(splits[present].tolist()))},
        "missing": [
            {"path": p, "reason": MISSING_REASONS.get(int(m), "gone"), "source": name(int(src))}
            for p, m, src in zip(
                read_paths(images, gone_rows, path), missing[gone_rows].tolist(), row_sources[gone_rows].tolist()
            )
        ],
        "feature_sets": feature_sets,
        "failures": [
            {"path": p, "reason": r, "stage": st, "source": name(int(src))}
            for p, r, st, src in zip(
                read_paths(failures, None, path),
                _text(_committed(failures["reason"], nf, path)),
                stages,
                failure_sources.tolist(),
            )
        ],
        "sources": [{"path": src, "images": int(np.sum(row_sources[present] == i))} for i, src in enumerate(sources)],
        "label_conflicts": [
            {
                "sha256": c["sha256"],
                "occurrences": [
                    o
                    | {
                        "source": name(o["source"]),
                        "path": display_name(o["path"]),
                        "label": display_name(o["label"]) if o.get("label") else o.get("label"),
                    }
                    for o in c["occurrences"]
                ],
            }
            for c in conflicts
        ],
    }


class FeatureSetReader:
    """One feature set of a cache, read in pieces: lookup by sha256 and batch iteration.

    Only the sha256 -> position index is held in memory; embeddings are read per call, each read opening
    the cache afresh through :func:`read_retrying` (committed rows only), so a reader may run while an
    extract appends. Scoring reads caches only through this class.

    Parameters
    ----------
    path : path
        The cache.
    key : str
        The feature set (exact key).
    model_sha256 : str, optional
        The backbone model the caller's embeddings came from; a feature set recorded as made by another
        model is refused.

    Attributes
    ----------
    labelled : bool
        Whether the cache has a labelled image.

    Raises
    ------
    CacheError
        No such feature set, made by another model, or a damaged file.
    """

    def __init__(self, path: str | os.PathLike, key: str | None, model_sha256: str | None = None):
        self.path, self.key = Path(path), key

        def read(f: h5py.File) -> tuple[np.ndarray, list[str], bool]:
            features = f["features"]
            if key not in features:
                raise CacheError(f"{path} holds no feature set {key}; it holds: {', '.join(features) or 'none'}")
            group, images = features[key], f["images"]
            made_by = json.loads(group.attrs.get("metadata", "{}")).get("model_sha256")
            if model_sha256 and made_by and made_by != model_sha256:
                raise CacheError(
                    f"{path}: feature set {key} was made by backbone model {made_by[:12]}, the head's "
                    f"embeddings by {model_sha256[:12]}"
                )
            count, n_images = int(group.attrs["count"]), int(images.attrs["count"])
            rows = _committed(group["image_row"], count, path)
            if count and rows.max() >= n_images:
                raise _Torn(f"{path}: feature set {key} points past the image table; the file is damaged")
            shas = _committed(images["sha256"], n_images, path)
            labelled = bool((_committed(images["label"], n_images, path) >= 0).any())
            return rows, [shas[row].decode() for row in rows.tolist()], labelled

        self.image_rows, shas, self.labelled = read_retrying(path, read)
        self.index: dict[str, int] = {sha: i for i, sha in enumerate(shas)}

    def __len__(self) -> int:
        return len(self.image_rows)

    def __contains__(self, sha256: object) -> bool:
        return sha256 in self.index

    def get(self, sha256s: list[str]) -> np.ndarray:
        """Embeddings for content hashes the feature set holds.

        Parameters
        ----------
        sha256s : list of str
            Hex digests, each in the feature set (repeats allowed).

        Returns
        -------
        numpy.ndarray
            (len(sha256s), D) float32, in the order asked.

        Raises
        ------
        KeyError
            A digest the feature set does not hold.
        """
        if not sha256s:
            return np.empty((0, 0), np.float32)
        rows, inverse = np.unique([self.index[s] for s in sha256s], return_inverse=True)
        embeddings = read_retrying(self.path, lambda f: f["features"][self.key]["embeddings"][rows])
        return embeddings[inverse].astype(np.float32, copy=False)

    def batches(self, batch_size: int) -> Iterator[tuple[list[str], list[str], list[str | None], list[str]]]:
        """The committed rows in cache order, ``batch_size`` at a time (one retried read each).

        Yields
        ------
        tuple
            (paths, sha256s, labels: class name or None, sources: the folder or manifest each path is relative to,
            "" when not recorded), one entry per row.
        """
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            rows, inverse = np.unique(self.image_rows[start:stop], return_inverse=True)

            def read(f: h5py.File, rows=rows, inverse=inverse) -> tuple[list, list, list, list]:
                images = f["images"]
                names = _class_names(images)
                roots = json.loads(f.attrs.get("sources", "[]"))
                paths = read_paths(images, rows[inverse], self.path)
                shas = [s.decode() for s in images["sha256"][rows][inverse]]
                labels = [names[i] if 0 <= i < len(names) else None for i in images["label"][rows][inverse].tolist()]
                sources = [roots[i] if 0 <= i < len(roots) else "" for i in images["source"][rows][inverse].tolist()]
                return paths, shas, labels, sources

            yield read_retrying(self.path, read)


# -- the cache in other tools ------------------------------------------------------------------------------
def to_pandas(path: str | os.PathLike, features: str | None = None):
    """One feature set of a cache as a pandas DataFrame, one row per embedded image.

    Parameters
    ----------
    path : path-like
        The HDF5 cache.
    features : str, optional
        Feature set key (or unique prefix); may be omitted when the cache holds one.

    Returns
    -------
    pandas.DataFrame
        Columns ``path`` (relative to its source), ``source`` (only when the cache records per-image
        sources), ``label`` (class name, None when unlabelled), ``split`` (None when not given), ``sha256``
        (hex of the file's bytes) and ``embedding`` (a float32 numpy array of shape (D,) per row), in the
        cache's row order. ``DataFrame.attrs`` holds ``feature_set``, ``class_names`` and ``cache_id``.

    Raises
    ------
    MissingExtra
        pandas is not installed (``pip install 'tlpipe[pandas]'``).
    CacheError
        No such cache or feature set.
    """
    try:
        import pandas as pd
    except ImportError as exc:
        from tlpipe.backbones.deps import MissingExtra

        raise MissingExtra(
            f"to_pandas needs pandas, which is not installed: pip install 'tlpipe[pandas]' ({exc})"
        ) from exc
    fs = read_feature_set(path, features)
    names = np.array([*fs.class_names, None], dtype=object)
    columns: dict[str, Any] = {"path": fs.paths.astype(object)}
    if fs.source is not None:  # the source (folder or manifest) each path is relative to
        columns["source"] = [fs.source_of(row) for row in range(len(fs))]
    columns |= {
        "label": names[fs.y],
        "split": [s or None for s in fs.split.tolist()],
        "sha256": fs.sha256.astype(object),
        "embedding": list(fs.X),
    }
    frame = pd.DataFrame(columns)
    frame.attrs.update(feature_set=fs.key, class_names=fs.class_names, cache_id=fs.cache_id)
    return frame


EXPORT_FORMATS = ("parquet", "npz")


def export_cache(
    path: str | os.PathLike, out: str | os.PathLike, fmt: str | None = None, features: str | None = None
) -> dict:
    """Write one feature set of a cache as Parquet or NumPy ``.npz``, for tools that do not read HDF5.

    Parameters
    ----------
    path : path-like
        The HDF5 cache.
    out : path-like
        The file to write (replaced atomically if it exists).
    fmt : {"parquet", "npz"}, optional
        Default: from ``out``'s extension.
    features : str, optional
        Feature set key (or unique prefix).

    Returns
    -------
    dict
        ``out``, ``format``, ``feature_set``, ``rows``, ``dim``.

    Notes
    -----
    Parquet: columns ``path``, ``source`` (the folder or manifest the path is relative to), ``label``, ``split``,
    ``sha256`` (strings, null when absent) and ``embedding``
    (fixed-size list of float32, length D); the key and class names in the schema metadata.
    ``pandas.read_parquet`` reads it. One writer at a time, whatever name reaches ``out`` (:func:`writing`: another
    one is refused with :class:`CacheLockedError`). npz: arrays ``embeddings`` (N, D) float32, ``label`` (N,) int32
    index into ``class_names`` (-1 unlabelled), ``path``, ``split``, ``sha256``, ``class_names`` (unicode
    arrays, no pickles: ``numpy.load(out)`` needs no ``allow_pickle``) and ``feature_set``.
    """
    out = Path(out)
    fmt = (fmt or out.suffix.lstrip(".")).lower()
    if fmt not in EXPORT_FORMATS:
        raise InputError(
            f"export format must be one of {', '.join(EXPORT_FORMATS)} (or an --out ending in one), not {fmt!r}"
        )
    with writing(out):  # one writer of ``out``, whatever name reaches it
        return _export(path, out, fmt, features)


def _export(path: str | os.PathLike, out: Path, fmt: str, features: str | None) -> dict:
    fs = read_feature_set(path, features)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if fmt == "npz":
            with open(tmp, "wb") as fh:
                np.savez(
                    fh,
                    embeddings=fs.X,
                    label=fs.y.astype(np.int32),
                    path=fs.paths.astype(str),
                    split=fs.split.astype(str),
                    sha256=fs.sha256.astype(str),
                    class_names=np.array(fs.class_names, dtype=str),
                    feature_set=np.array(fs.key),
                )
        else:
            try:
                import pyarrow as pa
                import pyarrow.parquet as pq
            except ImportError as exc:
                from tlpipe.backbones.deps import MissingExtra

                raise MissingExtra(
                    f"Parquet needs pyarrow, which is not installed: pip install 'tlpipe[parquet]' "
                    f"(or export --format npz) ({exc})"
                ) from exc
            dim = fs.X.shape[1] if fs.X.ndim == 2 else 0
            names = [*fs.class_names, None]
            columns = {"path": pa.array(fs.paths.tolist(), pa.string())}
            if fs.source is not None:
                columns["source"] = pa.array([fs.source_of(row) for row in range(len(fs))], pa.string())
            table = pa.table(
                columns
                | {
                    "label": pa.array([names[i] for i in fs.y.tolist()], pa.string()),
                    "split": pa.array([s or None for s in fs.split.tolist()], pa.string()),
                    "sha256": pa.array(fs.sha256.tolist(), pa.string()),
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(fs.X.reshape(-1), pa.float32()), dim),
                }
            ).replace_schema_metadata(
                {
                    "tlpipe.feature_set": fs.key,
                    "tlpipe.class_names": json.dumps(fs.class_names),
                    "tlpipe.cache_id": fs.cache_id,
                }
            )
            pq.write_table(table, tmp)
        os.replace(tmp, out)
    except OSError as exc:
        raise CacheError(f"cannot write {out}: {exc.strerror or exc}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"out": str(out), "format": fmt, "feature_set": fs.key, "rows": len(fs), "dim": int(fs.X.shape[1])}
