"""Names as the file system gives them and as tlpipe shows them: the one definition of split-folder names, and the
display form of names that are not UTF-8.

Nothing heavy is imported here: the cache reader, the heads and the CLI use it.

Split names. :data:`SPLIT_ALIASES` maps every split name tlpipe knows (case, ``-`` and spaces aside) to
``train``, ``val`` or ``test``, each alias to exactly one of them. ``extract`` stores the mapped name of a split
folder or a manifest's ``split`` cell, and :func:`tlpipe.features.cache.read_feature_set` maps the split column
again when reading (so caches written before an alias was known read the same), so ``fit-head``, ``compare``,
``evaluate`` and ``audit`` see exactly the split names ``extract`` recognised.

Bytes in names. On POSIX a file name is bytes; Python gives the bytes that are not UTF-8 as surrogate escapes
(``os.fsdecode(b"caf\\xe9") == "caf\\udce9"``). Paths keep them (the cache stores the raw bytes, see
:mod:`tlpipe.features.cache`), so a name still opens its file. Anything written for people or for other programs
(class names, reports, JSON, Parquet, CSV) uses :func:`display_name`: the undecodable bytes as backslash escapes
(``caf\\xe9``), always valid UTF-8.
"""

from __future__ import annotations

import re

__all__ = ["SPLITS", "SPLIT_ALIASES", "display_name", "file_name", "normalize_split"]

_SPLITS: dict[str, tuple[str, ...]] = {
    "train": (
        "train",
        "training",
        "train_data",
        "training_data",
        "train_set",
        "training_set",
        "trainset",
        "train_images",
        "training_images",
        "trn",
    ),
    "val": (
        "val",
        "valid",
        "validation",
        "val_data",
        "valid_data",
        "validation_data",
        "val_set",
        "valid_set",
        "validation_set",
        "valset",
        "validset",
        "val_images",
        "validation_images",
        "dev",
    ),
    "test": (
        "test",
        "testing",
        "test_data",
        "testing_data",
        "test_set",
        "testing_set",
        "testset",
        "test_images",
        "testing_images",
        "tst",
    ),
}
SPLIT_ALIASES: dict[str, str] = {alias: split for split, aliases in _SPLITS.items() for alias in aliases}
"""Every known split name (lower case, ``_`` for ``-`` and spaces) -> ``train`` | ``val`` | ``test``."""
assert len(SPLIT_ALIASES) == sum(map(len, _SPLITS.values())), "a split alias is mapped twice"
SPLITS = frozenset(_SPLITS)


def normalize_split(name: str) -> str:
    """A split name as tlpipe uses it: ``train`` | ``val`` | ``test`` for a known alias (:data:`SPLIT_ALIASES`:
    case, surrounding spaces, ``-`` and inner spaces do not matter), else the name in lower case (display form).

    Parameters
    ----------
    name : str
        A split folder's name or a manifest's ``split`` cell.

    Returns
    -------
    str
    """
    key = display_name(name).strip().lower()
    return SPLIT_ALIASES.get(key.replace("-", "_").replace(" ", "_"), key)


def display_name(name: str) -> str:
    """``name`` as valid UTF-8 text: bytes that were not UTF-8 (surrogate escapes) as backslash escapes.

    ``display_name(os.fsdecode(b"caf\\xe9")) == "caf\\\\xe9"``: what :func:`os.fsencode` would give, shown as the
    ``bytes`` literal shows it. Any valid string is returned as it is.

    Parameters
    ----------
    name : str

    Returns
    -------
    str
        Encodable as UTF-8 (strict).
    """
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        pass
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that did not come from a byte (e.g. a JSON "\\ud800")
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


_ESCAPED_BYTE = re.compile(r"\\x([89a-f][0-9a-f])")


def file_name(shown: str) -> str:
    """The file-system name a display form (:func:`display_name`) stands for: ``\\xNN`` escapes of bytes
    0x80-0xff back to surrogate escapes, so ``open(os.path.join(root, file_name(path)))`` finds the file.

    A name that really holds a backslash followed by ``x`` and two hex digits reads differently: callers that
    look for a file try ``shown`` itself first.

    Parameters
    ----------
    shown : str

    Returns
    -------
    str
    """
    if "\\x" not in shown:
        return shown
    return _ESCAPED_BYTE.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), shown)
