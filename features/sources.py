"""Work out which images a user means: a folder tree or a CSV manifest."""

from __future__ import annotations

import codecs
import csv
import io
import os
import unicodedata
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePath

from tlpipe.errors import InputError, NotFoundError, TlpipeError

from .images import IMAGE_EXTENSIONS, sniff_image
from .names import SPLIT_ALIASES, SPLITS, display_name, normalize_split

__all__ = [
    "SPLITS",
    "SPLIT_ALIASES",
    "ImageRecord",
    "ImageSource",
    "LayoutError",
    "discover",
    "display_name",
    "normalize_split",
]

__all__ = [
    "ImageRecord",
    "ImageSource",
    "LABEL_COLUMNS",
    "LayoutError",
    "PATH_COLUMNS",
    "SPLITS",
    "SPLIT_ALIASES",
    "SPLIT_COLUMN",
    "discover",
    "normalize_split",
]
PATH_COLUMNS = ("path", "file", "filename", "image", "filepath")
LABEL_COLUMNS = ("label", "class", "cls", "category")
SPLIT_COLUMN = "split"
_ESCAPES = "path escapes the data root (use --allow-outside-root / allow_outside_root)"


class LayoutError(TlpipeError, ValueError):
    """A folder whose layout cannot be told apart (which folders are classes, which are splits)."""


@dataclass(frozen=True)
class ImageRecord:
    """One image: ``relpath`` (POSIX, relative to the source root) is its identity.

    ``relpath`` and ``abspath`` keep a name's bytes that are not UTF-8 as surrogate escapes (they open the file);
    ``label`` and ``split`` are names for people, in display form (:func:`tlpipe.features.names.display_name`:
    such bytes as backslash escapes)."""

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
    warnings: list[str] = field(default_factory=list)  # things the user must hear about (printed by the CLI)

    @cached_property
    def _label_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.class_names)}

    def labels_index(self, record: ImageRecord) -> int:
        """Index of ``record.label`` in ``class_names``; -1 when unlabelled."""
        return -1 if record.label is None else self._label_index[record.label]


def discover(source: str | os.PathLike[str], *, allow_outside_root: bool = False, labelled: bool = True) -> ImageSource:
    """Find the images of a directory or a ``.csv`` manifest, and what they are labelled.

    Parameters
    ----------
    source : str or path
        A folder or a CSV manifest.
    allow_outside_root : bool
        Accept manifest paths that are absolute or leave the manifest's folder with ``..``.
    labelled : bool
        False when labels do not matter (scoring): a folder's images are all listed, unlabelled, whatever its
        layout, and no layout is refused as ambiguous.

    Returns
    -------
    ImageSource
        Records (relative path, absolute path, label, split), class names, skipped inputs with their
        reasons, and warnings (a single class, refused manifest paths, a manifest that is not UTF-8).

    Raises
    ------
    FileNotFoundError
        ``source`` does not exist.
    LayoutError
        A folder whose layout is ambiguous; the message says what was found and suggests a manifest.
    ValueError
        Not a folder or ``.csv``; a manifest without a path column.

    Notes
    -----
    Folders are read by structure, not by folder names alone (:func:`_layout`): a single wrapper folder
    is seen through; folders whose children are the same class folders as their siblings' children are
    split folders (whatever their names), and a folder of bare images beside them is an unlabelled
    split; folders of bare images are classes; a folder of bare images only is ``flat`` (unlabelled).
    Files are images by extension or, failing that, by content. Hidden entries are ignored. Symbolic links to
    folders are followed once, after every real folder is listed: a link to a folder the tree lists under its
    own name (an alias, ``Kitties -> cats``) is not followed (skipped and warned by name, so the images keep the
    real folder's label whatever the names' sort order), and a link to a folder that holds it is a loop (skipped).
    A folder of bare images named like a split (``train`` beside ``bus``, ``car``) is a class, with a warning;
    folders are split folders when they hold class folders, or when every folder is named like a split.
    Class and split names are in display form (:func:`tlpipe.features.names.display_name`); paths keep their
    bytes. Manifests: see :func:`_read_manifest`.
    """
    path = Path(source)
    if not path.exists():
        raise NotFoundError(f"image source not found: {path}")
    if path.is_dir():
        images = _discover_dir(path, labelled)
    elif path.suffix.lower() == ".csv":
        images = _read_manifest(path, allow_outside_root)
    else:
        raise InputError(f"{path} is neither a directory nor a .csv manifest")
    if len(images.class_names) == 1:
        images.warnings.append(
            f"{path} yields a single class ({images.class_names[0]!r}): a classifier needs two or "
            "more; is the folder one level too deep, or is a manifest needed?"
        )
    return images


