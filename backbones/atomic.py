"""Atomic writes, the one home for them: a file or a folder is written beside its target, made durable,
and renamed into place, so a kill or a full disk never leaves a half-written artifact that looks valid."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = ["atomic_file", "atomic_folder", "atomic_write", "fsync_file"]


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush ``path``'s content to disk.

    Raises
    ------
    OSError
        It cannot be opened or synced.
    """
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path``; on a clean exit it is synced and renamed onto ``path``.

    Parameters
    ----------
    path : path
        The final file.

    Yields
    ------
    pathlib.Path
        Where to write (in the same folder, hidden); removed if the block raises.

    Raises
    ------
    OSError
        Creating, syncing or renaming failed (the target is then unchanged).
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike[str], data: bytes | str | Callable[[IO[bytes]], object]) -> None:
    """Replace ``path`` with ``data`` (bytes, text as UTF-8, or a function writing to a binary file) atomically.

    Raises
    ------
    OSError
        As for :func:`atomic_file`.
    """
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        if callable(data):
            data(fh)
        else:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)


@contextmanager
def atomic_folder(path: str | os.PathLike[str], *, keep_existing: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``path``; on a clean exit its files are synced and it is renamed to ``path``.

    Parameters
    ----------
    path : path
        The final folder (its parent is created).
    keep_existing : bool
        When ``path`` appears meanwhile (another process won the race), keep theirs instead of failing.

    Yields
    ------
    pathlib.Path
        The folder to fill; removed if the block raises or the rename lost the race.

    Raises
    ------
    OSError
        The rename failed (and ``path`` does not exist, or ``keep_existing`` is False).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        tmp.chmod(0o755)
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                fsync_file(file)
        try:
            os.rename(tmp, path)
        except OSError:
            if not (keep_existing and path.exists()):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
