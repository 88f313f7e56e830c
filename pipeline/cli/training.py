"""`tlpipe finetune`, `tlpipe custom-model`: training in TensorFlow, exported as a verified classifier."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from tlpipe.pipeline.cli._common import (
    BackboneOpt,
    QuietOpt,
    ResizeFilter,
    ResizeFilterOpt,
    SeedOpt,
    SizeOpt,
    StoreOpt,
    TrustOpt,
    WeightsDirOpt,
    WeightsOpt,
    _store,
    _value,
    app,
    out,
)
from tlpipe.pipeline.cli.heads import ClassWeightOpt
from tlpipe.pipeline.training.new_layers import NEW_LAYERS_HELP

__all__ = ["custom_model", "finetune"]


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
    from tlpipe.pipeline.training.finetune import finetune as run

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


@app.command("custom-model")
def custom_model(
    source: Path = typer.Argument(..., help="Labelled images: class folders, split folders or a CSV manifest."),
    out_dir: Path = typer.Option(
        ..., "--out", "-o", help="Output folder (history, curves, checkpoints, classifier.onnx, summary.json)."
    ),
    backbone: str = typer.Option(
        "mobilenet_v2",
        "--backbone",
        "-b",
        help="Registry name (see `tlpipe backbones`), or none: no backbone, the new layers train from scratch on the image (needs --size, takes no --layer).",
    ),
    weights: str = WeightsOpt,
    weights_dir: Path | None = WeightsDirOpt,
    size: int | None = SizeOpt,
    layer: str | None = typer.Option(
        None,
        "--layer",
        help="Cut the backbone at this layer (a cut point, see `tlpipe backbones --cuts`, or any layer name of the Keras model); everything up to it is frozen. Required with a registry backbone, refused with --backbone none.",
    ),
    new_layers: str = typer.Option(
        ...,
        "--new-layers",
        help=f"The new layers, trained on the cut point's feature maps (with --backbone none: on the image): {NEW_LAYERS_HELP}.",
    ),
    preprocessing: str | None = typer.Option(
        None,
        "--preprocessing",
        help="With --backbone none: how pixels reach the first layer: unit (x / 255, [0, 1]) [default], tf ([-1, 1]), torch, caffe. A registry backbone uses its own.",
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
    from tlpipe.pipeline.training.custom_model import fit_custom_model

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
        preprocessing=preprocessing,
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
    if result.layer is None:  # from scratch
        where = f"from scratch on {result.size} px images ({escape(result.preprocessing)} pixels)"
        counted = f"  parameters: {params['trainable']:,} trainable (random init, seed {seed}), "
    else:
        where = f"on {escape(backbone)} up to {escape(result.layer)}"
        counted = f"  parameters: {params['frozen']:,} frozen, {params['trainable']:,} trainable, "
    unfrozen = (
        f", {params['unfrozen_backbone']:,} backbone parameters unfrozen from {result.unfreeze_from}"
        if result.unfreeze_from
        else ""
    )
    out.print(
        f"[green]custom model[/] {escape(result.new_layers)} {where} · {escape(result.setup)}\n"
        f"{counted}"
        f"{params['non_trainable_new']:,} non-trainable in the new layers{unfrozen}\n"
        f"  validation: best (lowest loss {result.best_val_loss:.4f}) at epoch {result.best_epoch}, accuracy "
        f"{result.best_val_accuracy:.4f} ({result.epochs_run} epochs, {', '.join(f'{s:.1f}' for s in result.epoch_seconds)} s each; {maps})\n{test}"
        f"  classifier: {result.classifier_path} (use: tlpipe score DATA --classifier {result.classifier_path})\n"
        f"  history: {result.history_path}, curves: {result.curves_path}, summary: {result.out_dir / 'summary.json'}"
    )