def _discover_dir(path: Path, labelled: bool = True) -> ImageSource:
    root = os.path.abspath(path)
    files, skipped, warnings = _walk(root)
    images = []
    for parts, abspath in files:
        ext = os.path.splitext(parts[-1])[1].lower()
        if ext in IMAGE_EXTENSIONS or sniff_image(abspath):
            images.append((parts, abspath))
        else:
            skipped.append(("/".join(parts), f"not an image file ({ext or 'no extension'})"))
    records: list[ImageRecord] = []
    if not labelled:
        records = sorted(
            (ImageRecord("/".join(parts), abspath, None, None) for parts, abspath in images), key=lambda r: r.relpath
        )
        return ImageSource(root, "flat", records, [], sorted(skipped), warnings)
    layout, base, splits = _layout(images, path, warnings)
    if layout == "split_folders":
        for parts, _ in images:
            if len(parts) <= base + 1:
                skipped.append(("/".join(parts), "outside the split folders"))
        for name, labelled in splits.items():
            group = [item for item in images if len(item[0]) > base + 1 and item[0][base] == name]
            _assign(group, base + 1, normalize_split(name), records, skipped, labelled)
    else:
        _assign([item for item in images if len(item[0]) > base], base, None, records, skipped)
    records.sort(key=lambda r: r.relpath)
    skipped.sort()
    class_names = sorted({r.label for r in records if r.label is not None})
    return ImageSource(root, layout, records, class_names, skipped, warnings)


def _layout(
    images: list[tuple[tuple[str, ...], str]], path: Path, warnings: list[str] | None = None
) -> tuple[str, int, dict[str, bool]]:
    """(layout, depth of the folder that holds the classes or splits, {split folder: labelled}); what the user
    must hear about the reading is appended to ``warnings``.

    Raises :class:`LayoutError` when the structure does not say which folders are classes."""
    base = 0
    while True:  # see through single wrapper folders (no images of their own, one sub-folder)
        here = [parts for parts, _ in images if len(parts) > base]
        below = {parts[base] for parts in here if len(parts) > base + 1}
        if (
            len(below) == 1
            and all(len(parts) > base + 1 for parts in here)
            and any(len(parts) > base + 2 for parts in here)
        ):
            base += 1
            continue
        break
    here = [parts for parts, _ in images if len(parts) > base]
    children = sorted({parts[base] for parts in here if len(parts) > base + 1})
    if not children:
        return "flat", base, {}
    # A child "groups" when images sit in folders below it: its class set is those folders.
    classes = {c: frozenset(p[base + 1] for p in here if len(p) > base + 2 and p[base] == c) for c in children}
    loose = {p[base] for p in here if len(p) == base + 2}
    # A folder with images of its own beside sub-folders is a class folder with nested folders, unless it is
    # named like a split (test_set/x.jpg beside test_set/cats/).
    grouping = [c for c in children if classes[c] and (c not in loose or normalize_split(c) in SPLITS)]
    bare = [c for c in children if c not in grouping]
    if not grouping:
        aliases = [c for c in children if normalize_split(c) in SPLITS and not classes[c]]
        if not aliases:
            return "class_folders", base, {}
        if len(aliases) == len(children):
            return "split_folders", base, {c: False for c in children}
        # No folder holds class folders, so none is a split: a class may be called train (VOC's bus/car/train).
        if warnings is not None:
            named = ", ".join(repr(display_name(c)) for c in aliases)
            warnings.append(
                f"{path}: class folder{'s' if len(aliases) > 1 else ''} {named} named like a split "
                f"{'are' if len(aliases) > 1 else 'is'} read as {'classes' if len(aliases) > 1 else 'a class'} "
                "(no folder holds class folders, so there are no split folders)"
            )
        return "class_folders", base, {}
    sets = [classes[c] for c in grouping]
    same_classes = len(grouping) >= 2 and all(s == sets[0] for s in sets)
    named_splits = all(normalize_split(c) in SPLITS for c in grouping)
    if same_classes or named_splits:
        return "split_folders", base, {c: c in grouping for c in children}
    found = "; ".join(f"{c}/ holds folders {', '.join(sorted(classes[c])[:4])}" for c in grouping[:3])
    if bare:
        found += f"; {', '.join(c + '/' for c in bare[:3])} hold{'s' if len(bare) == 1 else ''} bare images"
    raise LayoutError(_ambiguous(path, found))


