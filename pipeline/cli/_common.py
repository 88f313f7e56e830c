"""What every command shares: the app, the options spelled once, progress and messages."""

from __future__ import annotations

from contextlib import contextmanager
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

from tlpipe.errors import InputError
from tlpipe.pipeline.cli.output import Output

# The order `tlpipe --help` lists the commands in: the workflow's order, whatever module defines them.
COMMAND_ORDER = (
    "backbones",
    "export",
    "extract",
    "info",
    "fit-head",
    "compare",
    "evaluate",
    "score",
    "export-model",
    "finetune",
    "custom-model",
    "audit",
    "suggest",
    "bench",
    "export-cache",
    "demo",
)


class _Group(typer.core.TyperGroup):
    """Lists each command with its whole first sentence, wrapped (click would cut it with "..."), in
    :data:`COMMAND_ORDER`."""

    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
        return sorted(names, key=lambda name: (rank.get(name, len(rank)), name))

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
# DEVICES, quantize PRECISIONS, images RESIZE_MODES, fastdecode RESIZE_FILTERS); tests/pipeline/cli/test_commands.py checks they agree.
class Pooling(str, Enum):
    avg = "avg"
    max = "max"
    none = "none"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(str, Enum):
    fp32 = "fp32"
    int8 = "int8"
    fp16 = "fp16"


class ExportFormat(str, Enum):
    onnx = "onnx"
    tflite = "tflite"


class Operators(str, Enum):
    standard = "standard"
    ml = "ml"


class Resize(str, Enum):
    squash = "squash"
    crop = "crop"


class ResizeFilter(str, Enum):
    bilinear = "bilinear"
    antialias = "antialias"


class Dtype(str, Enum):
    float32 = "float32"
    float16 = "float16"


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
    return [*sizes]


def _layers(text: str | None) -> list[str | None]:
    """--layer a,b -> ['a', 'b']; absent -> [None] (the backbone's last output)."""
    return [part.strip() for part in text.split(",") if part.strip()] if text else [None]


KeepMissingOpt = typer.Option(
    False,
    "--keep-missing",
    help="Keep the rows whose source file the last extract found gone or changed (left out by default, with a count).",
)
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
    head = positional if positional is not None else option
    assert head is not None  # exactly one of them, checked above
    return head


def _status(quiet: bool, text: str):
    """A spinner on stderr while something runs, unless --quiet."""
    from contextlib import nullcontext

    return nullcontext() if quiet else console.status(text)


def _check_engine(engine: str) -> None:
    if engine not in ("local", "ray"):
        raise InputError(f"--engine must be local or ray, not {engine!r}")


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
