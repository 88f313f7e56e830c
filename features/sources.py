"""Work out which images a user means: a folder tree or a CSV manifest."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePath

from .images import IMAGE_EXTENSIONS

SPLIT_ALIASES: dict[str, str] = {
    alias: split
    for split, aliases in {
        "train": ("train", "training", "training_set", "trainset"),
        "val": ("val", "valid", "validation", "dev"),
        "test": ("test", "testing", "test_set", "testset"),
    }.items()
    for alias in aliases
}
SPLITS = frozenset(SPLIT_ALIASES.values())
PATH_COLUMNS = ("path", "file", "filename", "image", "filepath")
LABEL_COLUMNS = ("label", "class", "cls", "category")
SPLIT_COLUMN = "split"
_ESCAPES = "path escapes the data root (use allow_outside_root)"


def normalize_split(name: str) -> str:
    """Map a split name to train/val/test where it is a known alias, else lower-case it."""
    key = name.strip().lower()
    return SPLIT_ALIASES.get(key, key)


@dataclass(frozen=True)
class ImageRecord:
    """One image: ``relpath`` (POSIX, relative to the source root) is its identity."""

    relpath: str
    abspath: str
    label: str | None
    split: str | None


@dataclass
class ImageSource:
    """The images found under ``root``, how they were laid out, and what was refused."""

    root: str
    layout: str  # "class_folders" | "split_folders" | "flat" | "manifest"
    records: list[ImageRecord]
    class_names: list[str]
    skipped: list[tuple[str, str]]

    @cached_property
    def _label_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.class_names)}

    def labels_index(self, record: ImageRecord) -> int:
        """Index of ``record.label`` in ``class_names``; -1 when unlabelled."""
        return -1 if record.label is None else self._label_index[record.label]


def discover(source: str | os.PathLike[str], *, allow_outside_root: bool = False) -> ImageSource:
    """Find the images of a directory (class, split or flat layout) or a ``.csv`` manifest.

    Directories: when every immediate subdirectory holding images is a split name (train, val,
    test or an alias), the layout is ``split_folders`` and each split holds class folders or
    bare (unlabelled) images; otherwise subdirectories holding images are class folders;
    otherwise the images are ``flat`` and unlabelled. Hidden entries are ignored; symlinks are
    followed once. Manifests: see :func:`_read_manifest`. Existence of the listed files is not
    checked; the decoder reports those.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"image source not found: {path}")
    if path.is_dir():
        return _discover_dir(path)
    if path.suffix.lower() == ".csv":
        return _read_manifest(path, allow_outside_root)
    raise ValueError(f"{path} is neither a directory nor a .csv manifest")


def _discover_dir(path: Path) -> ImageSource:
    root = os.path.abspath(path)
    files, skipped = _walk(root)
    images = []
    for parts, abspath in files:
        ext = os.path.splitext(parts[-1])[1].lower()
        if ext in IMAGE_EXTENSIONS:
            images.append((parts, abspath))
        else:
            skipped.append(("/".join(parts), f"not an image file ({ext or 'no extension'})"))
    top = sorted({parts[0] for parts, _ in images if len(parts) > 1})
    records: list[ImageRecord] = []
    if top and all(normalize_split(name) in SPLITS for name in top):
        layout = "split_folders"
        for parts, _ in images:
            if len(parts) == 1:
                skipped.append((parts[0], "outside the split folders"))
        for name in top:
            group = [item for item in images if len(item[0]) > 1 and item[0][0] == name]
            _assign(group, 1, normalize_split(name), records, skipped)
    else:
        layout = "class_folders" if top else "flat"
        _assign(images, 0, None, records, skipped)
    records.sort(key=lambda r: r.relpath)
    skipped.sort()
    class_names = sorted({r.label for r in records if r.label is not None})
    return ImageSource(root, layout, records, class_names, skipped)