def _ambiguous(path: Path, found: str) -> str:
    return (
        f"cannot tell which folders of {path} are classes and which are splits ({found}); "
        "list the images in a CSV manifest with columns path,label[,split] and pass that instead"
    )


def _walk(root: str) -> tuple[list[tuple[tuple[str, ...], str]], list[tuple[str, str]], list[str]]:
    """All non-hidden files under ``root`` as (path parts, path), the entries skipped with their reasons, and
    warnings.

    Real folders are listed first (depth first); symbolic links to folders wait until then, so that a link to a
    folder the tree holds under its own name (an alias) is recognised whatever the names' sort order, and is
    skipped rather than taking that folder's images. A link to a folder that holds the link (``loop -> ..``) is
    a loop. A link to a folder not listed otherwise (outside the tree, or hidden) is followed once."""
    files: list[tuple[tuple[str, ...], str]] = []
    skipped: list[tuple[str, str]] = []
    warnings: list[str] = []
    listed: dict[str, tuple[str, ...]] = {}  # real path of each folder listed -> its parts there
    stack: list[tuple[str, tuple[str, ...]]] = [(root, ())]
    links: list[tuple[str, tuple[str, ...]]] = []  # symbolic links to folders, in listing order
    while stack or links:
        directory, parts = stack.pop() if stack else links.pop(0)
        real = os.path.realpath(directory)
        if parts and _holds(real, os.path.dirname(directory)):
            skipped.append(("/".join(parts), "directory already visited (symlink loop)"))
            continue
        if real in listed:
            shown, target = display_name("/".join(parts)), display_name("/".join(listed[real])) or "."
            skipped.append(("/".join(parts), f"alias of {target} (a symbolic link to a folder listed under its name)"))
            warnings.append(
                f"{shown} is a symbolic link to {target}, which is listed under its own name: not followed, so "
                f"its images are listed once, as {target}/..., not under the link's name"
            )
            continue
        listed[real] = parts
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            skipped.append(("/".join(parts) or ".", f"cannot list directory: {exc.strerror}"))
            continue
        subdirs: list[tuple[str, tuple[str, ...]]] = []
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
                (links if entry.is_symlink() else subdirs).append((entry.path, sub))
            elif is_file:
                files.append((sub, entry.path))
            elif entry.is_symlink():
                skipped.append(("/".join(sub), "broken symbolic link"))
            else:
                skipped.append(("/".join(sub), "not a regular file"))
        stack.extend(reversed(subdirs))
    return files, skipped, warnings


def _holds(real: str, folder: str) -> bool:
    """Whether the folder at real path ``real`` is ``folder`` or one of the folders above it."""
    inside = os.path.realpath(folder)
    return inside == real or inside.startswith(real.rstrip(os.sep) + os.sep)


def _assign(
    images: list[tuple[tuple[str, ...], str]],
    depth: int,
    split: str | None,
    records: list[ImageRecord],
    skipped: list[tuple[str, str]],
    labelled: bool | None = None,
) -> None:
    """Label images by their folder at ``depth`` if any sits in one, else leave them unlabelled."""
    if labelled is None:
        labelled = any(len(parts) > depth + 1 for parts, _ in images)
    for parts, abspath in images:
        relpath = "/".join(parts)
        if not labelled:
            records.append(ImageRecord(relpath, abspath, None, split))
        elif len(parts) > depth + 1:
            records.append(ImageRecord(relpath, abspath, display_name(parts[depth]), split))
        else:
            skipped.append((relpath, "outside the class folders"))


