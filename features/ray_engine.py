"""Extraction on a Ray cluster (``--engine ray``): the same cache and guarantees as :mod:`features.extract`.

- reader: the driver lists the inputs (:func:`features.sources.discover`) and hands Ray Data one row per
  image (its index and absolute path; the files must be readable at that path on every node);
- decode tasks (Ray Data ``map_batches`` tasks, one CPU each): extraction's own ``_load`` reads, hashes
  and decodes each image; content the feature set already holds (a set of sha256s broadcast through the
  object store) is marked cached and not decoded;
- inference: an actor pool (one actor per GPU where the cluster has GPUs, else one CPU actor per node)
  each holding an :class:`~backbones.runtime.OnnxEmbedder` built from model bytes shipped through the
  object store; actors are restarted and their tasks retried when a worker dies;
- writer: results stream back to the driver in order (``iter_batches``), the single
  :class:`~features.cache.CacheWriter`, which commits every ``commit_rows`` results before taking more.
  Rows delivered twice by a retried task are dropped by image index, content already committed by sha256,
  so neither a worker nor a driver failure leaves duplicates, and a re-run resumes from the committed rows.

Ray is imported lazily; without it these functions raise ``MissingExtra`` naming ``pip install 'tlpipe[ray]'``.
"""
from __future__ import annotations

import os
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

import numpy as np

from tlpipe.backbones.deps import require
from tlpipe.backbones.runtime import OnnxEmbedder
from tlpipe.backbones.store import ModelStore

from .cache import CacheWriter, ImageRow
from .extract import ExtractSummary, _load, open_source, resolve_entry
from .fastdecode import DEFAULT_RESIZE_FILTER, check_resize_filter, feature_set_key
from .sources import ImageRecord

OK, CACHED, FAILED = 0, 1, 2  # the ``status`` column of decoded rows
TASK_RETRIES = 3  # decode task retries after a worker dies
ACTOR_RESTARTS = 3  # inference actor restarts (its tasks are retried as often)


@contextmanager
def ray_cluster(address: str | None = None) -> Iterator[ModuleType]:
    """The ``ray`` module, connected: an already initialised Ray as it is; else ``ray.init(address)``
    (None: a cluster on this machine; "auto" or "host:port": a running cluster), shut down on exit."""
    ray = require("ray")
    if ray.is_initialized():
        yield ray
        return
    ray.init(address=address, **({} if address else {"include_dashboard": False}))
    try:
        yield ray
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class ActorPlan:
    """How many inference actors, and the resources each one reserves."""

    actors: int
    gpus: float  # per actor; 0 = CPU actor

    def map_args(self, ray: ModuleType) -> dict[str, Any]:
        """:func:`map_stage` arguments for the pool: size, resources, restarts and task retries."""
        return {"compute": ray.data.ActorPoolStrategy(size=self.actors), "num_cpus": 1,
                "num_gpus": self.gpus or None, "max_restarts": ACTOR_RESTARTS, "max_task_retries": ACTOR_RESTARTS}


def map_stage(dataset, fn, **kwargs):
    """``dataset.map_batches(fn, batch_format="numpy", **kwargs)``.

    The retry limits (``max_retries``, ``max_restarts``, ``max_task_retries``) still go through Ray Data's
    ``**ray_remote_args``, which Ray 2.60 marks deprecated (removal planned for 2.64, hence the upper bound
    of the ``ray`` extra); that warning alone is silenced. They also keep the decode tasks from being fused
    into the inference actors (Ray Data fuses stages only when their remote arguments are equal).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return dataset.map_batches(fn, batch_format="numpy", **kwargs)


def plan_actors(ray: ModuleType, num_actors: int | None = None, actor_gpus: float | None = None) -> ActorPlan:
    """``actor_gpus`` None: 1 per actor where the cluster has GPUs, else CPU actors. ``num_actors`` None: as
    many as the GPUs allow, or one CPU actor per alive node with a CPU (its ONNX Runtime uses that node's
    cores, as the local engine does)."""
    cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
    gpus = (1.0 if cluster_gpus else 0.0) if actor_gpus is None else float(actor_gpus)
    if gpus < 0:
        raise ValueError(f"actor_gpus must be at least 0, not {actor_gpus}")
    if gpus and gpus > cluster_gpus:
        raise ValueError(f"{gpus:g} GPU per actor asked, the cluster has {cluster_gpus:g}")
    if num_actors is None:
        num_actors = int(cluster_gpus // gpus) if gpus else sum(
            1 for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) >= 1)
    if num_actors < 1:
        raise ValueError(f"num_actors must be at least 1, not {num_actors}")
    return ActorPlan(num_actors, gpus)


# -- decode tasks ----------------------------------------------------------------------------------------
_known: tuple[Any, frozenset[str]] | None = None  # per worker process: the last broadcast set, fetched once


def _known_shas(ref) -> frozenset[str]:
    global _known
    if ref is None:
        return frozenset()
    if _known is None or _known[0] != ref:
        _known = (ref, require("ray").get(ref))
    return _known[1]


def decode_batch(batch: dict[str, np.ndarray], *, size: int, resize: str, known,
                 resize_filter: str = DEFAULT_RESIZE_FILTER) -> dict[str, np.ndarray]:
    """Ray Data task: extraction's ``_load`` on each path; pixels as raw bytes (empty unless decoded)."""
    cached = _known_shas(known)
    loaded = [_load(ImageRecord("", str(path), None, None), size, resize, cached.__contains__, resize_filter)
              for path in batch["abspath"]]
    return {
        "i": batch["i"],
        "sha256": np.array([x.sha256 for x in loaded], dtype=object),
        "status": np.array([FAILED if x.error is not None else CACHED if x.cached else OK for x in loaded], np.int8),
        "error": np.array([x.error or "" for x in loaded], dtype=object),
        "width": np.array([x.size[0] for x in loaded], np.int32),
        "height": np.array([x.size[1] for x in loaded], np.int32),
        "pixels": np.array([x.pixels.tobytes() if x.pixels is not None else b"" for x in loaded], dtype=object),
    }


