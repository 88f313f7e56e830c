"""Rendering of ``tlpipe suggest``'s picks: a contact sheet (the audit's) and an HTML page. Drawing only: the
picks come from :func:`tlpipe.pipeline.suggest.suggest`."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import numpy as np

from tlpipe.pipeline.reports.audit import contact_sheet

from .core import SuggestResult

__all__ = ["SHEET_PICKS", "write_report"]

SHEET_PICKS = 48  # picks drawn on the contact sheet


def _caption(p) -> str:
    guess = f"{p.guess} {p.guess_probability:.2f}" if p.guess else "no head"
    return f"{p.rank}. {guess} · {p.path}"


def _file(result: SuggestResult, path: str) -> Path | None:
    """The image file of a pick under the cache's source roots, if it is still there."""
    for root in result.roots or [""]:
        candidate = Path(root) / path
        if candidate.is_file():
            return candidate.resolve()
    return None


def _page(result: SuggestResult, sheet: str) -> str:
    rows = []
    for p in result.picks:
        found = _file(result, p.path)
        image = (
            f'<img src="{html.escape(found.as_uri())}" alt="" loading="lazy">'
            if found is not None
            else "<i>file not found</i>"
        )
        guess = f"{html.escape(p.guess)} ({p.guess_probability:.2f})" if np.isfinite(p.guess_probability) else "&ndash;"
        rows.append(
            f"<tr><td>{p.rank}</td><td>{image}</td><td><code>{html.escape(p.path)}</code></td>"
            f"<td>{guess}</td><td>{html.escape(p.reason)}</td></tr>"
        )
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in result.notes)
    head = html.escape(result.head) if result.head else "none (a cold start)"
    used = html.escape(result.strategy_used)
    if result.strategy != result.strategy_used:
        used += f" (asked: {html.escape(result.strategy)})"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tlpipe suggest: {len(result.picks)} photos to label next</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: middle; }}
img {{ max-width: 160px; max-height: 160px; }}
</style></head><body>
<h1>{len(result.picks)} photos to label next</h1>
<p>Cache <code>{html.escape(result.cache)}</code>, feature set <code>{html.escape(result.feature_key)}</code>:
{result.labelled} labelled and {result.unlabelled} unlabelled photos. Head: {head}. Strategy:
{used}, seed {result.seed}.</p>
{f"<ul>{notes}</ul>" if notes else ""}
<p>Label them (fill in the <code>label</code> column of the picks CSV into your manifest, or move the files into
their class folders), run <code>tlpipe extract</code> on the same source again, <code>tlpipe fit-head</code>, and
<code>tlpipe suggest</code> again. Contact sheet: <a href="{html.escape(sheet)}">{html.escape(sheet)}</a>.</p>
<table><tr><th>rank</th><th>photo</th><th>path</th><th>head's guess</th><th>why</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""


def write_report(result: SuggestResult, folder: str | os.PathLike) -> dict[str, Path]:
    """Write ``picks.png`` (contact sheet of the first :data:`SHEET_PICKS` picks), ``picks.html`` (every pick with
    its image, path, the head's guess and the reason) and ``suggest.json`` (the whole result) into ``folder``;
    returns their paths by name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / name for name in ("picks.png", "picks.html", "suggest.json")}
    contact_sheet(
        result.roots,
        [(p.path, p.sha256, _caption(p)) for p in result.picks[:SHEET_PICKS]],
        paths["picks.png"],
        f"Label these next ({result.strategy_used}; rank. head's guess · path)",
    )
    paths["picks.html"].write_text(_page(result, paths["picks.png"].name), encoding="utf-8")
    from tlpipe.pipeline.cli.output import _jsonable

    paths["suggest.json"].write_text(json.dumps(_jsonable(result.to_dict()), indent=1), encoding="utf-8")
    return paths
