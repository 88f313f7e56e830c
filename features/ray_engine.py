"""The Ray engine of the streaming stage (``--engine ray``): the same stage, sink and guarantees as
:class:`tlpipe.features.stream.LocalEngine`, on a Ray cluster.

- reader: the driver lists the inputs, drops those the sink already holds, and hands Ray Data one row
  per image (its index and absolute path; the files must be readable at that path on every node);
- decode tasks (Ray Data ``map_batches`` tasks, one CPU each): :func:`tlpipe.features.decoder.decode_record`
  on each path; content the sink already knows (a set of sha256s broadcast through the object store) is
  hashed but not decoded;
- model: an actor pool (one actor per GPU where the cluster has GPUs, else one CPU actor per node), each
  loading the :class:`~tlpipe.features.stream.StageModel` from model bytes shipped through the object
  store; actors are restarted and their tasks retried when a worker dies;
- sink: results stream back to the driver in input order (``iter_batches``), the only writer, which
  commits every ``commit_rows`` results through :meth:`Stage.commit` before taking more. Rows delivered
  twice by a retried task are dropped by input index, so neither a worker nor a driver failure leaves
  duplicates, and a re-run resumes from what was committed.

Ray is imported lazily; without it these functions raise ``MissingExtra`` naming ``pip install 'tlpipe[ray]'``.
"""

from __future__ import annotations

import functools
import os
import pickle
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from tlpipe.backbones.deps import require
from tlpipe.errors import InputError

from .decoder import decode_record, stack_pixels
from .extract import ExtractSummary, extract
from .fastdecode import DEFAULT_RESIZE_FILTER
from .sources import ImageRecord
from .stream import Engine, Stage, StageModel

__all__ = [
    "ACTOR_RESTARTS",
    "ModelActor",
    "RayEngine",
    "TASK_RETRIES",
    "decode_batch",
    "decoded_dataset",
    "extract_ray",
    "map_stage",
    "ordered_batches",
    "plan_actors",
    "ray_cluster",
    "run_on_ray",
]

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


def plan_actors(ray: ModuleType, num_actors: int | None = None, actor_gpus: float | None = None) -> dict[str, Any]:
    """The inference actor pool, as :func:`map_stage` arguments: its size, each actor's resources, restarts and
    task retries.

    ``actor_gpus`` None: 1 per actor where the cluster has GPUs, else CPU actors. ``num_actors`` None: as
    many as the GPUs allow, or one CPU actor per alive node with a CPU (its ONNX Runtime uses that node's
    cores, as the local engine does)."""
    cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
    gpus = (1.0 if cluster_gpus else 0.0) if actor_gpus is None else float(actor_gpus)
    if gpus < 0:
        raise InputError(f"actor_gpus must be at least 0, not {actor_gpus}")
    if gpus > cluster_gpus:
        raise InputError(f"{gpus:g} GPU per actor asked, the cluster has {cluster_gpus:g}")
    if num_actors is None:
        num_actors = (
            int(cluster_gpus // gpus)
            if gpus
            else sum(1 for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) >= 1)
        )
    if num_actors < 1:
        raise InputError(f"num_actors must be at least 1, not {num_actors}")
    return {
        "compute": ray.data.ActorPoolStrategy(size=num_actors),
        "num_cpus": 1,
        "num_gpus": gpus or None,
        "max_restarts": ACTOR_RESTARTS,
        "max_task_retries": ACTOR_RESTARTS,
    }


# -- decode tasks ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)  # per worker process: the last broadcast set, fetched once
def _known_shas(ref) -> frozenset[str]:
    return require("ray").get(ref)


def decode_batch(
    batch: dict[str, np.ndarray], *, size: int, resize: str, known, resize_filter: str
) -> dict[str, np.ndarray]:
    """Ray Data task: :func:`~tlpipe.features.decoder.decode_record` on each path, each result pickled (a
    column of bytes)."""
    is_known = _known_shas(known).__contains__
    decoded = [
        decode_record(ImageRecord("", str(path), None, None), size, resize, is_known, resize_filter)
        for path in batch["abspath"]
    ]
    return {"i": batch["i"], "decoded": np.array([pickle.dumps(d) for d in decoded], dtype=object)}


