"""Finding and drawing a cached image for a report: the one resolver and the one contact-sheet cell.

A cached row records its path relative to its source (a folder, or a CSV manifest's folder:
:func:`tlpipe.features.cache.source_root`); :func:`resolve_image` turns it back into the file on disk and
checks that the file still holds the bytes that were embedded, so a report never shows another picture
under a row's name.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

__all__ = ["resolve_image", "row_thumbnail"]


def _sha256(path: Path, block: int = 1 << 20) -> str:
    """The file's sha256, read in blocks (a huge file is never held whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_image(path: str, root: str | None, sha256: str | None = None) -> tuple[Path | None, str]:
    """The file behind a cached row, or None and the reason it cannot be shown.

    Parameters
    ----------
    path : str
        The row's cached path (relative to ``root``; an absolute path is taken as is).
    root : str or None
        The folder the path is relative to (:meth:`tlpipe.features.cache.FeatureSet.source_root_of`);
        None or "" tries ``path`` as given.
    sha256 : str, optional
        The row's content hash: a file whose bytes differ is refused ("changed since extraction").

    Returns
    -------
    tuple of (pathlib.Path or None, str)
        The file and "", or None and a short reason ("not found under R", "file changed since extraction",
        "cannot read: ...").
    """
    from tlpipe.features.names import file_name

    # the path as the cache shows it, then as the file system has it (names that are not UTF-8)
    names = list(dict.fromkeys((path, file_name(path))))
    found = [Path(n) if os.path.isabs(n) or not root else Path(root) / n for n in names]
    candidate = next((c for c in found if c.is_file()), None)
    if candidate is None:
        return None, f"not found under {root or 'the working folder'}"
    if sha256:
        try:
            digest = _sha256(candidate)
        except OSError as exc:
            return None, f"cannot read: {exc.strerror}"
        if digest != sha256:
            return None, "file changed since extraction"
    return candidate, ""


def row_thumbnail(path: str, root: str | None, sha256: str | None, size: int) -> tuple[np.ndarray | None, str]:
    """A cached row's image as a (size, size, 3) uint8 RGB square (centre crop), or None and why not.

    Read by :func:`tlpipe.features.images.read_image_file` (size and header first) and decoded by tlpipe's own
    decoder (:func:`tlpipe.features.images.decode_image`: EXIF orientation, colour profile rendered to sRGB,
    damaged data refused), so a thumbnail shows what the backbone saw.
    """
    from tlpipe.features.images import ImageError, decode_image, read_image_file

    found, reason = resolve_image(path, root, sha256)
    if found is None:
        return None, reason
    try:
        return decode_image(read_image_file(found), size, "crop")[0], ""
    except ImageError as exc:
        return None, exc.reason
    except OSError as exc:
        return None, f"cannot read: {exc.strerror}"