def _walk(root: str) -> tuple[list[tuple[tuple[str, ...], str]], list[tuple[str, str]]]:
    """All non-hidden files under ``root`` as (path parts, path), following symlinks once."""
    files: list[tuple[tuple[str, ...], str]] = []
    skipped: list[tuple[str, str]] = []
    visited: set[str] = set()
    stack: list[tuple[str, tuple[str, ...]]] = [(root, ())]
    while stack:
        directory, parts = stack.pop()
        real = os.path.realpath(directory)
        if real in visited:
            skipped.append(("/".join(parts), "directory already visited (symlink loop)"))
            continue
        visited.add(real)
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            skipped.append(("/".join(parts) or ".", f"cannot list directory: {exc.strerror}"))
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            sub = (*parts, entry.name)
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()
            except OSError as exc:  # e.g. a symbolic link to itself (ELOOP)
                skipped.append(("/".join(sub), f"cannot follow: {exc.strerror}"))
                continue
            if is_dir:
                subdirs.append((entry.path, sub))
            elif is_file:
                files.append((sub, entry.path))
            elif entry.is_symlink():
                skipped.append(("/".join(sub), "broken symbolic link"))
            else:
                skipped.append(("/".join(sub), "not a regular file"))
        stack.extend(reversed(subdirs))
    return files, skipped


def _assign(
    images: list[tuple[tuple[str, ...], str]],
    depth: int,
    split: str | None,
    records: list[ImageRecord],
    skipped: list[tuple[str, str]],
) -> None:
    """Label images by their folder at ``depth`` if any sits in one, else leave them unlabelled."""
    labelled = any(len(parts) > depth + 1 for parts, _ in images)
    for parts, abspath in images:
        relpath = "/".join(parts)
        if not labelled:
            records.append(ImageRecord(relpath, abspath, None, split))
        elif len(parts) > depth + 1:
            records.append(ImageRecord(relpath, abspath, parts[depth], split))
        else:
            skipped.append((relpath, "outside the class folders"))


def _read_manifest(csv_path: Path, allow_outside_root: bool) -> ImageSource:
    """Read a CSV with a header row; rows keep their file order.

    The path column is the first of PATH_COLUMNS present (case-insensitive), the label column
    the first of LABEL_COLUMNS, the split column ``split``; other columns are ignored. Relative
    paths are relative to the CSV's directory; paths leaving it are refused unless
    ``allow_outside_root``. The CSV is UTF-8; other bytes are kept as they are (surrogate escapes),
    so a name that is not UTF-8 still names its file. A path with a NUL byte is refused.
    """
    root = os.path.dirname(os.path.abspath(csv_path))
    records: list[ImageRecord] = []
    skipped: list[tuple[str, str]] = []
    seen: set[str] = set()
    with open(csv_path, newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
        rows = csv.reader(fh)
        header = next(rows, None)
        if header is None:
            raise ValueError(f"{csv_path}: empty manifest, a header row is required")
        columns: dict[str, int] = {}
        for i, name in enumerate(header):
            columns.setdefault(name.strip().lower(), i)
        path_col = next((columns[c] for c in PATH_COLUMNS if c in columns), None)
        if path_col is None:
            raise ValueError(
                f"{csv_path}: no path column; name one of {', '.join(PATH_COLUMNS)} "
                f"(found: {', '.join(header)})"
            )
        label_col = next((columns[c] for c in LABEL_COLUMNS if c in columns), None)
        split_col = columns.get(SPLIT_COLUMN)
        for row in rows:
            value = _cell(row, path_col)
            if not value:
                if any(cell.strip() for cell in row):
                    skipped.append((f"line {rows.line_num}", "empty path"))
                continue
            if "\0" in value:
                skipped.append((f"line {rows.line_num}", "path contains a NUL byte"))
                continue
            abspath = os.path.normpath(os.path.join(root, value))
            inside = os.path.relpath(abspath, root)
            if inside == os.pardir or inside.startswith(os.pardir + os.sep):
                if not allow_outside_root:
                    skipped.append((value, _ESCAPES))
                    continue
                relpath = PurePath(os.path.normpath(value)).as_posix()
            else:
                relpath = PurePath(inside).as_posix()
            ext = os.path.splitext(relpath)[1].lower()
            if ext not in IMAGE_EXTENSIONS:
                skipped.append((relpath, f"not an image file ({ext or 'no extension'})"))
            elif relpath in seen:
                skipped.append((relpath, f"listed again on line {rows.line_num}"))
            else:
                seen.add(relpath)
                split = _cell(row, split_col)
                records.append(
                    ImageRecord(
                        relpath,
                        abspath,
                        _cell(row, label_col) or None,
                        normalize_split(split) if split else None,
                    )
                )
    class_names = sorted({r.label for r in records if r.label is not None})
    return ImageSource(root, "manifest", records, class_names, skipped)


def _cell(row: list[str], index: int | None) -> str:
    return row[index].strip() if index is not None and index < len(row) else ""