def decoded_dataset(ray: ModuleType, records: list[ImageRecord], *, size: int, resize: str, known_shas: set[str],
                    batch_size: int, resize_filter: str = DEFAULT_RESIZE_FILTER):
    """Ray Data rows ``i, sha256, status, error, width, height, pixels`` for ``records`` (row i = records[i])."""
    known = ray.put(frozenset(known_shas)) if known_shas else None
    items = [{"i": i, "abspath": r.abspath} for i, r in enumerate(records)]
    return map_stage(ray.data.from_items(items), decode_batch, batch_size=batch_size, num_cpus=1,
                     max_retries=TASK_RETRIES, fn_kwargs={"size": size, "resize": resize, "known": known,
                                                               "resize_filter": resize_filter})


def pixels_of(batch: dict[str, np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask of the decoded rows, their uint8 images stacked as (n, size, size, 3))."""
    ok = batch["status"] == OK
    images = [np.frombuffer(b, np.uint8).reshape(size, size, 3) for b in batch["pixels"][ok]]
    return ok, np.stack(images) if images else np.empty((0, size, size, 3), np.uint8)


@contextmanager
def model_file(ref) -> Iterator[Path]:
    """The ONNX model bytes behind object ref ``ref`` as a file on this node, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="tlpipe-model-") as folder:
        path = Path(folder) / "model.onnx"
        path.write_bytes(require("ray").get(ref))
        yield path


class EmbedActor:
    """Ray Data actor: decoded rows in, embeddings out (zeros for rows not decoded); pixels are dropped."""

    def __init__(self, model, size: int, dim: int, device: str, threads: int | None):
        with model_file(model) as path:
            self.embedder = OnnxEmbedder(path, device=device, threads=threads)
        self.size, self.dim = size, dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok, pixels = pixels_of(batch, self.size)
        embeddings = np.zeros((len(ok), self.dim), np.float32)
        if len(pixels):
            embeddings[ok] = self.embedder(pixels)
        return {**{k: v for k, v in batch.items() if k != "pixels"}, "embedding": embeddings,
                "provider": np.full(len(ok), self.embedder.provider, dtype=object)}


def ordered_batches(dataset, rows: int) -> Iterator[dict[str, np.ndarray]]:
    """The dataset's rows in input order, as numpy batches of ``rows``, each row once (a retried task may
    deliver a block again: rows already seen, by ``i``, are dropped)."""
    dataset.context.execution_options.preserve_order = True
    seen: set[int] = set()
    for batch in dataset.iter_batches(batch_size=rows, batch_format="numpy"):
        fresh = np.array([int(i) not in seen for i in batch["i"]], dtype=bool)
        seen.update(int(i) for i in batch["i"])
        if fresh.all():
            yield batch
        elif fresh.any():
            yield {k: v[fresh] for k, v in batch.items()}


