"""The `tlpipe` command line: thin wrappers over library functions. Heavy imports happen inside commands,
so `tlpipe --help` and `tlpipe fit-head` start fast and run without TensorFlow or ONNX Runtime."""

from __future__ import annotations

import json
import logging
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from tlpipe.pipeline.output import Output, emit_json, summary_dict, table


class _Group(typer.core.TyperGroup):
    """Lists each command with its whole first sentence, wrapped (click would cut it with "...")."""

    def format_commands(self, ctx, formatter) -> None:
        rows = [
            (name, cmd.get_short_help_str(limit=10_000))
            for name in self.list_commands(ctx)
            if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden
        ]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


# Plain click help (rich_markup_mode=None): wrapped to the terminal, never cut, and "[tf]" stays "[tf]".
# So help strings are plain text: write "[default: x]", not "[default: x]".
app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console(stderr=True)
out = Output()
JsonOpt = typer.Option(False, "--json", help="Print one JSON document with the summary instead of text.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary text.")
BatchSizeOpt = typer.Option(32, "--batch-size", min=1, help="Images per inference batch.")
DeviceOpt = typer.Option(
    "auto",
    "--device",
    help="auto (CUDA when it attaches, else CPU) | cpu | cuda (strict: fails if CUDA does not attach).",
)
NJobsOpt = typer.Option(None, "--n-jobs", "-j", help="Parallel jobs [default: all cores].")
ImagesHelp = "Your photos (folder or CSV manifest) used for checking"
TrustOpt = typer.Option(
    False, "--trust", help="Load a head whose checksum/metadata cannot be verified (runs its code)."
)
SeedOpt = typer.Option(0, "--seed", help="Random seed (folds, hold-out, initialisation).")


def _version(value: bool) -> None:
    if value:
        from tlpipe import __version__

        print(f"tlpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print tlpipe's version and exit."
    ),
):
    """Transfer learning for images: ONNX backbones, an HDF5 embedding cache, scikit-learn heads.

    Exit codes: 0 ok, 1 an unexpected error (a bug: with a traceback), 2 bad input or usage (one line
    starting with "error:"), 3 --strict found failed images, 130 interrupted."""


StoreOpt = typer.Option(
    None, "--store", envvar="TLPIPE_MODEL_STORE", help="Model store folder [default: ~/.cache/tlpipe/models]."
)
WeightsDirOpt = typer.Option(
    None, "--weights-dir", envvar="TLPIPE_WEIGHTS_DIR", help="Folder searched for local ImageNet weight files."
)
WeightsOpt = typer.Option(
    "imagenet", "--weights", "-w", help="imagenet (Keras download/cache), none (random init), a .h5 file, or a folder."
)
BackboneOpt = typer.Option("mobilenet_v2", "--backbone", "-b", help="Registry name (see `tlpipe backbones`).")
AnyBackboneOpt = typer.Option(
    "mobilenet_v2",
    "--backbone",
    "-b",
    help="A registry name (see `tlpipe backbones`), a model-store key, or a folder such as a fine-tune's output.",
)
SizeOpt = typer.Option(None, "--size", help="Square input size [default: the backbone's].")
LayerOpt = typer.Option(
    None, "--layer", help="Truncate at this named layer (a cut point, see `tlpipe backbones --cuts`)."
)
# Choices (Enums: typer turns them into click Choices) are checked before a command runs, so nothing is read or
# written for a bad value, and --help lists them. Same values as the library's own lists (registry POOLINGS, runtime
# DEVICES, quantize PRECISIONS, images RESIZE_MODES, fastdecode RESIZE_FILTERS); tests/pipeline/test_cli.py checks they agree.
Pooling = Enum("Pooling", {v: v for v in ("avg", "max", "none")}, type=str)
Device = Enum("Device", {v: v for v in ("auto", "cpu", "cuda")}, type=str)
Precision = Enum("Precision", {v: v for v in ("fp32", "int8", "fp16")}, type=str)
Resize = Enum("Resize", {v: v for v in ("squash", "crop")}, type=str)
ResizeFilter = Enum("ResizeFilter", {v: v for v in ("bilinear", "antialias")}, type=str)
Dtype = Enum("Dtype", {v: v for v in ("float32", "float16")}, type=str)


def _value(choice):
    """The plain string of a choice (None stays None)."""
    return getattr(choice, "value", choice)


PoolingOpt = typer.Option(Pooling.avg.value, "--pooling", help="avg | max | none (flatten).")
PrecisionOpt = typer.Option(
    Precision.fp32.value,
    "--precision",
    help="fp32 | int8 (CPU; calibrated on your photos, checked against fp32) | fp16 (GPU).",
)
ResizeOpt = typer.Option(
    Resize.squash.value,
    help="squash (like Keras image_dataset_from_directory) | crop (short side, center crop). Part of the feature set's identity.",
)
SizesOpt = typer.Option(
    None,
    "--size",
    help="Square input size, or several comma-separated (224,288: one feature set each, all in one pass) [default: the backbone's].",
)
LayersOpt = typer.Option(
    None,
    "--layer",
    help="Cut point(s), comma-separated (see `tlpipe backbones --cuts`): one feature set per layer, from one verified multi-output export per size; a+b joins cut points into one feature set (each pooled, then concatenated) [default: the last layer].",
)
TtaOpt = typer.Option(
    "none",
    "--tta",
    help="Test-time augmentation inside the model: none | flip (image + mirror) | flip+crops (5 crops of a 1/0.875 larger decode + mirrors); the mean embedding.",
)
ResizeFilterOpt = typer.Option(
    ResizeFilter.bilinear.value,
    "--resize-filter",
    help="bilinear (default: Keras' non-antialiased bilinear resize through the fast JPEG path, libjpeg-turbo + "
    "OpenCV; decode+resize measured 2.4x cheaper per image, linear probe within 0.5 point) | antialias "
    "(Pillow's antialiased bilinear, what feature sets made before this option hold). Part of the feature set's "
    "identity.",
)


