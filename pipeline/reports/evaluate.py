"""The HTML page of `tlpipe evaluate --report`, rendered from a computed
:class:`~tlpipe.pipeline.heads.evaluate.EvalResult` (nothing is recomputed here)."""

from __future__ import annotations

import os
from pathlib import Path

from tlpipe.pipeline.heads.evaluate import EvalResult

__all__ = ["HTML_GALLERY", "write_html"]

HTML_GALLERY = 200  # misclassified images on the page, most confident first


def write_html(result: EvalResult, folder: str | os.PathLike, *, head: str) -> Path:
    """Write ``folder/index.html`` (thumbnails in ``folder/thumbs/``): metrics, per-class table, the confusion
    matrix whose counts link to the images behind them, the misclassified gallery. Returns the page's path."""
    from tlpipe.pipeline.reports import html

    folder = Path(folder)
    items = result.misclassified[:HTML_GALLERY]
    entries = [
        {
            "path": item["path"],
            "sha256": item["sha256"],
            "source": item["source"],
            "caption": [
                f"true {item['true']}",
                f"predicted {item['predicted']} (p={item['probability']:.2f})",
                item["path"],
            ],
            "data": {"true": item["true"], "predicted": item["predicted"]},
        }
        for item in items
    ]
    tiles = html.tiles(folder, entries, lambda e: [e["source"]] if e.get("source") else [""])
    by_cell: dict[tuple[str, str], int] = {}
    for item in items:
        by_cell[(item["true"], item["predicted"])] = by_cell.get((item["true"], item["predicted"]), 0) + 1
    return html.render(
        "evaluate.html",
        folder,
        title=f"tlpipe evaluate: {head}",
        r=result,
        head=head,
        cells=html.confusion_cells(result.confusion, result.labels, by_cell),
        sections=html.gallery_sections(items, result.labels, tiles),
        shown=len(items),
        total=len(result.misclassified),
        chart="confusion_matrix.png" if (folder / "confusion_matrix.png").is_file() else None,
    )
