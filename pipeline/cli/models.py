"""`tlpipe backbones`, `tlpipe export`, `tlpipe bench`: the registry, the verified ONNX export, speed here."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from tlpipe.errors import InputError
from tlpipe.pipeline.cli._common import (
    AnyBackboneOpt,
    BackboneOpt,
    Device,
    DeviceOpt,
    ImagesHelp,
    LayerOpt,
    LayersOpt,
    Pooling,
    PoolingOpt,
    Precision,
    PrecisionOpt,
    QuietOpt,
    Resize,
    ResizeOpt,
    SizeOpt,
    SizesOpt,
    StoreOpt,
    TtaOpt,
    WeightsDirOpt,
    WeightsOpt,
    _backbone_source,
    _deprecated,
    _layers,
    _sizes,
    _status,
    _store,
    _value,
    app,
    console,
    out,
)
from tlpipe.pipeline.cli.output import emit_json, table

__all__ = ["backbones", "bench", "export"]


@app.command()
def backbones(
    as_json: bool = typer.Option(False, "--json", help="Print the registry as JSON."),
    cuts: bool = typer.Option(
        False, "--cuts", help="List every cut point with its channels and grid, one per line under each backbone."
    ),
):
    """List the backbone registry: sizes, preprocessing contract, embedding dimensions, cut points."""
    from tlpipe.backbones.registry import PREPROCESSING_MODES, list_backbones

    specs = list_backbones()
    if as_json:
        import dataclasses

        emit_json([dataclasses.asdict(s) for s in specs])
        return
    name = lambda s: s.name + (f" = {s.aliases[0]}" if s.aliases else "")  # noqa: E731
    if cuts:  # one line per cut point under each backbone: readable at 80 columns, and grep/awk-able
        for s in specs:
            out.print(
                f"{name(s)}: {s.default_size} px, {len(s.cut_points)} cut points (layer, channels, grid)",
                highlight=False,
            )
            for c in s.cut_points:
                out.print(f"  {c.layer:<28} {c.channels:>5}  {c.grid}x{c.grid}", highlight=False)
        return
    rows = [
        (
            name(s),
            s.default_size,
            s.preprocessing,
            s.channels,
            f"{s.embedding_dim('none'):,}",
            f"{s.params / 1e6:.1f}M",
            len(s.cut_points),
        )
        for s in specs
    ]
    table(
        out,
        ("name", "size", "prep", "dim", "flat dim", "params", "cuts"),
        rows,
        title=None if out.plain else "tlpipe backbones (embedding dims at the default size; --cuts lists cut points)",
        right=("size", "dim", "flat dim", "params", "cuts"),
    )
    if not out.plain:
        for mode, text in PREPROCESSING_MODES.items():
            out.print(f"  [bold]{mode}[/]: {text}")


@app.command()
def export(
    backbone: str = BackboneOpt,
    weights: str = WeightsOpt,
    weights_dir: Path | None = WeightsDirOpt,
    size: str | None = SizesOpt,
    layer: str | None = LayersOpt,
    pooling: Pooling = PoolingOpt,
    tta: str = TtaOpt,
    opset: int = typer.Option(17, help="ONNX opset for tf2onnx."),
    seed: int = typer.Option(0, help="Seed for --weights none."),
    force: bool = typer.Option(False, "--force", help="Export again even when the store has it."),
    precision: Precision = PrecisionOpt,
    images: Path | None = typer.Option(
        None, "--images", help=f"{ImagesHelp}: int8 is calibrated on them and checked against fp32."
    ),
    calibration: Path | None = typer.Option(None, "--calibration", hidden=True, help="Deprecated: use --images."),
    resize: Resize = ResizeOpt,
    quiet: bool = QuietOpt,
    store: Path | None = StoreOpt,
):
    """Export a backbone to ONNX (uint8 RGB images in, float32 embeddings out), verified against Keras.

    With --precision int8|fp16, also make that variant of it, verified against fp32, as its own store entry.
    Several --layer values export one model per --size with one output per layer, each verified."""
    pooling, precision, resize = _value(pooling), _value(precision), _value(resize)
    from tlpipe.backbones.export import export_backbone, export_layers
    from tlpipe.backbones.quantize import check_precision
    from tlpipe.backbones.tta import check_tta

    check_precision(precision)
    if calibration is not None:
        _deprecated("--calibration", "--images", "export")
        images = images or calibration
    calibration = images
    check_tta(tta)
    sizes, layers = _sizes(size), _layers(layer)
    if len(sizes) > 1 or len(layers) > 1:
        if precision != "fp32":
            raise InputError("several sizes or layers export fp32 only; make int8/fp16 variants one at a time")
        for one_size in sizes:
            with _status(
                quiet, f"exporting {backbone} at {one_size or 'its default size'} with {len(layers)} outputs…"
            ):
                found = export_layers(
                    backbone, layers, weights, one_size, pooling, weights_dir, _store(store), opset, seed, force, tta
                )
            out.print(f"[green]stored[/] {found.entry.key}\n  model: {found.entry.model_path}")
            for name, single in found.outputs:
                v = single.metadata["verification"]
                out.print(
                    f"  output {name} (N, {single.embedding_dim}) -> feature set {single.key}; "
                    f"min cosine vs Keras {v['min_cosine']:.6f}"
                )
        return
    with _status(quiet, f"exporting {backbone} (build, convert with tf2onnx, verify against Keras)…"):
        entry = export_backbone(
            backbone, weights, sizes[0], layers[0], pooling, weights_dir, _store(store), opset, seed, force, tta
        )
    if precision != "fp32":
        from tlpipe.features.calibration import variant_for
        from tlpipe.features.sources import discover

        records = discover(calibration).records if calibration is not None else None
        with _status(quiet, f"making the {precision} variant (calibrate, verify against fp32)…"):
            entry = variant_for(entry, precision, _store(store), records, resize, recalibrate=calibration is not None)
    if quiet:
        return
    m = entry.metadata
    if precision != "fp32":
        v = m["verification_vs_fp32"]
        out.print(
            f"[green]stored[/] {entry.key} ({precision} of {m['base_key']})\n  model: {entry.model_path}\n"
            f"  {m['quantization']['method']}\n  vs fp32 on {v['images']} held-out photos: mean cosine "
            f"{v['mean_cosine']:.4f}, min {v['min_cosine']:.4f} (needs mean >= {v['threshold_mean_cosine']})"
        )
        return
    v = m["verification"]
    out.print(
        f"[green]stored[/] {entry.key}\n  model: {entry.model_path}\n  input: uint8 (N, {m['input_size']}, "
        f"{m['input_size']}, 3) RGB -> embeddings (N, {m['embedding_dim']}); preprocessing '{m['preprocessing']}' in the graph\n"
        f"  weights: {m['weights']['source']} {m['weights'].get('path') or ''}\n"
        f"  verified on {v['images']} photos: max |diff| {v['max_abs_diff']:.2e}, min cosine {v['min_cosine']:.6f}\n"
        f"  timings (s): {m.get('timings_s')}"
    )


@app.command()
def bench(
    backbone: str = AnyBackboneOpt,
    weights: str = WeightsOpt,
    weights_dir: Path | None = WeightsDirOpt,
    size: int | None = SizeOpt,
    layer: str | None = LayerOpt,
    pooling: Pooling = PoolingOpt,
    model: str | None = typer.Option(None, "--model", hidden=True, help="Deprecated: use --backbone."),
    images: Path | None = typer.Option(
        None,
        "--images",
        help=f"{ImagesHelp}: timed, decoded, and used to calibrate int8 [default: scikit-learn's sample photos].",
    ),
    precision: list[str] = typer.Option(
        ["fp32"], "--precision", "-p", help="Also time this variant: int8 | fp16 (repeatable)."
    ),
    batch_size: list[int] | None = typer.Option(
        None, "--batch-size", min=1, help="Batch sizes to sweep (repeatable) [default: 1, 8, 32]."
    ),
    batch: list[int] | None = typer.Option(None, "--batch", hidden=True, help="Deprecated: use --batch-size."),
    threads: list[int] | None = typer.Option(
        None, "--threads", help="ONNX Runtime thread counts to sweep (repeatable) [default: 1 and all cores]."
    ),
    device: Device = DeviceOpt,
    keras: bool = typer.Option(
        True, "--keras/--no-keras", help="Time Keras model(x, training=False) in the same run (needs tlpipe[tf])."
    ),
    seconds: float = typer.Option(2.0, "--seconds", min=0.0, help="Minimum timed seconds per configuration."),
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
    store: Path | None = StoreOpt,
):
    """Time a backbone here: ONNX Runtime per precision, batch size and thread count (images/s, p50/p95 per
    batch) against Keras on the same images, and decoding on its own; says whether int8 pays off on this CPU."""
    pooling, device = _value(pooling), _value(device)
    from tlpipe.backbones.choice import ModelChoice
    from tlpipe.pipeline.bench import format_report, run_bench

    def say(message: str) -> None:
        if not as_json:
            console.print(f"[dim]{escape(message)}[/]")

    registry_name, model = _backbone_source(backbone, model, "bench")
    if batch:
        _deprecated("--batch", "--batch-size", "bench")
    batch = batch_size or batch or [1, 8, 32]
    choice = ModelChoice(registry_name, weights, weights_dir, size, layer, pooling, model=model, store=_store(store))
    report = run_bench(
        choice=choice,
        images=images,
        precisions=precision,
        batch_sizes=batch,
        threads=threads,
        device=device,
        keras=keras,
        min_seconds=seconds,
        log=say,
    )
    if as_json:
        emit_json(report.to_dict())
    else:
        out.print(escape(format_report(report)), highlight=False, soft_wrap=True)
