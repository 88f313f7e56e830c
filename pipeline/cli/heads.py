"""`tlpipe fit-head`, `tlpipe compare`, `tlpipe evaluate`: heads on a cached feature set."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from tlpipe.errors import InputError
from tlpipe.pipeline.cli._common import (
    AddressOpt,
    EngineOpt,
    JsonOpt,
    KeepMissingOpt,
    NJobsOpt,
    QuietOpt,
    SeedOpt,
    TrustOpt,
    UseAugmentedOpt,
    _status,
    app,
    console,
    out,
)
from tlpipe.pipeline.cli.output import emit_json, table

__all__ = ["compare", "evaluate", "fit_head"]


def _pca(value: str):
    """--pca: the library's one rule (heads.estimators.check_pca): auto, none, components (an integer >= 1) or a
    fraction of the variance to keep in (0, 1); anything else is refused there, naming both forms."""
    from tlpipe.pipeline.heads.estimators import check_pca

    return check_pca(value)


PcaOpt = typer.Option(
    "auto",
    "--pca",
    help="auto (PCA-256 before rbf-svm on large sets, as compare scores) | none | components (an integer, at least 1) | fraction of the variance kept, in (0, 1).",
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
    keep_missing: bool = KeepMissingOpt,
):
    """Train one head on the cache (train split, else a stratified hold-out) and save it with its metadata.

    The sidecar records the evaluation rows (by image sha256): `tlpipe evaluate HEAD CACHE` scores them."""
    from tlpipe.pipeline.heads.engine import parallel_backend
    from tlpipe.pipeline.heads.fit import train_head

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
            keep_missing=keep_missing,
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
    dims = result.info.get("dimensions") or {}
    if dims and dims.get("kept") != dims.get("input"):
        out.print(f"  PCA {result.info.get('pca')}: {dims['kept']} of {dims['input']} dimensions kept")
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
    keep_missing: bool = KeepMissingOpt,
    umap: bool = typer.Option(
        False,
        "--umap",
        help="Add a UMAP map of the embeddings to the --report (needs tlpipe[umap]; ~10 s of numba compilation).",
    ),
):
    """Cross-validate heads on the training rows, refit the best and score it once on the held-out rows."""
    from tlpipe.features.spec import RunOptions
    from tlpipe.pipeline.heads.selection import compare as run_compare
    from tlpipe.pipeline.heads.selection import is_sweep
    from tlpipe.pipeline.heads.spec import HeadSpec
    from tlpipe.pipeline.reports.compare import COLUMNS, cells

    names = [m.strip() for m in models.split(",") if m.strip()]
    spec = HeadSpec(pca=_pca(pca), class_weight=class_weight, search=search, seed=seed, use_augmented=use_augmented)
    run = RunOptions(n_jobs=n_jobs, engine=engine, address=address, quiet=quiet or as_json)
    if is_sweep(features):
        if save_best is not None or exclude is not None:
            raise InputError(
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
            keep_missing,
        )
        return
    with _status(run.quiet, f"cross-validating {', '.join(names)} ({cv} folds)…"):
        result = run_compare(
            cache,
            names,
            features=features,
            cv=cv,
            head=spec,
            holdout=not all_rows,
            report=report,
            save_best=save_best,
            exclude=exclude,
            keep_missing=keep_missing,
            run=run,
            umap=umap,
        )
    written = result.report_files or None
    if as_json:
        emit_json(result.to_dict() | ({"report": {k: str(v) for k, v in written.items()}} if written else {}))
        return
    if quiet:
        return
    heads = sorted(result.heads, key=lambda h: (-h.accuracy, -h.macro_f1))
    rows = [[(f"[bold green]{h.name} *[/]" if h.name == result.best else h.name), *cells(h)[1:]] for h in heads]
    table(
        out,
        COLUMNS,
        rows,
        title=f"{result.cv}-fold CV on {result.rows} rows of {result.feature_key}",
        right=[c for i, c in enumerate(COLUMNS) if i not in (0, 6)],
    )
    out.print(f"  {result.setup}\n  best: [bold]{result.best}[/] · {result.seconds:.1f} s\n  why: {result.choice}")
    if result.holdout:
        h = result.holdout
        out.print(
            f"  held-out: {h['head']} refitted on {h['train_rows']} training rows, accuracy {h['accuracy']:.4f}, "
            f"macro-F1 {h['macro_f1']:.4f} on {h['rows']} held-out rows (chance {result.chance:.3f})"
        )
    if written is not None and report is not None:
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
    keep_missing=False,
) -> None:
    """compare --features all|GLOB: every head on every matching feature set, pairs ranked."""
    from tlpipe.pipeline.heads.engine import parallel_backend
    from tlpipe.pipeline.heads.selection import sweep
    from tlpipe.pipeline.reports.compare import format_sweep_table, write_sweep_report

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
            keep_missing=keep_missing,
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
    report: Path | None = typer.Option(None, "--report", help="Write evaluation.json and confusion_matrix.png here."),
    allow_train_rows: bool = typer.Option(
        False, "--allow-train-rows", help="Score rows the head was trained on too (an optimistic score)."
    ),
    trust: bool = TrustOpt,
    exclude: Path | None = ExcludeOpt,
    keep_missing: bool = KeepMissingOpt,
    as_json: bool = JsonOpt,
):
    """Metrics, per-class report and confusion matrix of one head on held-out rows of a cache."""
    from tlpipe.features.cache import missing_note
    from tlpipe.pipeline.heads.evaluate import evaluate as run_evaluate

    if head_opt is not None and second is not None:
        raise typer.BadParameter("give the head once: `evaluate HEAD CACHE` or `evaluate CACHE --head HEAD`")
    head, cache = (head_opt, first) if head_opt is not None else (first, second)
    if cache is None:
        raise typer.BadParameter("missing the cache: `evaluate HEAD CACHE` or `evaluate CACHE --head HEAD`")
    result = run_evaluate(
        head,
        cache,
        split=split,
        features=features,
        report=report,
        allow_train_rows=allow_train_rows,
        exclude=exclude,
        keep_missing=keep_missing,
        trust=trust,
    )
    if as_json:
        emit_json({"head": head, "cache": cache} | result.to_dict())
        return
    loss = f", log-loss {result.log_loss:.4f}" if result.log_loss is not None else ""
    out.print(
        f"[bold]{head}[/] on {result.rows_used}: accuracy {result.accuracy:.4f}, "
        f"macro-F1 {result.macro_f1:.4f}{loss}"
        + (f"; {result.excluded} rows excluded by {exclude}" if exclude else "")
        + (f"; {missing_note(result.excluded_missing)}" if result.excluded_missing else "")
    )
    rows = [
        [escape(label), *(f"{r.get(k, 0):.3f}" for k in ("precision", "recall", "f1-score")), int(r.get("support", 0))]
        for label in result.labels
        for r in [result.report.get(label, {})]
    ]
    table(out, ("class", "precision", "recall", "f1", "support"), rows, right=("precision", "recall", "f1", "support"))
    if report is not None:
        out.print(
            f"  wrote {report / 'index.html'}, {report / 'evaluation.json'} and {report / 'confusion_matrix.png'}"
        )
