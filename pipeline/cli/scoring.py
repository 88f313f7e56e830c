"""`tlpipe score`, `tlpipe export-model`: predictions for images or a cache, and the fused classifier."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.markup import escape

from tlpipe.errors import InputError
from tlpipe.pipeline.cli._common import (
    ActorsOpt,
    AddressOpt,
    BatchSizeOpt,
    Device,
    DeviceOpt,
    EngineOpt,
    ExportFormat,
    ImagesHelp,
    JsonOpt,
    Operators,
    Precision,
    QuietOpt,
    Resize,
    ResizeFilter,
    StoreOpt,
    TrustOpt,
    _check_engine,
    _deprecated,
    _one_head,
    _progress,
    _status,
    _store,
    _value,
    app,
    console,
    out,
)
from tlpipe.pipeline.cli.output import emit_json, summary_dict

__all__ = ["export_model", "score"]


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
        None,
        "--classifier",
        help="A classifier from `tlpipe export-model` (.onnx, or .tflite with its .tflite.json) instead of --head.",
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
        raise InputError("give exactly one of --head (a saved head) or --classifier (a classifier .onnx / .tflite)")
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
            from tlpipe.pipeline.scoring.score_ray import score_ray

            summary = score_ray(source, out_path, address=address, num_actors=actors, progress=progress, **options)
        else:
            from tlpipe.pipeline.scoring.score import score as run

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
    out_path: Path = typer.Option(..., "--out", "-o", help="The classifier to write: .onnx or .tflite."),
    fmt: ExportFormat | None = typer.Option(
        None, "--format", help="onnx | tflite (TensorFlow Lite, for phones) [default: from --out's extension]."
    ),
    precision: Precision = typer.Option(
        Precision.fp32.value,
        "--precision",
        help="tflite: fp32 | fp16 (half the size) | int8 (calibrated on --images, checked against the Python head).",
    ),
    operators: Operators = typer.Option(
        Operators.standard.value,
        "--operators",
        help="onnx: standard (default ONNX operators: ONNX Runtime, OpenCV DNN, TensorRT...) | ml (skl2onnx's "
        "ai.onnx.ml operators, ONNX Runtime only).",
    ),
    images_dir: Path | None = typer.Option(
        None,
        "--images",
        help=f"{ImagesHelp}: the classifier is verified on 32 of them; int8 is calibrated on them "
        "[default: bundled photos; int8 needs them].",
    ),
    verify: Path | None = typer.Option(None, "--verify", hidden=True, help="Deprecated: use --images."),
    trust: bool = TrustOpt,
    quiet: bool = QuietOpt,
    as_json: bool = JsonOpt,
    store: Path | None = StoreOpt,
):
    """Backbone + head as one classifier: uint8 images in, class probabilities and label index out (ONNX or TFLite)."""
    from tlpipe.pipeline.scoring.fuse import export_classifier as run

    head = _one_head(head_arg, head_opt)
    if verify is not None:
        _deprecated("--verify", "--images", "export-model")
    verify = images_dir or verify
    images: list[str | os.PathLike] | None = None
    if verify is not None:
        from tlpipe.features.sources import discover

        images = [r.abspath for r in discover(verify).records]
    with _status(quiet or as_json, "building the classifier, verifying it against the Python head…"):
        info = run(
            head,
            out_path,
            format=_value(fmt),
            precision=_value(precision),
            operators=_value(operators),
            images=images,
            trust=trust,
            store=_store(store),
        )
    summary = {k: v for k, v in info.items() if not isinstance(v, (list, dict)) or k == "verification"}
    if as_json:
        emit_json({"out": out_path} | summary)
        return
    if quiet:
        return
    out.print(f"[green]wrote[/] {out_path}")
    emit_json(summary)