# -- extraction ------------------------------------------------------------------------------------------
def extract_ray(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    address: str | None = None,
    num_actors: int | None = None,
    actor_gpus: float | None = None,
    batch_size: int = 32,
    commit_rows: int = 256,
    backbone: str | None = "mobilenet_v2",
    weights: str | os.PathLike | None = "imagenet",
    size: int | None = None,
    layer: str | None = None,
    pooling: str = "avg",
    model: str | os.PathLike | None = None,
    weights_dir: str | os.PathLike | None = None,
    store: ModelStore | None = None,
    device: str = "auto",
    dtype: str = "float32",
    resize: str = "squash",
    resize_filter: str = DEFAULT_RESIZE_FILTER,
    threads: int | None = None,
    allow_outside_root: bool = False,
    precision: str = "fp32",
    recalibrate: bool = False,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
) -> ExtractSummary:
    """:func:`features.extract.extract` on a Ray cluster: same cache, same counts, same resume.

    ``address``: None starts Ray on this machine (or uses the Ray this process already initialised);
    "auto" / "host:port" joins a running cluster. ``num_actors`` / ``actor_gpus``: see :func:`plan_actors`.
    ``batch_size``: images per decode task and per inference call. ``commit_rows``: results per cache commit
    on the driver (a driver kill loses at most that much finished work; larger commits raise the driver's
    ceiling). ``threads``: ONNX Runtime threads per actor (default: the cores of its node). The backbone is
    resolved (exported if needed) on the driver and shipped to the actors; image paths must be readable on
    every node. ``ExtractSummary.seconds`` includes starting the actors. ``resize_filter``: as in extract.
    """
    check_resize_filter(resize_filter)
    require("ray")  # before exporting a backbone, which can take minutes
    if min(batch_size, commit_rows) < 1:
        raise ValueError(f"batch_size and commit_rows must be at least 1, not {batch_size} and {commit_rows}")
    images = open_source(source, out, allow_outside_root)
    out = Path(out)
    entry = resolve_entry(images, backbone, weights, size, layer, pooling, weights_dir, store, model, precision,
                          resize, recalibrate)
    key = feature_set_key(entry.key, resize_filter)
    with ray_cluster(address) as ray:
        actors = plan_actors(ray, num_actors, actor_gpus)  # before the cache is touched
        with CacheWriter(out) as writer:
            writer.note_source(str(Path(source).resolve()))
            writer.register_classes(images.class_names)
            writer.ensure_feature_set(key, entry.embedding_dim, dtype, metadata=entry.metadata | {"key": entry.key, "resize_filter": resize_filter})
            covered = writer.rows_with(key)
            known = {sha for sha, row in writer.index.items() if row in covered}
            summary = ExtractSummary(out=str(out), key=key, skipped=list(images.skipped))
            advance = progress(len(images.records), 0) if progress else None
            started = time.perf_counter()
            model_ref = ray.put(entry.model_path.read_bytes())
            decoded = decoded_dataset(ray, images.records, size=entry.input_size, resize=resize, known_shas=known,
                                      batch_size=batch_size, resize_filter=resize_filter)
            dataset = map_stage(decoded, EmbedActor, batch_size=batch_size, **actors.map_args(ray),
                                fn_constructor_kwargs={"model": model_ref, "size": entry.input_size,
                                                       "dim": entry.embedding_dim, "device": device,
                                                       "threads": threads})
            for batch in ordered_batches(dataset, commit_rows):
                _commit(batch, images.records, key, writer, summary)
                if advance:
                    advance(len(batch["i"]))
            if images.skipped:
                writer.add_failures([(path, "", reason) for path, reason in images.skipped])
    summary.seconds = time.perf_counter() - started
    return summary


def _commit(batch: dict[str, np.ndarray], records: list[ImageRecord], key: str, writer: CacheWriter,
            summary: ExtractSummary) -> None:
    """Count one batch of results and commit its new embeddings and failures, as the local engine does."""
    keep, rows, failures, in_batch = [], [], [], set()
    for j, (i, sha, status) in enumerate(zip(batch["i"], batch["sha256"], batch["status"])):
        record = records[int(i)]
        summary.total += 1
        if status == FAILED:
            failures.append((record.relpath, sha, batch["error"][j]))
            summary.failures.append((record.relpath, batch["error"][j]))
        elif status == CACHED:
            summary.cached += 1
        elif sha in in_batch or writer.has(key, sha):
            summary.duplicates += 1
        else:
            in_batch.add(sha)
            keep.append(j)
            rows.append(ImageRow(record.relpath, sha, record.label, record.split,
                                 int(batch["width"][j]), int(batch["height"][j])))
    if rows:
        writer.add(key, rows, batch["embedding"][keep])
        summary.embedded += len(rows)
    if failures:
        writer.add_failures(failures)
    summary.provider = summary.provider or str(batch["provider"][0])