def decoded_dataset(
    ray: ModuleType,
    records: list[ImageRecord],
    *,
    size: int,
    resize: str,
    known_shas: set[str],
    batch_size: int,
    resize_filter: str = DEFAULT_RESIZE_FILTER,
):
    """Ray Data rows ``i, decoded`` (a pickled :class:`~tlpipe.features.decoder.Decoded`) for ``records``
    (row i = records[i])."""
    known = ray.put(frozenset(known_shas))
    items = [{"i": i, "abspath": r.abspath} for i, r in enumerate(records)]
    return map_stage(
        ray.data.from_items(items),
        decode_batch,
        batch_size=batch_size,
        num_cpus=1,
        max_retries=TASK_RETRIES,
        fn_kwargs={"size": size, "resize": resize, "known": known, "resize_filter": resize_filter},
    )


class ModelActor:
    """Ray Data actor: decoded rows in; out, each row's decoded item without its pixels and the model's output
    row (None when not decoded), pickled together.

    The model's file comes as bytes through the object store (``model_ref``), written to a temporary file on
    this node for as long as the sessions are created.
    """

    def __init__(self, model_ref: Any, model: StageModel, device: str, threads: int | None):
        with tempfile.TemporaryDirectory(prefix="tlpipe-model-") as folder:
            path = Path(folder) / "model.onnx"
            path.write_bytes(require("ray").get(model_ref))
            self.runner = model.load(device, threads, 1, path=path)  # the recipe's own path is the driver's

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [pickle.loads(b) for b in batch["decoded"]]
        pixels = [item.pixels for item in items if item.pixels is not None]
        rows = iter(self.runner(stack_pixels(pixels)) if pixels else ())
        results = [(replace(item, pixels=None), None if item.pixels is None else next(rows)) for item in items]
        return {
            "i": batch["i"],
            "provider": np.full(len(items), self.runner.provider, dtype=object),
            "decoded": np.array([pickle.dumps(result) for result in results], dtype=object),
        }


def ordered_batches(dataset, rows: int) -> Iterator[dict[str, np.ndarray]]:
    """The dataset's rows in input order, as numpy batches of ``rows``, each row once (a retried task may
    deliver a block again: rows already seen, by ``i``, are dropped)."""
    dataset.context.execution_options.preserve_order = True
    seen: set[int] = set()
    for batch in dataset.iter_batches(batch_size=rows, batch_format="numpy"):
        fresh = [j for j, i in enumerate(batch["i"].tolist()) if i not in seen]
        seen.update(batch["i"].tolist())
        if fresh:
            yield {k: v[fresh] for k, v in batch.items()}


@dataclass
class RayEngine(Engine):
    """The stage on a Ray cluster. Use as a context manager (connects and plans the actors), then :meth:`run`.

    Attributes
    ----------
    address : str, optional
        None starts Ray on this machine (or uses the Ray this process already initialised); "auto" or
        "host:port" joins a running cluster.
    num_actors, actor_gpus
        See :func:`plan_actors`.
    commit_rows : int
        Results per commit on the driver (a driver kill loses at most that much finished work).
    device : str
        "auto" | "cpu" | "cuda" for the actors' sessions.
    threads : int, optional
        ONNX Runtime threads per actor (default: the cores of its node).
    """

    name = "ray"

    address: str | None = None
    num_actors: int | None = None
    actor_gpus: float | None = None
    commit_rows: int = 256
    device: str = "auto"
    threads: int | None = None
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)
    _actors: dict[str, Any] | None = field(default=None, repr=False)  # the pool's map_stage arguments, once entered

    def __post_init__(self) -> None:
        if self.commit_rows < 1:
            raise InputError(f"commit_rows must be at least 1, not {self.commit_rows}")

    def __enter__(self) -> RayEngine:
        with ExitStack() as stack:  # left (Ray shut down) if planning the actors fails
            ray = stack.enter_context(ray_cluster(self.address))
            self._actors = plan_actors(ray, self.num_actors, self.actor_gpus)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self._actors = None

    def run(
        self,
        stage: Stage,
        records: Sequence[ImageRecord],
        model: StageModel,
        *,
        batch_size: int,
        resize: str,
        resize_filter: str,
    ) -> None:
        """Stream ``records`` through ``model`` on the cluster into ``stage``'s sink (in input order)."""
        if self._actors is None:
            raise RuntimeError("enter the RayEngine (with engine: ...) before running it")
        if not isinstance(model, StageModel):
            raise TypeError("the Ray engine runs a StageModel (a model file), not a loaded session")
        ray, todo = require("ray"), stage.todo(records)
        if todo:
            decoded = decoded_dataset(
                ray,
                todo,
                size=model.input_size,
                resize=resize,
                known_shas=stage.known_shas,
                batch_size=batch_size,
                resize_filter=resize_filter,
            )
            dataset = map_stage(
                decoded,
                ModelActor,
                batch_size=batch_size,
                **self._actors,
                fn_constructor_kwargs={
                    "model_ref": ray.put(model.path.read_bytes()),
                    "model": model,
                    "device": self.device,
                    "threads": self.threads,
                },
            )
            for batch in ordered_batches(dataset, self.commit_rows):
                _commit(stage, batch, todo)


