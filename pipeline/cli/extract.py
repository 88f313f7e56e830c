"""`tlpipe extract`, `tlpipe info`, `tlpipe export-cache`: images into the HDF5 cache, and what it holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from tlpipe.features.names import display_name
from tlpipe.pipeline.cli._common import (
    ActorsOpt,
    AddressOpt,
    AnyBackboneOpt,
    BatchSizeOpt,
    Device,
    DeviceOpt,
    Dtype,
    EngineOpt,
    JsonOpt,
    LayersOpt,
    Pooling,
    PoolingOpt,
    Precision,
    PrecisionOpt,
    QuietOpt,
    Resize,
    ResizeFilter,
    ResizeFilterOpt,
    ResizeOpt,
    SizesOpt,
    StoreOpt,
    TtaOpt,
    WeightsDirOpt,
    WeightsOpt,
    _backbone_source,
    _check_engine,
    _layers,
    _progress,
    _sizes,
    _store,
    _value,
    app,
    console,
    out,
)
from tlpipe.pipeline.cli.heads import FeaturesOpt
from tlpipe.pipeline.cli.output import emit_json, summary_dict

__all__ = ["export_cache", "extract", "info"]


@app.command()
def extract(
    ctx: typer.Context,
    source: Path = typer.Argument(
        ..., help="Folder (class folders, split folders or flat) or CSV manifest (path[,label][,split])."
    ),
    out_path: Path = typer.Option(Path("cache.h5"), "--out", "-o", help="HDF5 cache to create or append to."),
    backbone: str = AnyBackboneOpt,
    weights: str = WeightsOpt,
    weights_dir: Path | None = WeightsDirOpt,
    size: str | None = SizesOpt,
    layer: str | None = LayersOpt,
    pooling: Pooling = PoolingOpt,
    tta: str = TtaOpt,
    model: str | None = typer.Option(None, "--model", hidden=True, help="Deprecated: use --backbone."),
    device: Device = DeviceOpt,
    batch_size: int = BatchSizeOpt,
    dtype: Dtype = typer.Option(Dtype.float32.value, help="float32 | float16 storage of embeddings."),
    resize: Resize = ResizeOpt,
    resize_filter: ResizeFilter = ResizeFilterOpt,
    precision: Precision = PrecisionOpt,
    recalibrate: bool = typer.Option(
        False, "--recalibrate", help="Calibrate int8 again on this source instead of reusing the stored variant."
    ),
    workers: int | None = typer.Option(None, help="Decode threads [default: cores + 1]."),
    threads: int | None = typer.Option(
        None, help="ONNX Runtime threads per stream [default: the cores split between streams]."
    ),
    streams: int | None = typer.Option(
        None, "--streams", min=1, help="Concurrent ONNX Runtime sessions on the CPU [default: 2, or 1 on one core]."
    ),
    strict: bool = typer.Option(False, "--strict", help="Exit non-zero if any image failed."),
    allow_outside_root: bool = typer.Option(
        False, "--allow-outside-root", help="Accept manifest paths outside the manifest's folder."
    ),
    quiet: bool = QuietOpt,
    as_json: bool = JsonOpt,
    store: Path | None = StoreOpt,
    engine: str = EngineOpt,
    address: str | None = AddressOpt,
    actors: int | None = ActorsOpt,
    augment: int = typer.Option(
        0,
        "--augment",
        min=0,
        help="Also embed N augmented views per image (crop, rotation, flip, colour jitter; seeded by content) as extra training rows for compare/fit-head --use-augmented.",
    ),
    augment_seed: int = typer.Option(0, "--augment-seed", help="Seed of the --augment views."),
):
    """Embed images into the HDF5 cache: resumable, crash-safe, one row per unique image (by content)."""
    pooling, precision, resize, device, dtype = map(_value, (pooling, precision, resize, device, dtype))
    resize_filter = _value(resize_filter)
    _check_engine(engine)
    from tlpipe.backbones.choice import ModelChoice
    from tlpipe.backbones.tta import check_tta

    check_tta(tta)
    sizes, layers = _sizes(size), _layers(layer)
    several = len(sizes) > 1 or len(layers) > 1
    registry_name, model = _backbone_source(backbone, model, "extract")
    choice = ModelChoice(
        registry_name, weights, weights_dir, sizes[0], layers[0], pooling, precision, model, _store(store), tta
    )

    # A setting left at its default is not "asked": a feature-set key given as --backbone then decides it.
    def defaulted(name: str) -> bool:
        source = ctx.get_parameter_source(name)
        return source is not None and source.name == "DEFAULT"

    options: dict[str, Any] = dict(
        choice=choice,
        device=device,
        batch_size=batch_size,
        dtype=dtype,
        resize=None if defaulted("resize") else resize,
        threads=threads,
        allow_outside_root=allow_outside_root,
        recalibrate=recalibrate,
        resize_filter=None if defaulted("resize_filter") else resize_filter,
    )
    with _progress(quiet, "extract") as progress:
        if engine == "ray":
            from tlpipe.features.ray_engine import extract_ray

            summary = extract_ray(source, out_path, address=address, num_actors=actors, progress=progress, **options)
        else:
            from tlpipe.features.extract import extract as run

            summary = run(
                source,
                out_path,
                workers=workers,
                streams=streams,
                progress=progress,
                sizes=sizes if several else None,
                layers=layers if several else None,
                augment=augment,
                augment_seed=augment_seed,
                **options,
            )
    # the warnings themselves (source layout, manifest, label conflicts) are logged by the library
    if summary.label_conflicts and not as_json:
        for conflict in summary.label_conflicts[:10]:
            console.print(
                "  [yellow]conflict[/] "
                + escape(" vs ".join(f"{o['path']} ({o['label'] or 'unlabelled'})" for o in conflict["occurrences"])),
                highlight=False,
            )
    if as_json:
        emit_json(summary_dict(summary))
    elif not quiet:
        sets = ", ".join(summary.keys) if len(summary.keys) > 1 else summary.key
        out.print(
            f"[bold]{escape(summary.out)}[/] · feature set{'s' if len(summary.keys) > 1 else ''} {sets} (resize {summary.resize}, filter {summary.resize_filter}) · {summary.provider}\n"
            f"  {summary.total} images: {summary.embedded} embedded, {summary.cached} already cached, "
            f"{summary.duplicates} duplicate content, {summary.failed} failed; {len(summary.skipped)} inputs skipped"
            + (
                f"; {summary.relabelled} cached rows updated (moved or relabelled, not re-embedded)"
                if summary.relabelled
                else ""
            )
            + "\n"
            f"  {summary.seconds:.1f} s, {summary.images_per_second:.1f} img/s",
            highlight=False,
        )
        for a in summary.augmented:
            out.print(
                f"  augmented views of {a.key}: {a.embedded} embedded for {a.images} images ({a.views} per image, "
                f"seed {a.seed}), {a.cached} images had them all; {a.seconds:.1f} s",
                highlight=False,
            )
        for path, reason in summary.gone[:20]:  # the count is in the library's warning
            console.print(f"  [yellow]{reason}[/] {escape(path)}", highlight=False)
        if len(summary.gone) > 20:
            console.print(
                f"  … and {len(summary.gone) - 20} more gone or changed (tlpipe info {escape(str(out_path))})"
            )
        for kind, items in (("failed", summary.failures), ("skipped", summary.skipped)):
            for path, reason in items[:20]:
                console.print(f"  [red]{kind}[/] {escape(display_name(path))}: {escape(reason)}", highlight=False)
            if len(items) > 20:
                console.print(f"  … and {len(items) - 20} more {kind} (tlpipe info {escape(str(out_path))})")
    if strict and summary.failed:
        raise typer.Exit(3)


def _speed_note(fs: dict) -> str:
    speed = (fs.get("extraction") or {}).get("images_per_second")
    return f", extracted at {speed:.1f} img/s" if speed is not None else ""


def _augmented_note(fs: dict) -> str:
    views = fs.get("augmented")
    return f", {views['rows']} augmented views ({views['views']} per image)" if views else ""


@app.command()
def info(
    cache: Path = typer.Argument(..., help="HDF5 cache file."),
    as_json: bool = JsonOpt,
    limit: int = typer.Option(
        20, "--limit", min=0, help="Failed/skipped inputs and label conflicts listed by name (--json lists all)."
    ),
):
    """Show what a cache holds: images, classes, splits, sources, feature sets (with resize mode), label conflicts,
    failed and skipped inputs by name and reason."""
    from tlpipe.features.cache import describe

    d = describe(cache, embeddings=True)
    if as_json:
        emit_json(d)
        return
    say = lambda text: out.print(text, highlight=False, soft_wrap=True)  # noqa: E731
    say(f"[bold]{escape(d['path'])}[/] (cache v{d['version']}, id {d['cache_id'][:8]}): {d['images']} images")
    say(f"  classes: {escape(', '.join(f'{k} {v}' for k, v in d['per_class'].items()) or 'none')}")
    say(f"  splits: {escape(', '.join(f'{k} {v}' for k, v in d['per_split'].items()))}")
    for i, source in enumerate(d["sources"]):
        say(f"  source {i}: {escape(display_name(source['path']))} ({source['images']} images)")
    if missing := d.get("missing"):
        say(
            f"  [yellow]{len(missing)} cached image{'s' if len(missing) != 1 else ''} whose source file is gone or "
            "changed[/] since extract (not counted above; left out of fit-head, compare, audit and evaluate unless "
            "--keep-missing):"
        )
        for item in missing[:limit]:
            say(f"    {item['reason']} {escape(item['path'])}")
        if len(missing) > limit:
            say(f"    … and {len(missing) - limit} more (--json lists all)")
    for key, fs in d["feature_sets"].items():
        say(
            f"  feature set [cyan]{escape(key)}[/]: {fs['rows']} x {fs['dim']} {fs['dtype']} "
            f"({fs['backbone']} @ {fs['input_size']}, layer {fs['layer'] or 'full'}, {fs['pooling']}, "
            f"resize {fs['resize']}, filter {fs.get('resize_filter', 'antialias')}, colour {fs.get('colour', 'none')}, "
            f"weights {fs['weights']}"
            f"{', TTA ' + fs['tta'] if fs.get('tta', 'none') != 'none' else ''}"
            f"{_speed_note(fs)}"
            f"{_augmented_note(fs)})"
        )
        if fs.get("nonfinite_rows"):
            bad = fs["nonfinite"]
            say(
                f"    [yellow]{len(bad)} row{'s' if len(bad) != 1 else ''} with a non-finite embedding (NaN or inf)[/]"
                " (score gives them error rows; fit-head, compare and audit leave them out; extract them again): "
                + escape(", ".join(b["path"] for b in bad[:limit]))
                + (f" … and {len(bad) - limit} more (--json lists all)" if len(bad) > limit else "")
            )
    conflicts = d["label_conflicts"]
    if conflicts:
        say(
            f"  [yellow]{len(conflicts)} label conflict{'s' if len(conflicts) != 1 else ''}[/] (same content under different labels; left out of "
            "training and evaluation):"
        )
        for conflict in conflicts[:limit]:
            say(
                "    "
                + escape(" vs ".join(f"{o['path']} ({o['label'] or 'unlabelled'})" for o in conflict["occurrences"]))
            )
        if len(conflicts) > limit:
            say(f"    … and {len(conflicts) - limit} more (--json lists all)")
    for stage, title in (("decode", "failed"), ("listing", "skipped")):
        items = [f for f in d["failures"] if f["stage"] == stage]
        if items:
            say(f"  {len(items)} {title} inputs:")
            for item in items[:limit]:
                say(f"    {escape(item['path'])}: {escape(item['reason'])}")
            if len(items) > limit:
                say(f"    … and {len(items) - limit} more (--json lists all)")


@app.command("export-cache")
def export_cache(
    cache: Path = typer.Argument(..., help="HDF5 cache made by `tlpipe extract`."),
    out_path: Path = typer.Option(..., "--out", "-o", help="File to write: .parquet or .npz."),
    fmt: str | None = typer.Option(None, "--format", help="parquet | npz [default: from --out's extension]."),
    features: str | None = FeaturesOpt,
    as_json: bool = JsonOpt,
):
    """Write one feature set of a cache as Parquet (pandas, Spark, DuckDB) or NumPy .npz (paths, labels, splits, embeddings)."""
    from tlpipe.features.cache import export_cache as run

    done = run(cache, out_path, fmt, features=features)
    if as_json:
        emit_json(done)
    else:
        out.print(
            f"[green]wrote[/] {escape(done['out'])} ({done['format']}): {done['rows']} rows x {done['dim']} "
            f"of feature set {done['feature_set']}"
        )