def _sizes(text: str | None) -> list[int | None]:
    """--size 224 or 224,288 -> [224] / [224, 288]; absent -> [None] (the backbone's default)."""
    if not text:
        return [None]
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"--size takes whole numbers separated by commas, not {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise typer.BadParameter(f"--size takes positive sizes, not {text!r}")
    return sizes


def _layers(text: str | None) -> list[str | None]:
    """--layer a,b -> ['a', 'b']; absent -> [None] (the backbone's last output)."""
    return [part.strip() for part in text.split(",") if part.strip()] if text else [None]


UseAugmentedOpt = typer.Option(
    False,
    "--use-augmented",
    help="Also train on the feature set's augmented views (extract --augment N) of the training images only; evaluation rows stay the originals.",
)
EngineOpt = typer.Option("local", "--engine", help="local | ray (a Ray cluster: tlpipe[ray]).")
AddressOpt = typer.Option(
    None, "--address", help="Ray cluster address ('auto' joins a running one) [default: start Ray here]."
)
ActorsOpt = typer.Option(None, "--actors", help="Ray inference actors [default: one per GPU, else one per node].")


def _deprecated(old: str, new: str, command: str) -> None:
    """One line on stderr for an old spelling that still works for this release."""
    console.print(
        f"[yellow]warning:[/] {command} {old} is deprecated and will be removed in the next release; use {new}",
        highlight=False,
        soft_wrap=True,
    )


def _backbone_source(backbone: str, model: str | None, command: str) -> tuple[str | None, str | None]:
    """``--backbone`` as (registry name, None) or (None, store key or folder); the old ``--model`` still works."""
    if model is not None:
        _deprecated("--model", "--backbone (a registry name, store key or folder)", command)
        return None, model
    from tlpipe.backbones.registry import get_backbone

    try:
        get_backbone(backbone)
    except (KeyError, ValueError):
        if (
            Path(backbone).exists() or "-" in backbone
        ):  # a folder, or a store key such as mobilenet_v2_1.0-224-full-avg-...
            return None, backbone
        raise
    return backbone, None


def _one_head(positional: Path | None, option: Path | None) -> Path:
    """The head given as the positional argument or as --head (exactly one)."""
    if (positional is None) == (option is None):
        raise typer.BadParameter("give the head once: as the argument or as --head")
    return positional or option


def _status(quiet: bool, text: str):
    """A spinner on stderr while something runs, unless --quiet."""
    from contextlib import nullcontext

    return nullcontext() if quiet else console.status(text)


def _check_engine(engine: str) -> None:
    if engine not in ("local", "ray"):
        raise ValueError(f"--engine must be local or ray, not {engine!r}")


def _store(path: Path | None):
    from tlpipe.backbones.store import ModelStore

    return ModelStore(path)