def _manifest_text(csv_path: Path) -> tuple[str, str | None]:
    """The manifest's text and, when it is not UTF-8, a one-line hint.

    UTF-8 (with or without BOM) and UTF-16/32 with a BOM are read as such. Any other bytes are kept as surrogate
    escapes, so a name written in the file system's own bytes (e.g. Latin-1) still names its file, and the hint
    asks for the manifest to be saved as UTF-8."""
    raw = csv_path.read_bytes()
    for bom, encoding in (
        (codecs.BOM_UTF32_LE, "utf-32"),
        (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16"),
    ):
        if raw.startswith(bom) and not (encoding == "utf-16" and raw.startswith(codecs.BOM_UTF32_LE)):
            return raw.decode(encoding), None
    try:
        return raw.decode("utf-8-sig"), None
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return (
            raw.decode("utf-8-sig", "surrogateescape"),
            f"{csv_path} is not UTF-8 (first at line {line}): names were kept byte for byte, labels may be "
            "garbled; save the manifest as UTF-8",
        )


def _find_normalised(abspath: str) -> str:
    """``abspath`` itself if it exists, else the entry of its folder whose name differs only in Unicode
    normalisation (NFC vs NFD: macOS writes NFD names, most editors NFC)."""
    if os.path.lexists(abspath):
        return abspath
    folder, name = os.path.split(abspath)
    for form in ("NFC", "NFD"):
        candidate = os.path.join(folder, unicodedata.normalize(form, name))
        if os.path.lexists(candidate):
            return candidate
    if not os.path.isdir(folder):
        folder = _find_normalised(folder) if folder not in ("", os.sep) and folder != abspath else folder
        if not os.path.isdir(folder):
            return abspath
    wanted = unicodedata.normalize("NFC", name)
    try:
        for entry in os.listdir(folder):
            if unicodedata.normalize("NFC", entry) == wanted:
                return os.path.join(folder, entry)
    except OSError:
        pass
    return abspath


def _read_manifest(csv_path: Path, allow_outside_root: bool) -> ImageSource:
    """Read a CSV with a header row; rows keep their file order.

    The path column is the first of PATH_COLUMNS present (case-insensitive), the label column
    the first of LABEL_COLUMNS, the split column ``split``; other columns are ignored. Relative
    paths are relative to the CSV's directory, with ``/`` or Windows ``\\`` separators; absolute paths and paths
    leaving it with ``..`` are refused (counted in a warning naming ``--allow-outside-root``) unless
    ``allow_outside_root``. Names that differ from the file's only in Unicode normalisation are found. The CSV
    is UTF-8, or UTF-16/32 with a BOM; other bytes are kept as they are (surrogate escapes) with a hint to save it
    as UTF-8. A path with a NUL byte is refused.
    """
    root = os.path.dirname(os.path.abspath(csv_path))
    records: list[ImageRecord] = []
    skipped: list[tuple[str, str]] = []
    warnings: list[str] = []
    seen: set[str] = set()
    outside = 0
    text, hint = _manifest_text(csv_path)
    if hint:
        warnings.append(hint)
    rows = csv.reader(io.StringIO(text, newline=""))
    header = next(rows, None)
    if header is None:
        raise InputError(f"{csv_path}: empty manifest, a header row is required")
    columns: dict[str, int] = {}
    for i, name in enumerate(header):
        columns.setdefault(name.strip().lower(), i)
    path_col = next((columns[c] for c in PATH_COLUMNS if c in columns), None)
    if path_col is None:
        raise InputError(
            f"{csv_path}: no path column; name one of {', '.join(PATH_COLUMNS)} (found: {', '.join(header)})"
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
        windows_absolute = len(value) > 2 and value[1] == ":" and value[2] in "\\/" and value[0].isalpha()
        if "\\" in value and os.sep == "/" and not os.path.lexists(os.path.join(root, value)):
            value = value.replace("\\", "/")
        abspath = os.path.normpath(os.path.join(root, value))
        inside = os.path.relpath(abspath, root)
        if windows_absolute or inside == os.pardir or inside.startswith(os.pardir + os.sep):
            if not allow_outside_root or windows_absolute:
                skipped.append((value, _ESCAPES))
                outside += 1
                continue
            relpath = PurePath(os.path.normpath(value)).as_posix()
        else:
            relpath = PurePath(inside).as_posix()
        abspath = _find_normalised(abspath)
        ext = os.path.splitext(relpath)[1].lower()
        if ext not in IMAGE_EXTENSIONS and not (os.path.isfile(abspath) and sniff_image(abspath)):
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
                    display_name(_cell(row, label_col)) or None,
                    normalize_split(split) if split else None,
                )
            )
    if outside:
        warnings.append(
            f"{outside} manifest path{'s' if outside > 1 else ''} outside {root} (absolute or with ..) "
            "refused: pass --allow-outside-root to read them"
        )
    class_names = sorted({r.label for r in records if r.label is not None})
    return ImageSource(root, "manifest", records, class_names, skipped, warnings)


def _cell(row: list[str], index: int | None) -> str:
    return row[index].strip() if index is not None and index < len(row) else ""
