"""`tlpipe demo`: the whole job on built-in data, offline."""

from __future__ import annotations

from pathlib import Path

import typer

from tlpipe.pipeline.cli._common import BackboneOpt, StoreOpt, WeightsDirOpt, _store, app, out

__all__ = ["demo"]


@app.command()
def demo(
    out_dir: Path = typer.Option(
        Path("demo-output"), "--out", "-o", help="Folder for the data, cache, heads and report."
    ),
    backbone: str = BackboneOpt,
    weights_dir: Path | None = WeightsDirOpt,
    store: Path | None = StoreOpt,
):
    """The whole job on built-in data (scikit-learn's digits), offline: export, extract, compare, fit-head, evaluate."""
    from tlpipe.pipeline.demo import run_demo

    run_demo(out_dir, backbone=backbone, weights_dir=weights_dir, store=_store(store), console=out)
