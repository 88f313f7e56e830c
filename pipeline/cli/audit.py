"""`tlpipe audit`: duplicates, leaks, suspected label errors and outliers of a cached feature set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from tlpipe.errors import InputError
from tlpipe.pipeline.cli._common import KeepMissingOpt, SeedOpt, app, console, out
from tlpipe.pipeline.cli.heads import ExcludeOpt, FeaturesOpt

__all__ = ["audit"]


@app.command()
def audit(
    cache: Path = typer.Argument(..., help="HDF5 cache made by `tlpipe extract`."),
    report: Path = typer.Option(
        ..., "--report", help="Write the report folder here (Markdown, CSV, JSON, contact sheets)."
    ),
    features: str | None = FeaturesOpt,
    write_exclude: Path | None = typer.Option(
        None,
        "--write-exclude",
        help="Write the flagged rows' sha256 here, for --exclude on compare / fit-head / evaluate.",
    ),
    exclude: Path | None = ExcludeOpt,
    threshold: float | None = typer.Option(
        None,
        "--threshold",
        help="Near-duplicate cosine similarity [default: 0.88, measured for MobileNetV2 on photos: docs/guide/audit.md].",
    ),
    neighbours: int | None = typer.Option(
        None, "--neighbours", min=1, help="k of the nearest-neighbour graph [default: 20]."
    ),
    backend: str = typer.Option(
        "auto", "--backend", help="auto | sklearn (exact) | usearch (approximate, large sets; tlpipe[audit])."
    ),
    cv: int = typer.Option(5, "--cv", min=2, help="Folds of the label-error head's out-of-fold predictions."),
    seed: int = SeedOpt,
    scan_sources: bool = typer.Option(
        True,
        "--scan-sources/--no-scan-sources",
        help="Hash the cache's recorded sources for exact copies (stored once in the cache).",
    ),
    n_jobs: int | None = typer.Option(None, "--n-jobs", "-j", help="Parallel folds [default: one]."),
    keep_missing: bool = KeepMissingOpt,
):
    """Find duplicates, split leaks, label conflicts, likely label errors and outliers on cached embeddings (CPU only)."""
    from tlpipe.pipeline.audit.checks import AuditError
    from tlpipe.pipeline.audit.checks import audit as run

    tuned: dict[str, Any] = {k: v for k, v in (("threshold", threshold), ("neighbours", neighbours)) if v is not None}
    try:
        with console.status("auditing (neighbours, out-of-fold head, cleanlab, contact sheets)…"):
            result = run(
                cache,
                features,
                report=report,
                write_exclude=write_exclude,
                exclude=exclude,
                backend=backend,
                cv=cv,
                seed=seed,
                n_jobs=n_jobs,
                scan_sources=scan_sources,
                keep_missing=keep_missing,
                **tuned,
            )
    except AuditError as exc:
        raise InputError(str(exc)) from None
    s = result.summary()
    out.print(
        f"[bold]{escape(str(cache))}[/] · feature set {result.feature_key} · {result.rows} rows"
        + (f" ({result.excluded} excluded)" if result.excluded else "")
        + f" · {result.seconds:.1f} s"
    )
    out.print(
        f"  duplicate clusters: {s['clusters']} ({s['exact_clusters']} exact, {s['near_clusters']} near; cosine >= "
        f"{result.threshold}); split leaks: {s['split_leaks']}; label conflicts: {s['label_conflicts']}"
    )
    out.print(
        f"  likely label errors: {s['label_issues_flagged']}; outliers: {s['outliers_flagged']}; flagged rows: {s['flagged_rows']}"
    )
    for note in result.notes:
        console.print(f"  [yellow]note:[/] {escape(note)}")
    out.print(f"  report: {report / 'report.md'}")
    if write_exclude is not None:
        out.print(f"  exclude list: {write_exclude} (use --exclude {write_exclude} on compare, fit-head, evaluate)")
