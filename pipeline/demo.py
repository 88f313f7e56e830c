"""`tlpipe demo`: the whole job on built-in data, offline — export, extract, compare, fit-head, evaluate,
export-model, score.

The data is scikit-learn's bundled handwritten digits (1,797 images, 10 classes) written out as PNGs in
train/test split folders, so the demo needs no network and no data of the user's.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from tlpipe.backbones.weights import WeightsUnavailable

__all__ = ["obtain_demo_backbone", "run_demo", "write_digits_folder"]


def write_digits_folder(root: str | Path, size: int = 64, test_fraction: float = 0.2, seed: int = 0) -> Path:
    """scikit-learn's digits as ``root/{train,test}/<digit>/<n>.png`` (grayscale, upscaled to ``size``)."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = Path(root)
    digits = load_digits()
    rows = np.arange(len(digits.target))
    train, test = train_test_split(rows, test_size=test_fraction, random_state=seed, stratify=digits.target)
    for split, chosen in (("train", train), ("test", test)):
        for i in chosen:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (255 - digits.images[i] * (255 / 16)).astype(np.uint8)  # dark ink on white, like a scan
            Image.fromarray(pixels, "L").resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{i:04d}.png")
    return root


def obtain_demo_backbone(backbone: str, weights_dir, store):
    """ImageNet weights when they can be had (weights directory, Keras' cache, download); else random init."""
    from tlpipe.backbones.export import obtain_backbone

    try:
        entry = obtain_backbone(backbone, "imagenet", weights_dir=weights_dir, store=store)
        source = entry.metadata["weights"].get("path") or "Keras (its cache or a download)"
        return entry, True, f"ImageNet weights from {source}"
    except WeightsUnavailable as exc:
        entry = obtain_backbone(backbone, "none", weights_dir=weights_dir, store=store)
        return (
            entry,
            False,
            (
                "NO ImageNet weights could be had, so this run uses a RANDOMLY INITIALISED backbone: "
                "its figures show the pipeline working, not what ImageNet features give (on real photos "
                "random features score far lower). " + str(exc).split(". ", 1)[-1]
            ),
        )


def run_demo(
    out_dir: str | Path = "demo-output", *, backbone: str = "mobilenet_v2", weights_dir=None, store=None, console=None
) -> dict:
    """Run the demo end to end; returns a summary (also written to ``out_dir/summary.json``)."""
    from rich.console import Console

    from tlpipe.features.extract import extract
    from tlpipe.pipeline.heads.fit import train_head
    from tlpipe.pipeline.heads.selection import compare
    from tlpipe.pipeline.reports.compare import format_table
    from tlpipe.pipeline.scoring.fuse import export_model
    from tlpipe.pipeline.scoring.score import score

    console = console or Console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = lambda text: console.print(f"[bold cyan]demo[/] {text}")  # noqa: E731

    data = out / "digits"
    if not data.exists():
        write_digits_folder(data)
    say(f"data: scikit-learn's handwritten digits as PNG files in {data} (train/test split folders, 10 classes)")
    with console.status("export: Keras -> ONNX with preprocessing inside, verified against Keras…"):
        entry, pretrained, note = obtain_demo_backbone(backbone, weights_dir, store)
    say(("[green]" if pretrained else "[bold yellow]") + note + "[/]")
    v = entry.metadata["verification"]
    say(f"export: {entry.key} (max |diff| vs Keras {v['max_abs_diff']:.1e}, min cosine {v['min_cosine']:.6f})")

    cache = out / "cache.h5"
    with console.status("extract: embedding images into the HDF5 cache…"):
        summary = extract(data, cache, model=str(entry.directory))
    say(
        f"extract: {summary.embedded} embedded, {summary.cached} already cached, {summary.failed} failed "
        f"({summary.images_per_second:.0f} img/s) -> {cache}"
    )

    report = out / "report"
    with console.status("compare: cross-validating logreg, svm, rbf-svm, mlp…"):
        result = compare(cache, ("logreg", "svm", "rbf-svm", "mlp"), features=summary.key, cv=5, report=report)
    console.print(format_table(result))

    head_path = out / f"{result.best}.joblib"
    trained = train_head(cache, result.best, head_path, features=summary.key)
    e = trained.evaluation
    if e is None:
        raise RuntimeError(f"fit-head found no held-out test split in {cache}; the demo's data set always has one")
    say(
        f"fit-head: {result.best} saved to {head_path}; on the held-out test split: accuracy {e.accuracy:.4f}, "
        f"macro-F1 {e.macro_f1:.4f} ({e.n} images)"
    )
    classifier = out / "classifier.onnx"
    with console.status("export-model: fusing backbone + head into one ONNX classifier…"):
        fused = export_model(head_path, classifier, store=store)
    predictions = out / "predictions.csv"
    predictions.unlink(missing_ok=True)  # a re-run's best head may differ: score afresh, don't resume
    scored = score(data / "test", predictions, model=classifier)
    right = sum(row["label"] == row["path"].split("/")[0] for row in csv.DictReader(predictions.open()))
    say(
        f"export-model + score: {classifier} (max |diff| vs Python {fused['verification']['max_abs_diff']:.1e}) "
        f"scored {scored.written} test images -> {predictions} ({right / max(scored.written, 1):.4f} correct)"
    )
    summary_data = {
        "backbone": entry.key,
        "pretrained": pretrained,
        "weights_note": note,
        "cache": str(cache),
        "best_head": result.best,
        "cv_accuracy": result.head(result.best).accuracy,
        "test_accuracy": e.accuracy,
        "head": str(head_path),
        "classifier": str(classifier),
        "predictions": str(predictions),
        "report": str(report / "report.md"),
        "report_html": str(report / "index.html"),
    }
    (out / "summary.json").write_text(json.dumps(summary_data, indent=2))
    say(f"report: {report / 'report.md'}" + ("" if pretrained else "  (random-init backbone: see above)"))
    say(f"[bold]open in a browser: {report / 'index.html'}[/]")
    return summary_data
