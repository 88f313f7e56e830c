"""``tlpipe suggest`` as a library function: a cache's unlabelled photos, (a head,) -> the photos to label next."""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from time import perf_counter

import numpy as np

from tlpipe.errors import TlpipeError
from tlpipe.features.cache import list_feature_sets, read_feature_set
from tlpipe.pipeline.audit.checks import NEAR_DUPLICATE_COSINE, source_roots

from .strategies import CHUNK_ROWS, STRATEGIES, Selection, select

__all__ = ["PICK_COLUMNS", "Pick", "SuggestError", "SuggestResult", "suggest", "write_picks"]

PICK_COLUMNS = (
    "rank",
    "path",
    "source",
    "sha256",
    "strategy",
    "score",
    "reason",
    "guess",
    "guess_probability",
    "label",
)


class SuggestError(TlpipeError, ValueError):
    """``suggest`` cannot run as asked (no unlabelled rows, a strategy that needs a head...)."""


@dataclass
class Pick:
    """One photo to label next."""

    rank: int
    path: str  # as the cache records it: relative to its source's folder
    source: str  # the folder or manifest it was extracted from
    sha256: str
    strategy: str
    score: float  # margin (margin, hybrid: smaller is less sure), entropy / log K (entropy), typicality (diverse)
    reason: str
    guess: str  # the head's most probable class ("" without a head)
    guess_probability: float  # NaN without a head
    nearest_labelled_cosine: float  # -inf when nothing is labelled


@dataclass
class SuggestResult:
    """What ``suggest`` picked and from what."""

    cache: str
    feature_key: str
    head: str | None
    strategy: str  # as asked
    strategy_used: str  # "diverse" for a cold start
    n: int  # as asked
    picks: list[Pick]
    labelled: int
    unlabelled: int
    duplicates: int  # unlabelled rows left out as near duplicates of labelled ones
    batch_duplicates: int  # candidates skipped as near duplicates of an earlier pick
    threshold: float
    backend: str
    seed: int
    class_names: list[str]
    roots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    out: str | None = None
    report: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _name(names: list[str], column: int) -> str:
    return names[column] if 0 <= column < len(names) else "?"


def _reasons(sel: Selection, names: list[str]) -> list[str]:
    """One sentence per pick: why it was picked."""
    reasons = []
    for i in range(len(sel)):
        a, b = (_name(names, int(c)) for c in sel.top[i])
        pa, pb = sel.top_p[i]
        if sel.strategy in ("margin", "hybrid"):
            parts = [f"margin {sel.margin[i]:.2f} between {a} ({pa:.2f}) and {b} ({pb:.2f})"]
            if sel.strategy == "hybrid" and sel.cluster[i] >= 0:
                parts.append(f"the most central of {sel.cluster_size[i]} uncertain photos alike")
        elif sel.strategy == "entropy":
            parts = [f"entropy {sel.entropy[i]:.2f} of 1 (top {a} {pa:.2f}, {b} {pb:.2f})"]
        else:
            labelled = sel.cluster_labelled[i]
            parts = [
                f"typical of a cluster of {sel.cluster_size[i]} photos, "
                + (f"{labelled} of them labelled" if labelled else "none of them labelled")
            ]
        cosine = sel.nearest_labelled[i]
        if not np.isfinite(cosine):
            parts.append("nothing is labelled yet")
        elif cosine <= sel.far_cosine:
            parts.append(f"far from every labelled photo (cosine {cosine:.2f} to the nearest)")
        else:
            parts.append(f"cosine {cosine:.2f} to the nearest labelled photo")
        reasons.append("; ".join(parts))
    return reasons


