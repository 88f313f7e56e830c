"""Batch scoring on a Ray cluster (``--engine ray``): :func:`tlpipe.pipeline.score.score` run with the
:class:`~tlpipe.features.ray_engine.RayEngine` — the same sink, rows, resume check and guarantees.

The head is unpickled once, on the driver, and shipped to the actors with the backbone's bytes (or the
fused classifier's). Scoring a cache (``source`` an ``.h5``) decodes nothing and runs locally.
"""

from __future__ import annotations

import os
from typing import Any

from tlpipe.features.ray_engine import run_on_ray
from tlpipe.pipeline.scoring.score import ScoreSummary, score

__all__ = ["score_ray"]


def score_ray(source: str | os.PathLike, out: str | os.PathLike, **options: Any) -> ScoreSummary:
    """:func:`tlpipe.pipeline.score.score` with the Ray engine: same arguments, same output rows, same resume.

    Parameters
    ----------
    source, out, **options
        As for :func:`~tlpipe.pipeline.score.score`, plus the Ray engine's ``address``, ``num_actors``,
        ``actor_gpus``, ``commit_rows`` (rows per durable append on the driver) and ``threads`` (ONNX Runtime
        threads per actor); see :func:`~tlpipe.features.ray_engine.run_on_ray`.

    Returns
    -------
    ScoreSummary
        ``seconds`` includes starting the actors.

    Raises
    ------
    tlpipe.backbones.deps.MissingExtra
        Ray is not installed.
    ValueError, ScoreError
        As for :func:`~tlpipe.pipeline.score.score`; ``batch_size`` or ``commit_rows`` below 1.
    """
    return run_on_ray(score, source, out, **options)