def _commit(stage: Stage, batch: dict[str, np.ndarray], todo: Sequence[ImageRecord]) -> None:
    """One batch of actor results as decoded items, committed through the stage like the local engine's."""
    results = [pickle.loads(b) for b in batch["decoded"]]
    items = [replace(item, record=todo[int(i)]) for i, (item, _) in zip(batch["i"], results)]
    outputs = [row for item, (_, row) in zip(items, results) if stage.admit(item)]
    stage.summary.provider = stage.summary.provider or str(batch["provider"][0])
    stage.commit(items, np.stack(outputs) if outputs else np.empty((0, 0), np.float32))


# -- the commands on Ray ---------------------------------------------------------------------------------
def run_on_ray(
    command: Callable[..., Any],
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    address: str | None = None,
    num_actors: int | None = None,
    actor_gpus: float | None = None,
    commit_rows: int = 256,
    device: str = "auto",
    threads: int | None = None,
    **options: Any,
) -> Any:
    """``command(source, out, **options)`` (extract or score) with a :class:`RayEngine` as its engine.

    Parameters
    ----------
    command : callable
        :func:`tlpipe.features.extract.extract` or :func:`tlpipe.pipeline.score.score`.
    source, out, device, **options
        As for ``command``; ``batch_size`` is the images per decode task and per inference call. The local
        engine's ``workers`` and ``streams`` do not apply.
    address, num_actors, actor_gpus, commit_rows, threads
        See :class:`RayEngine` (``commit_rows``: results per durable commit on the driver; ``threads``: ONNX
        Runtime threads per actor).

    Returns
    -------
    ExtractSummary or ScoreSummary
        ``command``'s; ``seconds`` includes starting the actors.

    Raises
    ------
    tlpipe.backbones.deps.MissingExtra
        Ray is not installed (checked before any export).
    ValueError
        ``batch_size`` or ``commit_rows`` below 1; an impossible actor plan; as ``command``.
    """
    require("ray")  # these checks before exporting a backbone, which can take minutes
    if (batch_size := options.get("batch_size", 32)) < 1:
        raise InputError(f"batch_size must be at least 1, not {batch_size}")
    engine = RayEngine(address, num_actors, actor_gpus, commit_rows, device, threads)
    return command(source, out, device=device, engine=engine, **options)


def extract_ray(source: str | os.PathLike[str], out: str | os.PathLike[str], **options: Any) -> ExtractSummary:
    """:func:`tlpipe.features.extract.extract` with the Ray engine: same cache, same counts, same resume.

    Parameters
    ----------
    source, out, **options
        As for :func:`~tlpipe.features.extract.extract`, plus the Ray engine's ``address``, ``num_actors``,
        ``actor_gpus``, ``commit_rows`` and ``threads`` (see :func:`run_on_ray`).

    Returns
    -------
    ExtractSummary
        ``seconds`` includes starting the actors.

    Raises
    ------
    tlpipe.backbones.deps.MissingExtra, ValueError, CacheError
        See :func:`run_on_ray` and :func:`~tlpipe.features.extract.extract`.
    """
    from tlpipe.features.extract import _check_engine_options

    choice = options.get("choice")
    _check_engine_options(
        RayEngine,
        augment=options.get("augment", 0),
        several=len(options.get("sizes") or [None]) > 1 or len(options.get("layers") or [None]) > 1,
        tta=getattr(choice, "tta", options.get("tta", "none")),
    )
    return run_on_ray(extract, source, out, **options)
