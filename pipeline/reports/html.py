"""Self-contained HTML pages for the reports (rendering only): ``DIR/index.html`` with its thumbnails beside it
in ``DIR/thumbs/``.

One page per report (compare, evaluate, audit), rendered by Jinja2 (autoescaping on: every class name, file
name and caption is escaped, quotes included) from an already computed result; nothing here recomputes a
metric. The page needs no server, network or CDN: plain HTML and CSS, no script; its charts are the PNGs the
report writes beside it, its thumbnails JPEGs under ``thumbs/`` (a click opens the larger one). Names that
are not valid UTF-8 (``surrogateescape``'d paths) are shown with backslash escapes, as the cache stores them.
An image that cannot be shown gets a placeholder tile with the reason (:func:`.images.resolve_image`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlpipe.pipeline.reports.images import row_thumbnail

__all__ = ["THUMB", "LARGE", "Tile", "display", "render", "tiles", "confusion_cells"]

THUMB = 160  # px, the gallery's square thumbnails
LARGE = 512  # px, the image a thumbnail's click opens


def display(value):
    """A value as the page shows it: a str with lone surrogates (a non-UTF-8 file name read with
    ``surrogateescape``) gets backslash escapes (``\\xff``), as :mod:`tlpipe.features.cache` stores it;
    anything else (markup a template already escaped included) is returned unchanged."""
    from markupsafe import Markup

    if isinstance(value, str) and not isinstance(value, Markup):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


@dataclass
class Tile:
    """One image of a gallery: its thumbnail and larger view (URLs relative to the page) or the reason it
    cannot be shown, and its caption lines."""

    path: str
    thumb: str | None
    large: str | None
    reason: str
    caption: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)  # data-* attributes of the tile (e.g. true / predicted class)


def tiles(folder: Path, entries: list[dict], roots_of) -> list[Tile]:
    """Write each entry's thumbnail and larger view under ``folder/thumbs/`` and return its tile.

    Parameters
    ----------
    folder : pathlib.Path
        The report folder (the page's folder).
    entries : list of dict
        Each with ``path`` (the cached path), ``sha256`` (may be empty), ``caption`` (list of str) and
        optionally ``data`` (dict of data-* attributes).
    roots_of : callable
        entry -> list of folders its path may be relative to (tried in order).

    Returns
    -------
    list of Tile
        In ``entries`` order; thumbnails are named by position (``thumbs/0000.jpg``), so no file name from
        the data reaches a URL.
    """
    from PIL import Image

    thumbs = folder / "thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)
    out = []
    for k, entry in enumerate(entries):
        reason = "no recorded source"
        small = None
        roots = roots_of(entry) or [""]
        for root in roots:
            small, reason = row_thumbnail(entry["path"], root, entry.get("sha256") or None, THUMB)
            if small is not None:
                large, _ = row_thumbnail(entry["path"], root, entry.get("sha256") or None, LARGE)
                break
        thumb = big = None
        if small is not None:
            thumb, big = f"thumbs/{k:04d}.jpg", f"thumbs/{k:04d}-large.jpg"
            Image.fromarray(small).save(folder / thumb, quality=85)
            Image.fromarray(large if large is not None else small).save(folder / big, quality=88)
        out.append(Tile(entry["path"], thumb, big, reason, entry.get("caption", []), entry.get("data", {})))
    return out


def confusion_cells(confusion, labels: list[str], counts_by_cell: dict[tuple[str, str], int]) -> list[list[dict]]:
    """The confusion matrix as table cells: count, shade (row-normalised rate) and, for an off-diagonal cell
    whose images are in the gallery, the anchor of its gallery section (``#cell-I-J``)."""
    confusion = np.asarray(confusion)
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    rows = []
    for i, true in enumerate(labels):
        row = []
        for j, predicted in enumerate(labels):
            shown = counts_by_cell.get((true, predicted), 0)
            row.append(
                {
                    "count": int(confusion[i, j]),
                    "shade": round(float(rates[i, j]), 3),
                    "href": f"#cell-{i}-{j}" if i != j and shown else None,
                    "true": true,
                    "predicted": predicted,
                }
            )
        rows.append(row)
    return rows


def gallery_sections(items: list[dict], labels: list[str], tiles_: list[Tile]) -> list[dict]:
    """Group misclassified tiles by (true, predicted) cell, largest cell first; each section's anchor is
    ``cell-I-J`` in ``labels`` order (a pair whose name is not in ``labels`` gets the anchor ``cell-x-N``)."""
    index = {name: i for i, name in enumerate(labels)}
    groups: dict[tuple[str, str], list[Tile]] = {}
    for item, tile in zip(items, tiles_):
        groups.setdefault((item["true"], item["predicted"]), []).append(tile)
    sections = []
    for n, ((true, predicted), members) in enumerate(sorted(groups.items(), key=lambda kv: -len(kv[1]))):
        i, j = index.get(true), index.get(predicted)
        anchor = f"cell-{i}-{j}" if i is not None and j is not None else f"cell-x-{n}"
        sections.append({"anchor": anchor, "true": true, "predicted": predicted, "tiles": members})
    return sections


def render(template: str, folder: Path, **context) -> Path:
    """Render one of :data:`.templates.TEMPLATES` into ``folder/index.html`` (UTF-8, autoescaped)."""
    import jinja2

    from tlpipe.pipeline.reports.templates import TEMPLATES

    env = jinja2.Environment(
        loader=jinja2.DictLoader(TEMPLATES),
        autoescape=True,  # every {{ }} is HTML-escaped, attribute quotes included
        finalize=display,
        undefined=jinja2.StrictUndefined,  # a missing value is a bug, not an empty string
        trim_blocks=True,
        lstrip_blocks=True,
    )
    page = env.get_template(template).render(**context)
    path = Path(folder) / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def relative(path: str | os.PathLike, folder: Path) -> str:
    """A file beside the page as a relative URL (its name, %-quoted)."""
    from urllib.parse import quote

    return quote(Path(path).relative_to(folder).as_posix())
