"""Batch scoring on a Ray cluster (``--engine ray``): :func:`tlpipe.pipeline.score.score` run with the
:class:`~tlpipe.features.ray_engine.RayEngine` — the same sink, rows, resume check and guarantees.

The head is unpickled once, on the driver, and shipped to the actors with the backbone's bytes (or the
fused classifier's). Scoring a cache (``source`` an ``.h5``) decodes nothing and runs locally.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from tlpipe.backbones.deps import require
from tlpipe.backbones.store import ModelStore
from tlpipe.features.ray_engine import RayEngine

from .score import ScoreSummary, score


def score_ray(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    head: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    top_k: int = 3,
    device: str = "auto",
    batch_size: int = 32,
    commit_rows: int = 256,
    trust: bool = False,
    store: ModelStore | str | os.PathLike | None = None,
    resize: str | None = None,
    resize_filter: str | None = None,
    threads: int | None = None,
    allow_outside_root: bool = False,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    address: str | None = None,
    num_actors: int | None = None,
    actor_gpus: float | None = None,
) -> ScoreSummary:
    """:func:`tlpipe.pipeline.score.score` with the Ray engine: same arguments, same output rows, same resume.

    Parameters
    ----------
    source, out, head, model, cache, top_k, device, batch_size, trust, store, resize, resize_filter, \
allow_outside_root, progress
        As for :func:`~tlpipe.pipeline.score.score`.
    commit_rows : int
        Rows per durable append on the driver.
    threads : int, optional
        ONNX Runtime threads per actor.
    address, num_actors, actor_gpus
        See :class:`~tlpipe.features.ray_engine.RayEngine`.

    Returns
    -------
    ScoreSummary
        ``seconds`` includes starting the actors.

    Raises
    ------
    tlpipe.backbones.deps.MissingExtra
        Ray is not installed.
    ValueError, ScoreError
        As for :func:`~tlpipe.pipeline.score.score`; ``commit_rows`` below 1.
    """
    require("ray")
    if commit_rows < 1:
        raise ValueError(f"commit_rows must be at least 1, not {commit_rows}")
    engine = RayEngine(address, num_actors, actor_gpus, commit_rows, device, threads)
    return score(
        source,
        out,
        head=head,
        model=model,
        cache=cache,
        top_k=top_k,
        device=device,
        batch_size=batch_size,
        trust=trust,
        store=store,
        resize=resize,
        resize_filter=resize_filter,
        allow_outside_root=allow_outside_root,
        progress=progress,
        engine=engine,
    )
