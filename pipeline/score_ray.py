"""Batch scoring on a Ray cluster (``--engine ray``): the rows and guarantees of :mod:`pipeline.score`.

Images are read, hashed and decoded by extraction's ``_load`` in Ray Data tasks (as for
:func:`features.ray_engine.extract_ray`); an actor pool holds the backbone session with the head next to it
(or the fused classifier) and returns probabilities; the driver turns them into rows with
:mod:`pipeline.score`'s own row functions and appends each batch durably through its output writers. A
re-run scores only the paths the output lacks, and rows a retried task delivers twice are dropped, so the
output holds every image exactly once. Scoring a cache (``source`` an ``.h5``) decodes nothing and runs
locally.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from tlpipe.backbones.deps import require
from tlpipe.backbones.runtime import OnnxEmbedder
from tlpipe.backbones.store import ModelStore
from tlpipe.features.images import RESIZE_MODES
from tlpipe.features.ray_engine import (CACHED, FAILED, OK, decoded_dataset, map_stage, model_file, ordered_batches,
                                 pixels_of, plan_actors, ray_cluster)
from tlpipe.features.sources import discover

from .artifacts import load_head
from .score import (CachedEmbeddings, check_filter, Predictor, ScoreError, ScoreSummary, display_path, error_row, fused_predictor,
                    head_backbone, head_predictor, open_output, prediction_rows, score)


class PredictActor:
    """Ray Data actor: decoded rows in, class probabilities out (zeros for rows not decoded)."""

    def __init__(self, model, size: int, classes: int, from_embeddings: Callable | None, device: str,
                 threads: int | None):
        with model_file(model) as path:
            if from_embeddings is None:
                fused = fused_predictor(path, device=device, threads=threads)
                self.predict, self.provider = fused.from_pixels, fused.provider
            else:
                embedder = OnnxEmbedder(path, device=device, threads=threads)
                self.predict = lambda pixels: from_embeddings(embedder(pixels))
                self.provider = embedder.provider
        self.size, self.classes = size, classes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok, pixels = pixels_of(batch, self.size)
        proba = np.zeros((len(ok), self.classes), np.float64)
        if len(pixels):
            proba[ok] = self.predict(pixels)
        return {**{k: v for k, v in batch.items() if k != "pixels"}, "proba": proba,
                "provider": np.full(len(ok), self.provider, dtype=object)}


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
    resize: str = "squash",
    threads: int | None = None,
    allow_outside_root: bool = False,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    address: str | None = None,
    num_actors: int | None = None,
    actor_gpus: float | None = None,
    resize_filter: str | None = None,
) -> ScoreSummary:
    """:func:`pipeline.score.score` with the Ray engine: same arguments, same output rows, same resume.

    ``address``, ``num_actors``, ``actor_gpus``, ``commit_rows`` (rows per durable append) and ``threads``
    (per actor) as in :func:`features.ray_engine.extract_ray`. The head (or fused model) is loaded and
    checked on the driver and shipped to the actors; image paths must be readable on every node.
    ``ScoreSummary.seconds`` includes starting the actors.
    """
    require("ray")
    if (head is None) == (model is None):
        raise ValueError("give exactly one of head (a saved head) or model (a fused classifier)")
    source = Path(source)
    if source.suffix.lower() in (".h5", ".hdf5"):  # embeddings only: nothing for the cluster to decode
        return score(source, out, head=head, model=model, cache=cache, top_k=top_k, device=device,
                     batch_size=batch_size, trust=trust, store=store, progress=progress,
                     resize_filter=resize_filter)
    if min(top_k, batch_size, commit_rows) < 1:
        raise ValueError(f"top_k, batch_size and commit_rows must be at least 1, not {top_k}, {batch_size}, "
                         f"{commit_rows}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r}; expected one of {RESIZE_MODES}")
    if cache is not None and model is not None:
        raise ValueError("cache reuse needs the head (model= runs the whole classifier on images)")
    images = discover(source, allow_outside_root=allow_outside_root)
    if not images.records:
        skipped = f" ({len(images.skipped)} files skipped)" if images.skipped else ""
        raise ScoreError(f"no images found in {source}{skipped}")
    if head is not None:
        predictor = head_predictor(head, trust=trust, store=store, backbone=False)
        entry = head_backbone(load_head(head, trust=trust)[1], store, str(head))
        model_bytes, size = entry.model_path.read_bytes(), entry.input_size
    else:
        predictor = fused_predictor(model, device="cpu", threads=1)  # the labels, input size and checks
        model_bytes, size = Path(model).read_bytes(), predictor.input_size
    check_filter(predictor, resize_filter)
    k = min(top_k, len(predictor.labels))
    summary = ScoreSummary(out=str(out))
    cached = CachedEmbeddings(cache, predictor.key, predictor.model_sha256) if cache is not None else None
    output = open_output(out, k)
    started = time.perf_counter()
    try:
        todo = [r for r in images.records if display_path(r.relpath) not in output.paths]
        summary.total, summary.already_done = len(images.records), len(images.records) - len(todo)
        summary.skipped = list(images.skipped)
        advance = progress(summary.total, summary.already_done) if progress else None
        if todo:
            with ray_cluster(address) as ray:
                actors = plan_actors(ray, num_actors, actor_gpus)
                decoded = decoded_dataset(ray, todo, size=size, resize=resize, batch_size=batch_size,
                                          resize_filter=predictor.resize_filter,
                                          known_shas=set(cached.index) if cached is not None else set())
                dataset = map_stage(
                    decoded, PredictActor, batch_size=batch_size, **actors.map_args(ray),
                    fn_constructor_kwargs={
                        "model": ray.put(model_bytes), "size": size, "classes": len(predictor.labels),
                        "from_embeddings": predictor.from_embeddings if head is not None else None,
                        "device": device, "threads": threads})
                for batch in ordered_batches(dataset, commit_rows):
                    _append(batch, [todo[int(i)].relpath for i in batch["i"]], predictor, cached, output,
                            summary, k)
                    if advance:
                        advance(len(batch["i"]))
    except BaseException:
        output.close(finish=False)
        raise
    output.close()
    summary.seconds = time.perf_counter() - started
    return summary


def _append(batch: dict[str, np.ndarray], relpaths: list[str], predictor: Predictor, cached: CachedEmbeddings | None,
            output, summary: ScoreSummary, top_k: int) -> None:
    """Rows for one batch of actor results (cached content scored here from its stored embedding), appended."""
    status, proba = batch["status"], np.array(batch["proba"])
    reused = status == CACHED
    if reused.any():
        proba[reused] = predictor.from_embeddings(cached.get(list(batch["sha256"][reused])))
    rows = []
    for j, relpath in enumerate(relpaths):
        path, sha = display_path(relpath), str(batch["sha256"][j])
        if status[j] == FAILED:
            rows.append(error_row(path, sha, str(batch["error"][j])))
            summary.failures.append((path, str(batch["error"][j])))
        else:
            rows += prediction_rows([path], [sha], proba[j][None], predictor.labels, top_k)
    output.append(rows)
    summary.scored += int(np.sum(status == OK))
    summary.reused += int(np.sum(reused))
    summary.failed += int(np.sum(status == FAILED))
    summary.provider = summary.provider or str(batch["provider"][0])