def suggest(
    cache: str | os.PathLike,
    head: str | os.PathLike | None = None,
    n: int = 20,
    *,
    strategy: str = "hybrid",
    features: str | None = None,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    report: str | os.PathLike | None = None,
    trust: bool = False,
    threshold: float = NEAR_DUPLICATE_COSINE,
    backend: str = "auto",
    chunk_rows: int = CHUNK_ROWS,
) -> SuggestResult:
    """Rank a cache's unlabelled photos and return the ``n`` to label next (see
    :mod:`tlpipe.pipeline.suggest.strategies` for the strategies).

    The loop: ``suggest`` -> label the picks -> ``tlpipe extract`` the same source again (labels are updated in
    place, nothing is embedded again) -> ``tlpipe fit-head`` -> ``suggest`` again (docs/suggest.md).

    Parameters
    ----------
    cache : path
        An HDF5 cache made by ``tlpipe extract``, holding unlabelled rows (images without a label).
    head : path, optional
        A head saved by ``fit-head`` / ``compare --save-best`` on this cache's feature set (its sidecar is checked
        before it is loaded). Without it: a cold start (``strategy`` hybrid or diverse: a diverse, representative
        batch).
    n : int
        Photos to suggest (fewer when fewer are eligible; the notes say why).
    strategy : {"hybrid", "margin", "entropy", "diverse"}
        hybrid (default): uncertainty mixed with diversity; margin / entropy: the head's least sure first;
        diverse: typiclust-like, no head needed.
    features : str, optional
        Feature set key (or unique prefix); default the head's, else the cache's only one.
    seed : int
        Seeds k-means and ties: the same cache, head and seed give the same picks.
    out : path, optional
        Write the picks as CSV (:data:`PICK_COLUMNS`; an empty ``label`` column to fill in).
    report : path, optional
        Write a contact sheet and an HTML page of the picks into this folder (:mod:`.report`).
    trust : bool
        Load a head whose sidecar cannot verify it (runs its code).
    threshold : float
        Cosine similarity at or above which a photo is a near duplicate (of a labelled photo: never suggested; of
        an earlier pick: skipped).
    backend : {"auto", "sklearn", "usearch"}
        The neighbour search (the audit's backends).
    chunk_rows : int
        Unlabelled rows scored by the head at a time.

    Returns
    -------
    SuggestResult
        The picks, best first, each with its path, sha256, score, reason and the head's guess.

    Raises
    ------
    SuggestError
        The feature set has no unlabelled rows; ``margin`` / ``entropy`` without a head; bad ``n`` or ``strategy``.
    HeadError
        The head was fitted on another feature set (or other embeddings), or cannot be verified.
    CacheError
        The cache or feature set cannot be read.
    """
    started = perf_counter()
    if strategy not in STRATEGIES:
        raise SuggestError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if n < 1:
        raise SuggestError(f"n must be at least 1, not {n}")
    if head is None and strategy in ("margin", "entropy"):
        raise SuggestError(
            f"--strategy {strategy} ranks by a head's probabilities: pass --head, or leave it out for a cold start "
            f"(hybrid / diverse)"
        )
    key = features
    if head is not None and key is None:
        from tlpipe.pipeline.heads.persistence import HeadError, read_metadata

        try:
            recorded = read_metadata(head).get("feature_set", {}).get("key")
        except HeadError:
            if not trust:
                raise
            recorded = None
        if recorded in list_feature_sets(cache):
            key = recorded
    fs = read_feature_set(cache, key)
    labelled = fs.y >= 0
    if labelled.all():
        raise SuggestError(
            f"{cache}: feature set {fs.key} has no unlabelled rows, nothing to suggest: extract your unlabelled "
            f"photos into this cache first"
        )
    names = list(fs.class_names)
    predict_proba = None
    if head is not None:
        from tlpipe.pipeline.heads.persistence import check_compatible, head_labels, load_head

        estimator, metadata = load_head(head, trust=trust, expect_key=fs.key, expect_dim=int(fs.X.shape[1]))
        if metadata:
            check_compatible(metadata, fs)
        names = head_labels(estimator, metadata, list(fs.class_names))
        predict_proba = estimator.predict_proba
    n_labelled, n_unlabelled = int(labelled.sum()), int((~labelled).sum())
    try:
        sel = select(
            fs.X,
            labelled,
            n,
            strategy=strategy,
            predict_proba=predict_proba,
            seed=seed,
            threshold=threshold,
            backend=backend,
            chunk_rows=chunk_rows,
            copy=False,
        )
    except ValueError as exc:
        raise SuggestError(str(exc)) from exc
    sources, roots = source_roots(cache)
    picks = []
    for rank, (row, reason) in enumerate(zip(sel.rows.tolist(), _reasons(sel, names)), start=1):
        i = rank - 1
        src = int(fs.source[row]) if fs.source is not None else -1
        picks.append(
            Pick(
                rank=rank,
                path=str(fs.paths[row]),
                source=sources[src] if 0 <= src < len(sources) else "",
                sha256=str(fs.sha256[row]),
                strategy=sel.strategy,
                score=float(sel.score[i]),
                reason=reason,
                guess=_name(names, int(sel.top[i, 0])) if predict_proba is not None else "",
                guess_probability=float(sel.top_p[i, 0]) if predict_proba is not None else float("nan"),
                nearest_labelled_cosine=float(sel.nearest_labelled[i]),
            )
        )
    result = SuggestResult(
        cache=str(cache),
        feature_key=fs.key,
        head=None if head is None else str(head),
        strategy=strategy,
        strategy_used=sel.strategy,
        n=n,
        picks=picks,
        labelled=n_labelled,
        unlabelled=n_unlabelled,
        duplicates=sel.duplicates,
        batch_duplicates=sel.batch_duplicates,
        threshold=threshold,
        backend=sel.backend,
        seed=seed,
        class_names=list(fs.class_names),
        roots=roots,
        notes=list(sel.notes),
    )
    if out is not None:
        result.out = str(write_picks(result, out))
    if report is not None:
        from .report import write_report

        result.report = {k: str(v) for k, v in write_report(result, report).items()}
    result.seconds = perf_counter() - started
    return result


def write_picks(result: SuggestResult, path: str | os.PathLike) -> Path:
    """Write the picks as CSV (UTF-8, :data:`PICK_COLUMNS`, best first) with an empty ``label`` column for the
    user to fill in; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(PICK_COLUMNS)
        for p in result.picks:
            writer.writerow(
                [
                    p.rank,
                    p.path,
                    p.source,
                    p.sha256,
                    p.strategy,
                    f"{p.score:.6g}",
                    p.reason,
                    p.guess,
                    "" if not np.isfinite(p.guess_probability) else f"{p.guess_probability:.4f}",
                    "",
                ]
            )
    return path