@contextmanager
def _progress(quiet: bool, label: str):
    """Yields a factory ``(total, done) -> advance(n)`` backed by a rich progress bar (or nothing)."""
    if quiet:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("[cyan]{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as bar:

        def start(total: int, done: int = 0):
            task = bar.add_task(label, total=total, completed=done, rate="")

            def advance(n: int = 1) -> None:
                bar.advance(task, n)
                speed = bar.tasks[task].speed
                if speed:
                    bar.update(task, rate=f"{speed:6.1f} img/s")

            return advance

        yield start


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
            raise ValueError("several sizes or layers export fp32 only; make int8/fp16 variants one at a time")
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
def extract(
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
    if engine == "ray" and augment:
        raise ValueError("--augment runs on the local engine")
    if engine == "ray" and (several or tta != "none"):
        raise ValueError(
            "--engine ray extracts one feature set without TTA; use the local engine for --tta or "
            "several --size/--layer values"
        )
    backbone, model = _backbone_source(backbone, model, "extract")
    choice = ModelChoice(
        backbone, weights, weights_dir, sizes[0], layers[0], pooling, precision, model, _store(store), tta
    )
    options = dict(
        choice=choice,
        device=device,
        batch_size=batch_size,
        dtype=dtype,
        resize=resize,
        threads=threads,
        allow_outside_root=allow_outside_root,
        recalibrate=recalibrate,
        resize_filter=resize_filter,
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
        for kind, items in (("failed", summary.failures), ("skipped", summary.skipped)):
            for path, reason in items[:20]:
                console.print(f"  [red]{kind}[/] {escape(path)}: {escape(reason)}", highlight=False)
            if len(items) > 20:
                console.print(f"  … and {len(items) - 20} more {kind} (tlpipe info {escape(str(out_path))})")
    if strict and summary.failed:
        raise typer.Exit(3)


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

    d = describe(cache)
    if as_json:
        emit_json(d)
        return
    say = lambda text: out.print(text, highlight=False, soft_wrap=True)  # noqa: E731
    say(f"[bold]{escape(d['path'])}[/] (cache v{d['version']}, id {d['cache_id'][:8]}): {d['images']} images")
    say(f"  classes: {escape(', '.join(f'{k} {v}' for k, v in d['per_class'].items()) or 'none')}")
    say(f"  splits: {escape(', '.join(f'{k} {v}' for k, v in d['per_split'].items()))}")
    for i, source in enumerate(d["sources"]):
        say(f"  source {i}: {escape(source['path'])} ({source['images']} images)")
    for key, fs in d["feature_sets"].items():
        say(
            f"  feature set [cyan]{escape(key)}[/]: {fs['rows']} x {fs['dim']} {fs['dtype']} "
            f"({fs['backbone']} @ {fs['input_size']}, layer {fs['layer'] or 'full'}, {fs['pooling']}, "
            f"resize {fs['resize']}, filter {fs.get('resize_filter', 'antialias')}, weights {fs['weights']}"
            f"{', TTA ' + fs['tta'] if fs.get('tta', 'none') != 'none' else ''}"
            f"{', extracted at %.1f img/s' % fs['extraction']['images_per_second'] if fs.get('extraction') else ''}"
            f"{', %d augmented views (%d per image)' % (fs['augmented']['rows'], fs['augmented']['views']) if fs.get('augmented') else ''})"
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


def _pca(value: str):
    """--pca: auto (the library's rule, heads.resolve_pca), none, components (int >= 1) or variance kept (0-1)."""
    if value in ("auto", "none"):
        return None if value == "none" else "auto"
    try:
        number = float(value)
    except ValueError:
        raise ValueError(
            f"--pca must be auto, none, a number of components or a variance share in (0, 1), not {value!r}"
        ) from None
    return int(number) if number >= 1 else number


PcaOpt = typer.Option(
    "auto",
    "--pca",
    help="auto (PCA-256 before rbf-svm on large sets, as compare scores) | none | components (int) | variance kept (0-1).",
)
HeadsOpt = typer.Option("logreg,svm,rbf-svm,mlp", "--models", help="Comma-separated heads: logreg, svm, rbf-svm, mlp.")
FeaturesOpt = typer.Option(
    None,
    "--features",
    help="Feature set key (or unique prefix) when the cache holds several; for compare also 'all' or globs (comma-separated): a sweep of every head on each.",
)
ClassWeightOpt = typer.Option(None, "--class-weight", help="'balanced' to weight classes by inverse frequency.")
ExcludeOpt = typer.Option(
    None,
    "--exclude",
    help="Leave out the rows of this exclude list (sha256 per line, e.g. from `tlpipe audit --write-exclude`).",
)


def _print_balance(balance: dict) -> None:
    ratio = balance.get("imbalance_ratio")
    counts = ", ".join(f"{k} {v}" for k, v in balance["counts"].items() if v)
    out.print(f"  classes: {counts}" + (f" (imbalance {ratio:.1f}x)" if ratio and ratio > 1.5 else ""))


@app.command("fit-head")
def fit_head(
    cache: Path = typer.Argument(..., help="HDF5 cache made by `tlpipe extract`."),
    model: str = typer.Option("logreg", "--model", "-m", help="logreg | svm | rbf-svm | mlp."),
    out_path: Path = typer.Option(
        Path("head.joblib"), "--out", "-o", help="Where to save the head (+ .json metadata)."
    ),
    features: str | None = FeaturesOpt,
    search: bool = typer.Option(False, "--search", help="Small hyperparameter search with stratified CV first."),
    cv: int = typer.Option(5, "--cv", min=2, help="Folds for --search."),
    seed: int = SeedOpt,
    class_weight: str | None = ClassWeightOpt,
    pca: str = PcaOpt,
    n_jobs: int | None = NJobsOpt,
    quiet: bool = QuietOpt,
    as_json: bool = JsonOpt,
    engine: str = EngineOpt,
    address: str | None = AddressOpt,
    exclude: Path | None = ExcludeOpt,
    use_augmented: bool = UseAugmentedOpt,
):
    """Train one head on the cache (train split, else a stratified hold-out) and save it with its metadata.

    The sidecar records the evaluation rows (by image sha256): `tlpipe evaluate HEAD CACHE` scores them."""
    from tlpipe.pipeline.engine import parallel_backend
    from tlpipe.pipeline.train import train_head

    pca_arg = _pca(pca)
    with _status(quiet or as_json, f"fitting {model}…"), parallel_backend(engine, address):
        result = train_head(
            cache,
            model,
            out_path,
            features=features,
            search=search,
            cv=cv,
            seed=seed,
            class_weight=class_weight,
            pca=pca_arg,
            n_jobs=n_jobs,
            exclude=exclude,
            use_augmented=use_augmented,
        )
    if as_json:
        emit_json(
            {
                "path": result.path,
                "sidecar": f"{result.path}.json",
                "setup": result.setup,
                "balance": result.balance,
                "search": result.info,
                "evaluation": result.evaluation.to_dict() if result.evaluation is not None else None,
                "metadata": result.metadata,
            }
        )
        return
    if result.imbalanced and not class_weight and quiet:
        console.print("[yellow]warning:[/] classes are imbalanced: consider --class-weight balanced")
    if quiet:
        return
    out.print(
        f"[green]saved[/] {result.path} (+ {result.path.name}.json) · feature set {result.metadata['feature_set']['key']}"
    )
    out.print(f"  {result.setup}")
    _print_balance(result.balance)
    if result.imbalanced and not class_weight:
        console.print("  [yellow]classes are imbalanced: consider --class-weight balanced[/]")
    if result.info.get("search"):
        out.print(f"  search: best {result.info['params']} (CV accuracy {result.info['cv_accuracy']:.4f})")
    if result.evaluation is not None:
        e = result.evaluation
        loss = f", log-loss {e.log_loss:.4f}" if e.log_loss is not None else ""
        out.print(f"  held-out: accuracy {e.accuracy:.4f}, macro-F1 {e.macro_f1:.4f}{loss} on {e.rows_used}")


@app.command()
def compare(
    cache: Path = typer.Argument(..., help="HDF5 cache made by `tlpipe extract`."),
    models: str = HeadsOpt,
    cv: int = typer.Option(5, "--cv", min=2, help="Cross-validation folds."),
    report: Path | None = typer.Option(None, "--report", help="Write a report folder (Markdown, CSV/JSON, charts)."),
    features: str | None = FeaturesOpt,
    seed: int = SeedOpt,
    search: bool = typer.Option(False, "--search", help="Search each head's small grid; report its best point."),
    class_weight: str | None = ClassWeightOpt,
    all_rows: bool = typer.Option(
        False, "--all-rows", help="Cross-validate on every labelled row, test split included."
    ),
    n_jobs: int | None = NJobsOpt,
    pca: str = PcaOpt,
    save_best: Path | None = typer.Option(
        None,
        "--save-best",
        help="Save the best head, refitted with the parameters compare chose on all training rows (+ .json sidecar).",
    ),
    quiet: bool = QuietOpt,
    as_json: bool = JsonOpt,
    engine: str = EngineOpt,
    address: str | None = AddressOpt,
    exclude: Path | None = ExcludeOpt,
    use_augmented: bool = UseAugmentedOpt,
    umap: bool = typer.Option(
        False,
        "--umap",
        help="Add a UMAP map of the embeddings to the --report (needs tlpipe[umap]; ~10 s of numba compilation).",
    ),
):
    """Cross-validate heads on the training rows, refit the best and score it once on the held-out rows."""
    from tlpipe.features.cache import describe, read_feature_set
    from tlpipe.pipeline.compare import _COLUMNS, _cells, compare_heads, write_report
    from tlpipe.pipeline.compare import save_best as save_best_head
    from tlpipe.pipeline.engine import parallel_backend

    names = [m.strip() for m in models.split(",") if m.strip()]
    from tlpipe.pipeline.compare import is_sweep

    if is_sweep(features):
        if save_best is not None or exclude is not None:
            raise ValueError(
                "--save-best and --exclude work on one feature set: pick it with --features KEY "
                "(the sweep prints the fit-head command for its best pair)"
            )
        _sweep(
            cache,
            features,
            names,
            cv,
            seed,
            search,
            class_weight,
            all_rows,
            n_jobs,
            engine,
            address,
            report,
            use_augmented,
        )
        return
    if umap and report is None:
        raise ValueError("--umap draws a map in the report: give --report DIR too")
    if umap:
        from tlpipe.pipeline.compare import _import_umap

        try:
            _import_umap()
        except ImportError:
            raise ValueError("--umap needs umap-learn, which is not installed: pip install 'tlpipe[umap]'") from None
    fs = read_feature_set(cache, features, exclude=exclude)
    views = None
    if use_augmented:
        from tlpipe.features.cache import CacheError, read_views

        views = read_views(cache, fs)
        if views is None:
            raise CacheError(
                f"{cache}: feature set {fs.key} has no augmented views; run tlpipe extract --augment N first"
            )
    if save_best is not None and all_rows:
        raise ValueError("--save-best needs held-out rows to score the refitted head: drop --all-rows")
    with (
        _status(quiet or as_json, f"cross-validating {', '.join(names)} ({cv} folds)…"),
        parallel_backend(engine, address),
    ):
        result = compare_heads(
            fs,
            names,
            cv=cv,
            seed=seed,
            search=search,
            class_weight=class_weight,
            holdout=not all_rows,
            n_jobs=n_jobs,
            pca=_pca(pca),
            learning_curve=report is not None,
            views=views,
        )
    written = None
    if report is not None:
        roots = [s["path"] if isinstance(s, dict) else s for s in describe(cache)["sources"]]
        written = write_report(result, report, image_roots=roots, umap=umap)
    if save_best is not None:
        save_best_head(result, fs, save_best, cache_path=cache.resolve())
    if as_json:
        emit_json(result.to_dict() | ({"report": {k: str(v) for k, v in written.items()}} if written else {}))
        return
    if quiet:
        return
    heads = sorted(result.heads, key=lambda h: (-h.accuracy, -h.macro_f1))
    rows = [[(f"[bold green]{h.name} *[/]" if h.name == result.best else h.name), *_cells(h)[1:]] for h in heads]
    table(
        out,
        _COLUMNS,
        rows,
        title=f"{result.cv}-fold CV on {result.rows} rows of {result.feature_key}",
        right=[c for i, c in enumerate(_COLUMNS) if i not in (0, 6)],
    )
    out.print(f"  {result.setup}\n  best: [bold]{result.best}[/] · {result.seconds:.1f} s\n  why: {result.choice}")
    if result.holdout:
        h = result.holdout
        out.print(
            f"  held-out: {h['head']} refitted on {h['train_rows']} training rows, accuracy {h['accuracy']:.4f}, "
            f"macro-F1 {h['macro_f1']:.4f} on {h['rows']} held-out rows (chance {result.chance:.3f})"
        )
    if written is not None:
        out.print(f"  report: {report / 'report.md'} ({', '.join(p.name for p in written.values())})")
    if save_best is not None:
        out.print(f"[green]saved[/] {save_best} (+ {save_best.name}.json): {result.best} as compare scored it")


def _sweep(
    cache,
    features,
    names,
    cv,
    seed,
    search,
    class_weight,
    all_rows,
    n_jobs,
    engine,
    address,
    report,
    use_augmented=False,
) -> None:
    """compare --features all|GLOB: every head on every matching feature set, pairs ranked."""
    from tlpipe.pipeline.compare import format_sweep_table, sweep, write_sweep_report
    from tlpipe.pipeline.engine import parallel_backend

    with (
        console.status(f"cross-validating {', '.join(names)} on every feature set matching {features!r}…"),
        parallel_backend(engine, address),
    ):
        result = sweep(
            cache,
            features,
            names,
            cv=cv,
            seed=seed,
            search=search,
            class_weight=class_weight,
            holdout=not all_rows,
            n_jobs=n_jobs,
            use_augmented=use_augmented,
        )
    out.print(format_sweep_table(result))
    best = result.best
    out.print(
        f"  best pair: [bold]{best.head}[/] on {best.feature_key} · {result.seconds:.1f} s\n  why: {result.why}\n"
        f"  fit it: tlpipe fit-head {cache} --features {best.feature_key} --model {best.head}"
    )
    if report is not None:
        written = write_sweep_report(result, report)
        out.print(f"  report: {report / 'sweep.md'} ({', '.join(p.name for p in written.values())})")


@app.command()
def evaluate(
    first: Path = typer.Argument(
        ..., metavar="HEAD", help="A head saved by `tlpipe fit-head` (or, with --head, the cache)."
    ),
    second: Path | None = typer.Argument(None, metavar="CACHE", help="HDF5 cache holding the head's feature set."),
    head_opt: Path | None = typer.Option(None, "--head", help="A head saved by `tlpipe fit-head`."),
    split: str | None = typer.Option(
        None, "--split", help="train | val | test | all | holdout [default: test, else the head's recorded hold-out]."
    ),
    features: str | None = FeaturesOpt,
    report: Path | None = typer.Option(
        None, "--report", help="Write evaluation.json and confusion_matrix.png here."
    ),
    allow_train_rows: bool = typer.Option(
        False, "--allow-train-rows", help="Score rows the head was trained on too (an optimistic score)."
    ),
    trust: bool = TrustOpt,
    exclude: Path | None = ExcludeOpt,
    as_json: bool = JsonOpt,
):
    """Metrics, per-class report and confusion matrix of one head on held-out rows of a cache."""
    from tlpipe.features.cache import read_feature_set
    from tlpipe.pipeline.artifacts import load_head
    from tlpipe.pipeline.evaluate import evaluate_head, save_confusion_matrix

    if head_opt is not None and second is not None:
        raise typer.BadParameter("give the head once: `evaluate HEAD CACHE` or `evaluate CACHE --head HEAD`")
    head, cache = (head_opt, first) if head_opt is not None else (first, second)
    if cache is None:
        raise typer.BadParameter("missing the cache: `evaluate HEAD CACHE` or `evaluate CACHE --head HEAD`")
    estimator, metadata = load_head(head, trust=trust)
    key = features or (metadata.get("feature_set") or {}).get("key")
    fs = read_feature_set(cache, key, exclude=exclude)
    result = evaluate_head(estimator, metadata, fs, split=split, allow_train_rows=allow_train_rows)
    split = result.split
    if report is not None:
        report.mkdir(parents=True, exist_ok=True)
        (report / "evaluation.json").write_text(json.dumps(result.to_dict() | {"excluded": fs.excluded}, indent=2))
        save_confusion_matrix(
            result.confusion, result.labels, report / "confusion_matrix.png", title=f"{head.name} on {split}"
        )
    if as_json:
        emit_json({"head": head, "cache": cache} | result.to_dict())
        return
    loss = f", log-loss {result.log_loss:.4f}" if result.log_loss is not None else ""
    out.print(
        f"[bold]{head}[/] on {result.rows_used}: accuracy {result.accuracy:.4f}, "
        f"macro-F1 {result.macro_f1:.4f}{loss}" + (f"; {fs.excluded} rows excluded by {exclude}" if exclude else "")
    )
    rows = [
        [escape(label), *(f"{r.get(k, 0):.3f}" for k in ("precision", "recall", "f1-score")), int(r.get("support", 0))]
        for label in result.labels
        for r in [result.report.get(label, {})]
    ]
    table(out, ("class", "precision", "recall", "f1", "support"), rows, right=("precision", "recall", "f1", "support"))
    if report is not None:
        out.print(f"  wrote {report / 'evaluation.json'} and {report / 'confusion_matrix.png'}")


@app.command()
def score(
    source: Path = typer.Argument(
        ..., help="Folder, CSV manifest, or an HDF5 cache (scores its feature set; --head only)."
    ),
    out_path: Path = typer.Option(
        ..., "--out", "-o", help="Predictions: .csv, .jsonl or .parquet. A re-run resumes it."
    ),
    head: Path | None = typer.Option(
        None, "--head", help="A head saved by `tlpipe fit-head` (its backbone comes from the model store)."
    ),
    classifier: Path | None = typer.Option(
        None, "--classifier", help="A fused classifier .onnx from `tlpipe export-model` instead of --head."
    ),
    model: Path | None = typer.Option(None, "--model", hidden=True, help="Deprecated: use --classifier."),
    cache: Path | None = typer.Option(
        None, "--cache", help="Reuse embeddings this cache already holds for the head's feature set."
    ),
    top_k: int = typer.Option(3, "--top-k", min=1, help="How many best classes each row lists."),
    device: Device = DeviceOpt,
    batch_size: int = BatchSizeOpt,
    resize: Resize | None = typer.Option(
        None,
        help="squash | crop [default: the mode recorded with the head or fused model; a different one is refused].",
    ),
    resize_filter: ResizeFilter | None = typer.Option(
        None,
        "--resize-filter",
        help="bilinear | antialias [default: the filter recorded with the head or fused model (antialias for those made before it was recorded); a different one is refused].",
    ),
    workers: int | None = typer.Option(None, help="Decode threads [default: cores + 1]."),
    threads: int | None = typer.Option(None, help="ONNX Runtime threads [default: cores]."),
    trust: bool = TrustOpt,
    allow_outside_root: bool = typer.Option(
        False, "--allow-outside-root", help="Accept manifest paths outside the manifest's folder."
    ),
    quiet: bool = QuietOpt,
    as_json: bool = JsonOpt,
    store: Path | None = StoreOpt,
    engine: str = EngineOpt,
    address: str | None = AddressOpt,
    actors: int | None = ActorsOpt,
):
    """Predict a label for every image: one row each (path, sha256, true label when known, label, probability, top-k, error); resumable."""
    resize, device, resize_filter = _value(resize), _value(device), _value(resize_filter)
    _check_engine(engine)
    if model is not None:
        _deprecated("--model", "--classifier", "score")
        classifier = classifier or model
    model = classifier
    if (head is None) == (model is None):
        raise ValueError("give exactly one of --head (a saved head) or --classifier (a fused classifier .onnx)")
    options = dict(
        head=head,
        model=model,
        cache=cache,
        top_k=top_k,
        device=device,
        batch_size=batch_size,
        trust=trust,
        store=_store(store),
        resize=resize,
        threads=threads,
        allow_outside_root=allow_outside_root,
        resize_filter=resize_filter,
    )
    with _progress(quiet, "score") as progress:
        if engine == "ray":
            from tlpipe.pipeline.score_ray import score_ray

            summary = score_ray(source, out_path, address=address, num_actors=actors, progress=progress, **options)
        else:
            from tlpipe.pipeline.score import score as run

            summary = run(source, out_path, workers=workers, progress=progress, **options)
    if as_json:
        emit_json(summary_dict(summary))
    elif not quiet:
        out.print(
            f"[bold]{escape(summary.out)}[/] · {summary.provider}\n  {summary.total} images: {summary.scored} scored, "
            f"{summary.reused} from the cache, {summary.already_done} already in the output, {summary.failed} failed "
            f"(rows with an error), {len(summary.skipped)} inputs skipped\n  {summary.seconds:.1f} s, "
            f"{summary.images_per_second:.1f} img/s"
        )
        for path, reason in summary.skipped[:20]:  # named, not only counted: they get no row
            console.print(f"  [red]skipped[/] {escape(path)}: {escape(reason)}", highlight=False)
        if len(summary.skipped) > 20:
            console.print(f"  … and {len(summary.skipped) - 20} more skipped")


@app.command("export-model")
def export_model(
    head_arg: Path | None = typer.Argument(
        None, metavar="HEAD", help="A head saved by `tlpipe fit-head` (or give --head)."
    ),
    head_opt: Path | None = typer.Option(None, "--head", help="A head saved by `tlpipe fit-head`."),
    out_path: Path = typer.Option(..., "--out", "-o", help="The fused classifier .onnx to write."),
    images_dir: Path | None = typer.Option(
        None, "--images", help=f"{ImagesHelp}: the fused model is verified on 32 of them [default: bundled photos]."
    ),
    verify: Path | None = typer.Option(None, "--verify", hidden=True, help="Deprecated: use --images."),
    trust: bool = TrustOpt,
    quiet: bool = QuietOpt,
    as_json: bool = JsonOpt,
    store: Path | None = StoreOpt,
):
    """Fuse backbone + head into one ONNX model: uint8 images in, class probabilities and label index out."""
    from tlpipe.pipeline.fuse import export_model as run

    head = _one_head(head_arg, head_opt)
    if verify is not None:
        _deprecated("--verify", "--images", "export-model")
    verify = images_dir or verify
    images = None
    if verify is not None:
        from tlpipe.features.sources import discover

        images = [r.abspath for r in discover(verify).records[:32]]
    with _status(quiet or as_json, "converting the head (skl2onnx), merging with the backbone, verifying…"):
        info = run(head, out_path, trust=trust, store=_store(store), verify_images=images)
    summary = {k: v for k, v in info.items() if not isinstance(v, (list, dict)) or k == "verification"}
    if as_json:
        emit_json({"out": out_path} | summary)
        return
    if quiet:
        return
    out.print(f"[green]wrote[/] {out_path}")
    emit_json(summary)


@app.command()
def finetune(
    source: Path = typer.Argument(..., help="Labelled images: class folders, split folders or a CSV manifest."),
    out_dir: Path = typer.Option(
        ..., "--out", "-o", help="Output folder (history, curves, checkpoints, backbone/, classifier.onnx)."
    ),
    backbone: str = BackboneOpt,
    weights: str = WeightsOpt,
    weights_dir: Path | None = WeightsDirOpt,
    size: int | None = SizeOpt,
    pooling: str = typer.Option("avg", "--pooling", help="avg | max."),
    unfreeze_from: str | None = typer.Option(
        None, "--unfreeze-from", help="Train from this layer / cut point / block prefix on (e.g. block_15)."
    ),
    unfreeze_last: int | None = typer.Option(
        None, "--unfreeze-last", help="Train the last N blocks [default: the last one]."
    ),
    head: Path | None = typer.Option(
        None, "--head", help="Warm-start the classifier from this logreg head (same backbone)."
    ),
    trust: bool = TrustOpt,
    epochs: int = typer.Option(10, "--epochs", min=1, help="Most epochs to train (early stopping may end sooner)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per training batch."),
    learning_rate: float = typer.Option(1e-4, "--lr", help="Adam learning rate (keep it low)."),
    backbone_lr: float | None = typer.Option(
        None,
        "--backbone-lr",
        help="Learning rate of the unfrozen backbone layers [default: --lr]; lower than --lr to move them less than the classifier.",
    ),
    dropout: float = typer.Option(0.2, "--dropout", help="Dropout rate before the classifier layer."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Flip, rotation, zoom, contrast while training."),
    class_weight: str | None = ClassWeightOpt,
    patience: int = typer.Option(
        3, "--patience", min=1, help="Epochs without a better validation accuracy before stopping."
    ),
    seed: int = SeedOpt,
    val_fraction: float = typer.Option(
        0.2, "--val-fraction", help="Hold-out fraction for validation when the source has no val/test split."
    ),
    resize: str = typer.Option("squash", help="squash | crop (as used for extraction)."),
    resize_filter: ResizeFilter = ResizeFilterOpt,
    quiet: bool = QuietOpt,
    store: Path | None = StoreOpt,
):
    """Fine-tune the last blocks in TensorFlow, warm-started from a head; re-export the backbone to ONNX.

    A killed run resumes from its last epoch when started again with the same --out."""
    from tlpipe.backbones.choice import ModelChoice
    from tlpipe.pipeline.finetune import finetune as run

    choice = ModelChoice(backbone, weights, weights_dir, size, pooling=pooling, store=_store(store))
    result = run(
        source,
        out_dir,
        choice=choice,
        unfreeze_from=unfreeze_from,
        unfreeze_last=unfreeze_last,
        head=head,
        trust=trust,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        backbone_learning_rate=backbone_lr,
        dropout=dropout,
        augment=augment,
        class_weight=class_weight,
        patience=patience,
        seed=seed,
        val_fraction=val_fraction,
        resize=resize,
        resize_filter=_value(resize_filter),
        progress=not quiet,
    )
    warm = f"{result.warm_start_val_accuracy:.4f}" if result.warm_start_val_accuracy is not None else "n/a (no --head)"
    test = (
        f"  test split: accuracy {result.test.accuracy:.4f}, loss {result.test.loss:.4f} ({result.test.images} images)\n"
        if result.test
        else ""
    )
    out.print(
        f"[green]fine-tuned[/] from {result.unfreeze_from} · {escape(result.setup)}\n"
        f"  validation: accuracy at the warm start {warm}; best (lowest loss {result.best_val_loss:.4f}) at epoch "
        f"{result.best_epoch}{' = the start' if result.best_epoch == 0 else ''}, accuracy {result.best_val_accuracy:.4f} "
        f"({result.epochs_run} epochs run, {', '.join(f'{s:.0f}' for s in result.epoch_seconds)} s each)\n{test}"
        f"  backbone: {result.backbone_entry.key} (use: tlpipe extract DATA --backbone {out_dir})\n"
        f"  classifier: {result.classifier_path} (use: tlpipe score DATA --classifier {result.classifier_path})\n"
        f"  history: {result.history_path}, curves: {result.curves_path}"
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

    backbone, model = _backbone_source(backbone, model, "bench")
    if batch:
        _deprecated("--batch", "--batch-size", "bench")
    batch = batch_size or batch or [1, 8, 32]
    choice = ModelChoice(backbone, weights, weights_dir, size, layer, pooling, model=model, store=_store(store))
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
        help="Near-duplicate cosine similarity [default: 0.88, measured for MobileNetV2 on photos, see README].",
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
):
    """Find duplicates, split leaks, label conflicts, likely label errors and outliers on cached embeddings (CPU only)."""
    from tlpipe.pipeline.audit import AuditError
    from tlpipe.pipeline.audit import audit as run

    tuned = {k: v for k, v in (("threshold", threshold), ("neighbours", neighbours)) if v is not None}
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
                **tuned,
            )
    except AuditError as exc:
        raise ValueError(str(exc)) from None
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


Strategy = Enum("Strategy", {v: v for v in ("hybrid", "margin", "entropy", "diverse")}, type=str)


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
        help="Near-duplicate cosine similarity: never suggested beside a labelled photo, nor twice in a batch [default: 0.88, audit's, measured for MobileNetV2 on photos].",
    ),
    trust: bool = TrustOpt,
    as_json: bool = JsonOpt,
):
    """Rank the cache's unlabelled photos and write the ones to label next (active learning; CPU only)."""
    from tlpipe.pipeline.suggest import suggest as run

    tuned = {"threshold": threshold} if threshold is not None else {}
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


from tlpipe.pipeline.new_layers import NEW_LAYERS_HELP  # noqa: E402 (no TensorFlow: the option's help)


@app.command("custom-model")
def custom_model(
    source: Path = typer.Argument(..., help="Labelled images: class folders, split folders or a CSV manifest."),
    out_dir: Path = typer.Option(
        ..., "--out", "-o", help="Output folder (history, curves, checkpoints, classifier.onnx)."
    ),
    backbone: str = BackboneOpt,
    weights: str = WeightsOpt,
    weights_dir: Path | None = WeightsDirOpt,
    size: int | None = SizeOpt,
    layer: str = typer.Option(
        ...,
        "--layer",
        help="Cut the backbone at this layer (a cut point, see `tlpipe backbones --cuts`, or any layer name of the Keras model); everything up to it is frozen.",
    ),
    new_layers: str = typer.Option(
        ..., "--new-layers", help=f"The new layers, trained on the cut point's feature maps: {NEW_LAYERS_HELP}."
    ),
    epochs: int = typer.Option(
        20, "--epochs", min=0, help="Most epochs to train the new layers (early stopping may end sooner)."
    ),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per training batch."),
    learning_rate: float = typer.Option(1e-3, "--lr", help="Adam learning rate of the new layers."),
    augment: bool = typer.Option(
        False,
        "--augment/--no-augment",
        help="Flip, rotation, zoom, contrast while training (off: the frozen part's feature maps are computed once and cached).",
    ),
    class_weight: str | None = ClassWeightOpt,
    patience: int = typer.Option(
        3, "--patience", min=1, help="Epochs without a lower validation loss before stopping."
    ),
    seed: int = SeedOpt,
    val_fraction: float = typer.Option(
        0.2, "--val-fraction", help="Hold-out fraction for validation when the source has no val/test split."
    ),
    unfreeze_from: str | None = typer.Option(
        None,
        "--unfreeze-from",
        help="After the new layers converge, also train the backbone from this layer / block prefix on.",
    ),
    unfreeze_last: int | None = typer.Option(
        None, "--unfreeze-last", help="... or its last N blocks (blocks end at cut points)."
    ),
    unfreeze_epochs: int | None = typer.Option(
        None, "--unfreeze-epochs", min=0, help="Epochs of that second phase [default: --epochs]."
    ),
    backbone_lr: float | None = typer.Option(
        None, "--backbone-lr", help="Learning rate of the unfrozen backbone layers [default: --lr / 10]."
    ),
    cache: bool = typer.Option(
        True,
        "--cache-feature-maps/--no-cache-feature-maps",
        help="Without --augment, compute the frozen part once and train the new layers on its feature maps.",
    ),
    resize: str = typer.Option("squash", help="squash | crop."),
    resize_filter: ResizeFilter = ResizeFilterOpt,
    quiet: bool = QuietOpt,
):
    """Train new layers on a truncated, frozen backbone in TensorFlow; export one ONNX classifier for `tlpipe score`.

    A killed run resumes from its last epoch when started again with the same --out."""
    from tlpipe.backbones.choice import ModelChoice
    from tlpipe.pipeline.custom_model import fit_custom_model

    choice = ModelChoice(backbone, weights, weights_dir, size, layer)
    result = fit_custom_model(
        source,
        out_dir,
        choice=choice,
        new_layers=new_layers,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        augment=augment,
        class_weight=class_weight,
        patience=patience,
        seed=seed,
        val_fraction=val_fraction,
        unfreeze_from=unfreeze_from,
        unfreeze_last=unfreeze_last,
        unfreeze_epochs=unfreeze_epochs,
        backbone_learning_rate=backbone_lr,
        cache_feature_maps=cache,
        resize=resize,
        resize_filter=_value(resize_filter),
        progress=not quiet,
    )
    params = result.params
    test = (
        f"  test split: accuracy {result.test.accuracy:.4f}, loss {result.test.loss:.4f} ({result.test.images} images)\n"
        if result.test
        else ""
    )
    maps = (
        f"feature maps cached ({result.feature_map_seconds:.1f} s once)"
        if result.feature_maps_cached
        else "no feature-map cache"
    )
    unfrozen = (
        f", {params['unfrozen_backbone']:,} backbone parameters unfrozen from {result.unfreeze_from}"
        if result.unfreeze_from
        else ""
    )
    out.print(
        f"[green]custom model[/] {escape(result.new_layers)} on {escape(backbone)} up to {escape(layer)} · {escape(result.setup)}\n"
        f"  parameters: {params['frozen']:,} frozen, {params['trainable']:,} trainable, "
        f"{params['non_trainable_new']:,} non-trainable in the new layers{unfrozen}\n"
        f"  validation: best (lowest loss {result.best_val_loss:.4f}) at epoch {result.best_epoch}, accuracy "
        f"{result.best_val_accuracy:.4f} ({result.epochs_run} epochs, {', '.join(f'{s:.1f}' for s in result.epoch_seconds)} s each; {maps})\n{test}"
        f"  classifier: {result.classifier_path} (use: tlpipe score DATA --classifier {result.classifier_path})\n"
        f"  history: {result.history_path}, curves: {result.curves_path}"
    )


USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, ValueError, KeyError, PermissionError)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input or a missing extra: one line, no traceback."""
    from tlpipe.backbones import MissingExtra, ProviderError, StoreError, VerificationError, WeightsUnavailable
    from tlpipe.features.cache import CacheError

    found = [MissingExtra, ProviderError, StoreError, VerificationError, WeightsUnavailable, CacheError]
    for module, name in (
        ("tlpipe.pipeline.artifacts", "HeadError"),
        ("tlpipe.pipeline.score", "ScoreError"),
        ("tlpipe.pipeline.fuse", "FuseError"),
        ("tlpipe.pipeline.suggest.core", "SuggestError"),
    ):
        if module in sys.modules:  # only what the command imported
            found.append(getattr(sys.modules[module], name))
    return USER_ERRORS + tuple(found)


def main() -> None:
    """Entry point. Exit codes: 0 ok; 1 unexpected error (traceback: a bug); 2 bad input or usage (one line
    starting with ``error:``; click's usage errors too); 3 ``--strict`` found failed images; 130 interrupted."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted", highlight=False)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - sorted below
        if isinstance(exc, _user_errors()):
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            console.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
