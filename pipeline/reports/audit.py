"""The report of `tlpipe audit`: Markdown, CSV, JSON, contact sheets and a chart, rendered from a computed
:class:`~tlpipe.pipeline.audit.checks.AuditResult` (nothing is recomputed here)."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from tlpipe.pipeline.audit.checks import OUTLIER_MADS, AuditResult
from tlpipe.pipeline.reports.images import row_thumbnail

__all__ = ["SHEET_ENTRIES", "write_report"]

SHEET_ENTRIES = 24  # entries per contact sheet


# -- the report ----------------------------------------------------------------------------------------
def _thumbnail(roots: list[str], path: str, sha256: str, size: int) -> tuple[np.ndarray | None, str]:
    """The image at ``path`` under one of the source ``roots``, or None and why not."""
    reason = "no recorded source"
    for root in roots or [""]:
        image, reason = row_thumbnail(path, root, sha256, size)
        if image is not None:
            return image, ""
    return None, reason


def _contact_sheet(
    result: AuditResult, entries: list[tuple[str, str, str]], path: Path, title: str, columns: int = 6, size: int = 128
) -> Path:
    """The audit's sheets: :func:`contact_sheet` over the audited sources' folders."""
    return contact_sheet(result.roots, entries, path, title, columns, size)


def contact_sheet(
    roots: list[str], entries: list[tuple[str, str, str]], path: Path, title: str, columns: int = 6, size: int = 128
) -> Path:
    """A PNG grid of images with captions (matplotlib, no display); returns ``path``.

    Parameters
    ----------
    roots : list of str
        Folders the entries' paths are relative to (:func:`tlpipe.pipeline.audit.checks.source_roots`).
    entries : list of (relative path, sha256, caption)
        An image whose file is missing or whose bytes no longer match its sha256 gets a grey tile with the reason.
    path : Path
        The PNG written.
    title : str
        The sheet's title.
    columns, size : int
        Tiles per row; tile size in pixels (images are center-cropped to it).
    """
    import textwrap

    from matplotlib.figure import Figure

    rows = max(1, -(-len(entries) // columns))
    fig = Figure(figsize=(columns * 2.1, rows * 2.5 + 0.5))
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.axis("off")
    if not entries:
        axes[0].text(0, 0.5, "nothing found", fontsize=10)
    for ax, (rel, sha, caption) in zip(axes, entries):
        image, reason = _thumbnail(roots, rel, sha, size)
        if image is None:
            ax.imshow(np.full((size, size, 3), 200, dtype=np.uint8))
            ax.text(
                size / 2,
                size / 2,
                "\n".join(textwrap.wrap(reason, 18)),
                ha="center",
                va="center",
                fontsize=7,
                color="darkred",
            )
        else:
            ax.imshow(image)
        ax.set_title("\n".join(textwrap.wrap(caption, 26)[:4]), fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def _similarity_chart(result: AuditResult, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    values = result.nearest_cosine[np.isfinite(result.nearest_cosine)]
    ax.hist(values, bins=100, color="tab:blue")
    ax.axvline(result.threshold, color="tab:red", label=f"near-duplicate threshold {result.threshold}")
    ax.set(
        xlabel="cosine similarity to the most similar other image",
        ylabel="images",
        yscale="log",
        title=f"{result.feature_key}: nearest-neighbour similarity",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _md_path(text: str) -> str:
    from tlpipe.pipeline.cli.output import md_cell

    return "`" + md_cell(text.replace("`", "'")) + "`"


def _markdown(result: AuditResult) -> str:
    from tlpipe.pipeline.cli.output import md_cell

    s = result.summary()
    meta = result.backbone
    lines = [
        f"# Audit: {result.feature_key}",
        "",
        f"{result.rows} rows (cache `{result.cache_id}`, backbone {meta.get('backbone', '?')} @ "
        f"{meta.get('input_size', '?')})"
        + (f"; {result.excluded} rows excluded by the exclude list" if result.excluded else "")
        + f". {s['flagged_rows']} rows flagged.",
        "",
        "| finding | count |",
        "|---|---|",
        f"| duplicate clusters (exact / near) | {s['clusters']} ({s['exact_clusters']} / {s['near_clusters']}) |",
        f"| split leaks (cluster spans train and val/test) | {s['split_leaks']} |",
        f"| label conflicts (cluster with more than one label) | {s['label_conflicts']} |",
        f"| likely label errors (cleanlab) | {s['label_issues_flagged']} |",
        f"| outliers (score > median + {OUTLIER_MADS:g} MAD) | {s['outliers_flagged']} |",
        "",
        "## Method",
        "",
        f"- Near duplicates: cosine similarity ≥ {result.threshold} between L2-normalised embeddings, among each "
        f"row's {result.neighbours} nearest neighbours ({result.backend}); clusters are connected components. "
        "Exact copies: files of the recorded sources with the bytes of a cached row (the cache stores each "
        "content once). See ![similarity](similarity.png).",
        f"- Label errors: out-of-fold probabilities of the {result.head.get('head', 'logreg')} head "
        f"({result.head.get('folds', '?')}-fold, PCA {result.head.get('pca') or 'none'}, out-of-fold accuracy "
        f"{result.head.get('out_of_fold_accuracy', float('nan')):.4f}) ranked by cleanlab's self-confidence; "
        "flagged where cleanlab's find_label_issues says so.",
        f"- Outliers: mean cosine distance to the {result.neighbours} nearest neighbours.",
        *(f"- Note: {n}" for n in result.notes),
        "",
        "## Duplicate clusters (split leaks first, then label conflicts)",
        "",
        "![duplicates](duplicates.png)",
        "",
        "| cluster | kind | leak | conflict | labels | splits | min cosine | images |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in result.clusters[:200]:
        images = "<br>".join(
            f"{_md_path(m.path)} ({md_cell(m.label or '-')}, {md_cell(m.split or '-')}"
            f"{', exact copy' if m.exact_copy else ''})"
            for m in c.members[:8]
        ) + (f"<br>… {len(c.members) - 8} more" if len(c.members) > 8 else "")
        lines.append(
            f"| {c.id} | {c.kind} | {'**yes**' if c.leak else ''} | {'**yes**' if c.conflict else ''} | "
            f"{md_cell(', '.join(c.labels))} | {md_cell(', '.join(s or '-' for s in c.splits))} | {c.min_cosine:.3f} | "
            f"{images} |"
        )
    if len(result.clusters) > 200:
        lines.append(f"\n… {len(result.clusters) - 200} more clusters in duplicates.csv")
    lines += [
        "",
        "## Likely label errors (worst first)",
        "",
        "![label issues](label_issues.png)",
        "",
        "| rank | image | split | given | suggested | p(suggested) | quality | flagged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i in result.label_issues[:50]:
        lines.append(
            f"| {i.rank} | {_md_path(i.path)} | {md_cell(i.split or '-')} | {md_cell(i.given)} | "
            f"{md_cell(i.suggested)} | {i.p_suggested:.3f} | "
            f"{i.quality:.3f} | {'yes' if i.flagged else ''} |"
        )
    lines += [
        "",
        "## Outliers (most isolated first)",
        "",
        "![outliers](outliers.png)",
        "",
        "| rank | image | label | split | score | nearest cosine | flagged |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in result.outliers[:50]:
        lines.append(
            f"| {o.rank} | {_md_path(o.path)} | {md_cell(o.label or '-')} | {md_cell(o.split or '-')} | "
            f"{o.score:.3f} | "
            f"{o.nearest_cosine:.3f} | {'yes' if o.flagged else ''} |"
        )
    lines += [
        "",
        "Acting on it: `tlpipe audit CACHE --write-exclude exclude.txt`, then `--exclude exclude.txt` on "
        "compare, fit-head and evaluate. Nothing is deleted.",
        "",
    ]
    return "\n".join(lines)


def write_report(result: AuditResult, folder: str | os.PathLike, *, sheets: bool = True) -> dict[str, Path]:
    """Write index.html (one page, thumbnails in thumbs/), report.md, audit.json, duplicates.csv,
    label_issues.csv, outliers.csv, similarity.png and (with ``sheets``) the contact sheets duplicates.png,
    label_issues.png, outliers.png into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = ["report.md", "audit.json", "duplicates.csv", "label_issues.csv", "outliers.csv", "similarity.png"]
    if sheets:
        names += ["duplicates.png", "label_issues.png", "outliers.png"]
    paths = {name: folder / name for name in names}
    paths["report.md"].write_text(_markdown(result), encoding="utf-8")
    paths["audit.json"].write_text(json.dumps(result.to_dict(), indent=1, default=str), encoding="utf-8")
    with open(paths["duplicates.csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "cluster",
                "kind",
                "leak",
                "conflict",
                "min_cosine",
                "row",
                "path",
                "sha256",
                "label",
                "split",
                "exact_copy",
            ]
        )
        for c in result.clusters:
            for m in c.members:
                w.writerow(
                    [
                        c.id,
                        c.kind,
                        c.leak,
                        c.conflict,
                        f"{c.min_cosine:.4f}",
                        m.row,
                        m.path,
                        m.sha256,
                        m.label or "",
                        m.split,
                        m.exact_copy,
                    ]
                )
    for name, items in (("label_issues.csv", result.label_issues), ("outliers.csv", result.outliers)):
        with open(paths[name], "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            columns = list(asdict(items[0])) if items else ["rank"]
            w.writerow(columns)
            for item in items:
                w.writerow([getattr(item, c) for c in columns])
    _similarity_chart(result, paths["similarity.png"])
    if sheets:
        dup_entries: list[tuple[str, str, str]] = []
        for c in result.clusters:
            if len(dup_entries) >= SHEET_ENTRIES:
                break
            tag = " ".join(t for t, on in (("LEAK", c.leak), ("CONFLICT", c.conflict)) if on) + " " * (
                c.leak or c.conflict
            )
            for m in c.members[:6]:
                dup_entries.append((m.path, m.sha256, f"#{c.id} {tag}{m.label or '-'}/{m.split or '-'} {m.path}"))
        _contact_sheet(
            result,
            dup_entries[:SHEET_ENTRIES],
            paths["duplicates.png"],
            "Duplicate clusters (#cluster, label/split, path)",
        )
        _contact_sheet(
            result,
            [
                (i.path, i.sha256, f"{i.rank}. given {i.given} -> {i.suggested} ({i.p_suggested:.2f}) {i.path}")
                for i in result.label_issues[:SHEET_ENTRIES]
            ],
            paths["label_issues.png"],
            "Likely label errors (given -> suggested, p)",
        )
        _contact_sheet(
            result,
            [
                (o.path, o.sha256, f"{o.rank}. {o.label or '-'} score {o.score:.3f} {o.path}")
                for o in result.outliers[:SHEET_ENTRIES]
            ],
            paths["outliers.png"],
            "Outliers (mean cosine distance to nearest neighbours)",
        )
    paths["index.html"] = _html(result, folder)
    return paths


HTML_CLUSTERS = 50  # duplicate clusters on the page (duplicates.csv lists all)
HTML_ENTRIES = 48  # label issues and outliers on the page, worst first


def _html(result: AuditResult, folder: Path) -> Path:
    """``folder/index.html``: each duplicate cluster, the likely label errors and the outliers as galleries
    (thumbnails in ``folder/thumbs/``)."""
    from tlpipe.pipeline.reports import html

    entries: list[dict] = []
    spans = []
    for c in result.clusters[:HTML_CLUSTERS]:
        start = len(entries)
        entries += [
            {
                "path": m.path,
                "sha256": m.sha256,
                "caption": [f"{m.label or '-'} / {m.split or '-'}" + (" (exact copy)" if m.exact_copy else ""), m.path],
            }
            for m in c.members
        ]
        spans.append((c, start, len(entries)))
    issues = [i for i in result.label_issues if i.flagged][:HTML_ENTRIES]
    start_issues = len(entries)
    entries += [
        {
            "path": i.path,
            "sha256": i.sha256,
            "caption": [f"{i.rank}. given {i.given}", f"suggested {i.suggested} (p={i.p_suggested:.2f})", i.path],
            "data": {"given": i.given, "suggested": i.suggested},
        }
        for i in issues
    ]
    outliers = [o for o in result.outliers if o.flagged][:HTML_ENTRIES]
    start_outliers = len(entries)
    entries += [
        {"path": o.path, "sha256": o.sha256, "caption": [f"{o.rank}. {o.label or '-'} score {o.score:.3f}", o.path]}
        for o in outliers
    ]
    tiles = html.tiles(folder, entries, lambda e: list(result.roots))
    return html.render(
        "audit.html",
        folder,
        title=f"tlpipe audit: {result.feature_key}",
        r=result,
        summary=result.summary(),
        clusters=[(c, tiles[a:b]) for c, a, b in spans],
        clipped={"clusters": len(result.clusters) > HTML_CLUSTERS},
        issues=tiles[start_issues:start_outliers],
        outliers=tiles[start_outliers:],
        chart="similarity.png" if (folder / "similarity.png").is_file() else None,
    )
