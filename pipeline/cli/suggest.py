"""`tlpipe suggest`: which unlabelled photos to label next (active learning on the cached embeddings)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from tlpipe.pipeline.cli._common import JsonOpt, SeedOpt, TrustOpt, _status, _value, app, console, out
from tlpipe.pipeline.cli.output import emit_json, table

__all__ = ["Strategy", "suggest"]


class Strategy(str, Enum):
    hybrid = "hybrid"
    margin = "margin"
    entropy = "entropy"
    diverse = "diverse"


@app.command()
def suggest(
    cache: Path = typer.Argument(..., help="HDF5 cache made by `tlpipe extract`, holding unlabelled photos."),
    head: Path | None = typer.Option(
        None, "--head", help="A head fitted on this cache's feature set (fit-head); without it, a cold start."
    ),
    n: int = typer.Option(20, "--n", "-n", min=1, help="Photos to suggest."),
    strategy: Strategy = typer.Option(
        Strategy.hybrid.value,
        "--strategy",
        help="hybrid (uncertainty mixed with diversity) | margin | entropy | diverse (typiclust-like; no head needed).",
    ),
    features: str | None = typer.Option(
        None, "--features", help="Feature set key (or unique prefix) [default: the head's, else the only one]."
    ),
    seed: int = SeedOpt,
    out_path: Path = typer.Option(
        Path("picks.csv"), "--out", "-o", help="Write the picks here (CSV with an empty label column to fill in)."
    ),
    report: Path | None = typer.Option(
        None, "--report", help="Also write a contact sheet (picks.png) and an HTML page (picks.html) here."
    ),
    threshold: float | None = typer.Option(
        None,
        "--threshold",
        help="Near-duplicate cosine similarity: never suggested beside a labelled photo, nor twice in a batch "
        "[default: 0.88, audit's, measured for MobileNetV2 on photos].",
    ),
    trust: bool = TrustOpt,
    as_json: bool = JsonOpt,
):
    """Rank the cache's unlabelled photos and write the ones to label next (active learning; CPU only)."""
    from tlpipe.pipeline.suggest import suggest as run

    tuned: dict[str, Any] = {"threshold": threshold} if threshold is not None else {}
    with _status(as_json, "ranking unlabelled photos…"):
        result = run(
            cache,
            head,
            n,
            strategy=_value(strategy),
            features=features,
            seed=seed,
            out=out_path,
            report=report,
            trust=trust,
            **tuned,
        )
    if as_json:
        emit_json(result.to_dict())
        return
    out.print(
        f"[bold]{escape(str(cache))}[/] · feature set {result.feature_key} · {result.labelled} labelled, "
        f"{result.unlabelled} unlabelled · strategy {result.strategy_used} · {result.seconds:.1f} s"
    )
    table(
        out,
        ("rank", "path", "guess", "why"),
        [(p.rank, escape(p.path), escape(p.guess) or "-", escape(p.reason)) for p in result.picks],
        right=("rank",),
    )
    for note in result.notes:
        console.print(f"  [yellow]note:[/] {escape(note)}")
    out.print(f"  picks: {result.out} (fill in the label column, or move the files into their class folders)")
    if result.report:
        out.print(f"  report: {result.report['picks.html']}")
