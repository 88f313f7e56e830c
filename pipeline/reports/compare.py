"""The report of `tlpipe compare` (and of the sweep, `compare --features all`): Markdown, CSV, JSON and charts,
rendered from a computed :class:`~tlpipe.pipeline.heads.selection.CompareResult` (nothing is recomputed here)."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from tlpipe.errors import InputError
from tlpipe.pipeline.heads.selection import ECE_BINS, GALLERY, METRICS, CompareResult, HeadResult, SweepResult, SweepRow
from tlpipe.pipeline.reports.charts import save_confusion_matrix
from tlpipe.pipeline.reports.images import resolve_image

__all__ = ["COLUMNS", "cells", "format_sweep_table", "format_table", "write_report", "write_sweep_report"]


def _pm(mean: float, std: float, digits: int = 3, scale: float = 1.0) -> str:
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def cells(h: HeadResult) -> list[str]:
    params = ", ".join(f"{k}={v}" for k, v in h.params.items()) or "defaults"
    return [
        h.name,
        _pm(h.accuracy, h.accuracy_std),
        _pm(h.macro_f1, h.macro_f1_std),
        _pm(h.log_loss, h.log_loss_std),
        _pm(h.fit_s, h.fit_s_std, 2),
        _pm(h.predict_s, h.predict_s_std, 3),
        params + (f", pca={h.pca}" if h.pca else "") + _dimensions(h.dimensions),
    ]


def _dimensions(dimensions: dict) -> str:
    """ ", 37 of 1280 dimensions kept" (PCA), or "" when every dimension is used."""
    if not dimensions or dimensions.get("kept") == dimensions.get("input"):
        return ""
    return f", {dimensions['kept']} of {dimensions['input']} dimensions kept"


COLUMNS = ["head", "accuracy", "macro-F1", "log-loss", "fit s", "predict s", "parameters"]


def format_table(result: CompareResult):
    """A rich table of the comparison (best head marked), for the CLI."""
    from rich.table import Table

    table = Table(title=f"{result.cv}-fold CV on {result.rows} rows of {result.feature_key}")
    for i, column in enumerate(COLUMNS):
        table.add_column(column, justify="left" if i in (0, 6) else "right")
    for h in sorted(result.heads, key=lambda h: (-h.accuracy, -h.macro_f1)):
        row = cells(h)
        if h.name == result.best:
            row[0] = f"[bold green]{h.name} *[/]"
        table.add_row(*row)
    return table


def _markdown(result: CompareResult, files: dict[str, Path], gallery_note: str) -> str:
    from tlpipe.pipeline.cli.output import md_cell  # class names in table cells: any character

    meta = result.backbone
    tuning = (
        "best point of each head's search grid (slightly optimistic, like GridSearchCV's best_score_)"
        if result.search
        else "defaults (the same as `tlpipe fit-head`'s)"
        + (
            "; logreg's C picked once by its internal 3-fold CV on all the cross-validated rows, as fit-head "
            "picks it, then every fold scored at that C (its CV figures are slightly optimistic; the held-out "
            "score is not)"
            if any(h.name == "logreg" for h in result.heads)
            else ""
        )
    )
    heads = sorted(result.heads, key=lambda h: (-h.accuracy, -h.macro_f1))
    lines = [
        f"# Head comparison: {result.feature_key}",
        "",
        f"Best head: **{result.best}**. Why: {result.choice}.",
        "",
        "## Cross-validation on the training rows",
        "",
        f"{result.cv}-fold CV on {result.rows} rows: {result.setup}.",
        "",
        "| " + " | ".join(COLUMNS) + " | ECE |",
        "|" + "---|" * (len(COLUMNS) + 1),
        *("| " + " | ".join(cells(h)) + f" | {h.ece:.3f} |" for h in heads),
        "",
        "Figures are mean ± standard deviation over the folds; times are seconds per fit / per prediction of "
        f"one fold. Chance level (always the largest class): accuracy {result.chance:.3f}. ECE: expected "
        f"calibration error of the out-of-fold probabilities ({ECE_BINS} bins).",
        "",
    ]
    if result.holdout:
        h = result.holdout
        loss = f", log-loss {h['log_loss']:.4f}" if h["log_loss"] is not None else ""
        chosen = ", ".join(f"{k}={v}" for k, v in h["params"].items()) or "defaults"
        chosen += (f", pca={h['pca']}" if h["pca"] else "") + _dimensions(h.get("dimensions", {}))
        lines += [
            "## Held-out score of the best head",
            "",
            f"{h['head']} refitted with the parameters CV chose ({chosen}) on all {h['train_rows']} training rows, "
            f"scored once on {h['rows']} held-out rows ({h['description']}): **accuracy {h['accuracy']:.4f}**, "
            f"macro-F1 {h['macro_f1']:.4f}{loss}, ECE {h['ece']:.3f}.",
            "",
        ]
    else:
        lines += [
            "## Held-out score of the best head",
            "",
            "None: every labelled row was cross-validated (`--all-rows`), so no row was held out.",
            "",
        ]
    lines += [
        "## Per-class precision, recall and F1 (out of fold)",
        "",
        "| head | class | precision | recall | F1 | support |",
        "|---|---|---|---|---|---|",
    ]
    for head in heads:
        lines += [
            f"| {head.name} | {md_cell(c)} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1-score']:.3f} | "
            f"{int(r['support'])} |"
            for c, r in head.per_class.items()
        ]
    lines += [
        "",
        "## Misclassified images",
        "",
        f"{len(result.misclassified)} misclassified: {result.misclassified_source}; listed in "
        f"[misclassified.csv](misclassified.csv), most confident mistakes first. {gallery_note}",
        "",
        "![worst misclassified](misclassified.png)",
        "",
        "## Figures",
        "",
        "![comparison](comparison.png)",
        "",
        f"![confusion matrix of {result.best}](confusion_matrix.png)",
        "",
        "![reliability diagram](reliability.png)",
        "",
    ]
    if "learning_curve.png" in {p.name for p in files.values()}:
        lines += [
            "![learning curve](learning_curve.png)",
            "",
            "Learning curve: the best head fitted on stratified fractions of the training rows, each scored "
            "on the same held-out rows. Still rising at the right end: more photos would likely help.",
            "",
        ]
    maps = ", ".join(f"![{k} map of the embeddings](embedding_map_{k}.png)" for k in result.embedding_map["points"])
    lines += [
        maps,
        "",
        f"Embedding map ({', '.join(k.upper() for k in result.embedding_map['points'])}"
        f"{'' if 'umap' in result.embedding_map['points'] else '; a UMAP map too with --umap (tlpipe[umap])'}): "
        f"{result.embedding_map['source']}, coloured by true class, misclassified marked ×.",
        "",
        "## Setup",
        "",
        f"- Feature set: `{result.feature_key}` (backbone {meta.get('backbone', '?')}, input size "
        f"{meta.get('input_size', '?')}, model sha256 {str(meta.get('model_sha256') or '?')[:16]}), cache "
        f"`{result.cache_id}`",
        f"- Rows: {result.rows}; {result.setup}",
        f"- Stratified {result.cv}-fold CV, shuffled with seed {result.seed}; class_weight {result.class_weight}",
        f"- Hyperparameters: {tuning}",
        f"- Wall time: {result.seconds:.1f} s (n_jobs {result.n_jobs or 'all cores'})",
        "",
        "## Class balance",
        "",
        "| class | rows |",
        "|---|---|",
        *(f"| {md_cell(name)} | {count} |" for name, count in result.balance["counts"].items() if count),
        "",
        f"Imbalance ratio (largest / smallest class): {result.balance['imbalance_ratio']:.2f}",
        "",
    ]
    return "\n".join(lines)


def _bar_chart(result: CompareResult, path: Path) -> None:
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state

    heads = result.heads
    fig = Figure(figsize=(9, 3.8))
    axes = fig.subplots(1, 3)
    x = np.arange(len(heads))
    panels = [("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("fit_s", "fit time (s)")]
    for ax, (metric, label) in zip(axes, panels):
        means = [getattr(h, metric) for h in heads]
        ax.bar(
            x,
            means,
            yerr=[getattr(h, metric + "_std") for h in heads],
            capsize=4,
            color=["tab:green" if h.name == result.best else "tab:blue" for h in heads],
        )
        ax.set_xticks(x, [h.name for h in heads], rotation=30, ha="right")
        ax.set_title(label)
        if metric != "fit_s":
            low = min(means) - 3 * max(getattr(h, metric + "_std") for h in heads) - 0.02
            if metric == "accuracy":
                low = min(low, result.chance - 0.05)
                ax.axhline(result.chance, color="tab:red", linestyle="--", linewidth=1)
                ax.text(
                    len(heads) - 0.5,
                    result.chance,
                    f"chance {result.chance:.2f}",
                    color="tab:red",
                    ha="right",
                    va="bottom",
                    fontsize=8,
                )
            ax.set_ylim(max(0.0, low), 1.0)
    fig.suptitle(f"{result.cv}-fold CV, {result.feature_key}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _reliability_chart(result: CompareResult, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4.6))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    for name, bins in result.reliability.items():
        ax.plot(
            bins["confidence"],
            bins["accuracy"],
            marker="o",
            label=f"{name} (ECE {bins['ece']:.3f})",
            linewidth=2.5 if name == result.best else 1,
        )
    ax.set(
        xlabel="predicted probability of the top class",
        ylabel="accuracy",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title="Reliability (out of fold)",
    )
    ax.legend(fontsize=8, loc="upper left")
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.11, top=0.93)  # fixed margins (tight_layout is slow)
    fig.savefig(path, dpi=100)


def _learning_chart(result: CompareResult, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.8))
    ax = fig.subplots()
    points = result.learning_curve
    ax.plot([p["rows"] for p in points], [p["accuracy"] for p in points], marker="o", color="tab:green")
    ax.axhline(result.chance, color="tab:red", linestyle="--", linewidth=1, label=f"chance {result.chance:.2f}")
    ax.set(xlabel="training rows", ylabel="held-out accuracy", title=f"Learning curve: {result.best}")
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.15, right=0.96, bottom=0.13, top=0.92)  # fixed margins (tight_layout is slow)
    fig.savefig(path, dpi=100)


def _map_chart(result: CompareResult, kind: str, path: Path) -> None:
    from matplotlib.figure import Figure

    points = np.asarray(result.embedding_map["points"][kind])
    labels = np.asarray(result.embedding_map["labels"], dtype=object)
    wrong = np.asarray(result.embedding_map["misclassified"], dtype=bool)
    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    for name in result.class_names:
        inside = labels == name
        ax.scatter(points[inside, 0], points[inside, 1], s=8, alpha=0.6, label=name)
    ax.scatter(
        points[wrong, 0],
        points[wrong, 1],
        s=40,
        marker="x",
        color="black",
        linewidths=1,
        label=f"misclassified ({int(wrong.sum())})",
    )
    ax.set(title=f"{kind.upper()} of the embeddings", xticks=[], yticks=[])
    ax.legend(fontsize=7, markerscale=1.5, loc="best")
    fig.subplots_adjust(left=0.03, right=0.97, bottom=0.03, top=0.93)  # fixed margins (tight_layout is slow)
    fig.savefig(path, dpi=100)


def _gallery(result: CompareResult, path: Path) -> str:
    """A thumbnail grid of the worst misclassified images (PIL, no plotting); returns a sentence on what
    could be read. Each thumbnail is the picture as the model saw it: upright, in sRGB, refused when damaged
    (:func:`tlpipe.features.images.load_thumbnail`)."""
    from PIL import Image, ImageDraw

    from tlpipe.features.images import ImageError, load_thumbnail

    worst = result.misclassified[:GALLERY]
    cell, caption, cols = 160, 30, 4
    rows = max(1, int(np.ceil(len(worst) / cols)))
    sheet = Image.new("RGB", (cols * cell, rows * (cell + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    unreadable = []
    for k, item in enumerate(worst):
        x, y = (k % cols) * cell, (k // cols) * (cell + caption)
        found, reason = resolve_image(item["path"], item.get("source"), item.get("sha256"))
        try:
            if found is None:
                raise FileNotFoundError(reason)
            image = load_thumbnail(found, cell - 8)
            sheet.paste(image, (x + (cell - image.width) // 2, y + (cell - image.height) // 2))
        except (OSError, ValueError, ImageError):
            unreadable.append(item["path"])
            draw.rectangle((x + 4, y + 4, x + cell - 4, y + cell - 4), outline="grey")
            draw.text((x + 10, y + cell // 2 - 12), "image not readable", fill="black")
            draw.text((x + 10, y + cell // 2), Path(item["path"]).name[:24], fill="grey")
        draw.text((x + 4, y + cell), f"{item['true']} -> {item['predicted']}"[:30], fill="black")
        draw.text((x + 4, y + cell + 14), f"p={item['probability']:.2f}", fill="firebrick")
    if not worst:
        draw.text((10, cell // 2), "no misclassified images", fill="black")
    sheet.save(path)
    if not worst:
        return "No image was misclassified."
    if unreadable:
        return (
            f"Thumbnails of the {len(worst)} worst in misclassified.png; {len(unreadable)} of them could not be "
            f"read from their paths (shown as placeholders), e.g. {unreadable[0]}."
        )
    return f"Thumbnails of the {len(worst)} worst in misclassified.png, read from the image paths."


def write_report(result: CompareResult, folder: str | os.PathLike, *, umap: bool = False) -> dict[str, Path]:
    """Write the report folder.

    Files: report.md, results.csv, results.json, per_class.csv, misclassified.csv, comparison.png (with
    the chance level), confusion_matrix.png, reliability.png, misclassified.png (thumbnail gallery;
    images found by their cached path, relative to one of ``image_roots``, the cache's sources),
    embedding_map_pca.png, with ``umap`` embedding_map_umap.png too (umap-learn, ``tlpipe[umap]``: it
    costs :data:`UMAP_COST`, so it is asked for, not drawn whenever installed) and, with held-out rows,
    learning_curve.png. Returns file name -> path.

    Raises
    ------
    ImportError
        ``umap=True`` without umap-learn installed (before anything is written).
    """
    folder = Path(folder)
    if umap and "umap" not in result.embedding_map.get("points", {}):
        raise InputError("the comparison has no UMAP map to draw: compare with umap=True (--umap)")
    folder.mkdir(parents=True, exist_ok=True)
    names = [
        "report.md",
        "results.csv",
        "results.json",
        "per_class.csv",
        "misclassified.csv",
        "comparison.png",
        "confusion_matrix.png",
        "reliability.png",
        "misclassified.png",
        *(f"embedding_map_{k}.png" for k in result.embedding_map.get("points", {})),
    ]
    if result.learning_curve:
        names.append("learning_curve.png")
    paths = {name: folder / name for name in names}
    with open(paths["results.csv"], "w", newline="") as f:
        writer = csv.writer(f)
        stats = [m + suffix for m in METRICS for suffix in ("", "_std")]
        writer.writerow(["head", *stats, "folds", "params", "pca", "dimensions_kept", "ece", "best"])
        for h in result.heads:
            writer.writerow(
                [
                    h.name,
                    *(getattr(h, s) for s in stats),
                    h.folds,
                    json.dumps(h.params),
                    h.pca,
                    h.dimensions.get("kept"),
                    h.ece,
                    h.name == result.best,
                ]
            )
    with open(paths["per_class.csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["head", "source", "class", "precision", "recall", "f1", "support"])
        sources = [(h.name, f"{result.cv}-fold CV", h.per_class) for h in result.heads]
        if result.holdout:
            sources.append((result.best, "held-out", result.holdout["per_class"]))
        for name, source, per_class in sources:
            for c, r in per_class.items():
                writer.writerow([name, source, c, r["precision"], r["recall"], r["f1-score"], int(r["support"])])
    # the paths' own bytes (a non-UTF-8 name read with surrogateescape is written back as it was on disk)
    with open(paths["misclassified.csv"], "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = csv.DictWriter(f, ["path", "source", "true", "predicted", "probability", "probability_true", "sha256"])
        rows.writeheader()
        rows.writerows(result.misclassified)
    paths["results.json"].write_text(json.dumps(result.to_dict(), indent=2, default=str))
    _bar_chart(result, paths["comparison.png"])
    save_confusion_matrix(
        result.confusion,
        result.class_names,
        paths["confusion_matrix.png"],
        title=f"{result.best}: out-of-fold confusion matrix",
    )
    _reliability_chart(result, paths["reliability.png"])
    note = _gallery(result, paths["misclassified.png"])
    for kind in result.embedding_map.get("points", {}):
        _map_chart(result, kind, paths[f"embedding_map_{kind}.png"])
    if result.learning_curve:
        _learning_chart(result, paths["learning_curve.png"])
    paths["report.md"].write_text(_markdown(result, paths, note), encoding="utf-8", errors="backslashreplace")
    paths["index.html"] = _html(result, folder, paths)
    return paths


HTML_GALLERY = 200  # misclassified images on the HTML page (most confident first); the CSV lists all


def _html(result: CompareResult, folder: Path, paths: dict[str, Path]) -> Path:
    """``folder/index.html``: the report as one page, its thumbnails in ``folder/thumbs/``."""
    from tlpipe.pipeline.reports import html

    items = result.misclassified[:HTML_GALLERY]
    entries = [
        {
            "path": item["path"],
            "sha256": item.get("sha256"),
            "source": item.get("source"),
            "caption": [
                f"true {item['true']}",
                f"predicted {item['predicted']} (p={item['probability']:.2f})",
                f"p(true)={item.get('probability_true', 0.0):.2f}",
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
    confusion = result.misclassified_confusion or result.confusion
    source = (
        f"Predictions: {result.misclassified_source}"
        if result.misclassified_confusion
        else f"{result.best}'s out-of-fold predictions"
    )
    charts = [(html.relative(paths[n], folder), n[:-4].replace("_", " ")) for n in paths if n.endswith(".png")]
    heads = sorted(result.heads, key=lambda h: (-h.accuracy, -h.macro_f1))
    return html.render(
        "compare.html",
        folder,
        title=f"tlpipe compare: {result.feature_key}",
        r=result,
        best=result.head(result.best),
        columns=COLUMNS,
        heads=[(h, cells(h)) for h in heads],
        labels=result.class_names,
        cells=html.confusion_cells(confusion, result.class_names, by_cell),
        source=source,
        sections=html.gallery_sections(items, result.class_names, tiles),
        shown=len(items),
        total=len(result.misclassified),
        charts=charts,
    )


_SWEEP_COLUMNS = ["rank", "feature set", "head", "accuracy", "macro-F1", "fit s", "predict s", "extract ms/img"]


def _sweep_cells(rank: int, r: SweepRow) -> list[str]:
    cost = (
        "?"
        if r.extraction_ms is None
        else f"{r.extraction_ms:.1f}"
        + (f" (pass of {r.feature_sets_in_pass})" if (r.feature_sets_in_pass or 1) > 1 else "")
    )
    return [
        str(rank),
        r.feature_key,
        r.head,
        _pm(r.accuracy, r.accuracy_std),
        f"{r.macro_f1:.3f}",
        f"{r.fit_s:.2f}",
        f"{r.predict_s:.3f}",
        cost,
    ]


def format_sweep_table(result: SweepResult):
    """A rich table of the ranked pairs (best marked), for the CLI."""
    from rich.table import Table

    table = Table(
        title=f"{result.cv}-fold CV of every head on {len(result.results)} feature sets ({result.images} images each)"
    )
    for i, column in enumerate(_SWEEP_COLUMNS):
        table.add_column(column, justify="left" if i in (1, 2) else "right")
    for rank, r in enumerate(result.rows, 1):
        cells = _sweep_cells(rank, r)
        if rank == result.pick + 1:
            cells[2] = f"[bold green]{r.head} *[/]"
        table.add_row(*cells)
    return table


def write_sweep_report(result: SweepResult, folder: str | os.PathLike) -> dict[str, Path]:
    """Write sweep.md, sweep.csv and sweep.json into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / name for name in ("sweep.md", "sweep.csv", "sweep.json")}
    best = result.best
    lines = [
        f"# Sweep: every head on every feature set of `{result.cache}`",
        "",
        f"Best pair: **{best.head}** on `{best.feature_key}` (rank {result.pick + 1}). Why: {result.why}.",
        "",
        "| " + " | ".join(_SWEEP_COLUMNS) + " |",
        "|" + "---|" * len(_SWEEP_COLUMNS),
        *("| " + " | ".join(_sweep_cells(i, r)) + " |" for i, r in enumerate(result.rows, 1)),
        "",
        f"{result.cv}-fold stratified CV (seed {result.seed}) on the same {result.images} images for every "
        f"feature set; accuracy is mean ± standard deviation over folds; fit / predict seconds per fold; "
        f"extraction ms per image of the extract pass that filled the feature set (a pass that filled "
        f"several feature sets at once shares its cost among them).",
        "",
        f"Rows: {next(iter(result.results.values())).setup}.",
        "",
    ]
    paths["sweep.md"].write_text("\n".join(lines))
    with open(paths["sweep.csv"], "w", newline="") as f:
        writer = csv.writer(f)
        fields = list(asdict(best))
        writer.writerow(["rank", *fields])
        for i, r in enumerate(result.rows, 1):
            writer.writerow([i, *(json.dumps(v) if isinstance(v, dict) else v for v in asdict(r).values())])
    paths["sweep.json"].write_text(json.dumps(result.to_dict(), indent=2, default=str))
    return paths
