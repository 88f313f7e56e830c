"""The streaming stage shared by extraction and scoring: reader -> decoder -> model -> sink.

- reader: the inputs (:func:`tlpipe.features.sources.discover`), less those the sink already holds
  (:meth:`Sink.done`, e.g. a score output's paths);
- decoder (:mod:`tlpipe.features.decoder`): read, sha256, decode + resize; content the sink already
  holds (:meth:`Sink.known_shas`, e.g. a cache's feature set) is hashed but not decoded;
- model (:class:`StageModel`): anything called on a uint8 NHWC batch — a backbone (embeddings), a
  backbone followed by a head (probabilities), or a fused classifier;
- sink (:class:`Sink`): commits each batch in input order and durably (the HDF5 cache writer, the
  CSV / JSON Lines / Parquet score outputs), so a kill loses at most the batches in flight and a re-run
  resumes from what was committed.

Batching, in-order commits, progress, failure records and the counts of the closing summary live here
(:class:`Stage`) once. Engines are strategies over it: :class:`LocalEngine` (decode threads overlapping
``streams`` ONNX Runtime sessions) and :class:`tlpipe.features.ray_engine.RayEngine` (Ray Data decode
tasks and an actor pool, the driver the only writer). Both hand their batches to :meth:`Stage.commit`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tlpipe.backbones.runtime import OnnxEmbedder, default_streams
from tlpipe.errors import InputError

from .decoder import Decoded, decode_workers, iter_decoded, stack_pixels
from .fastdecode import DEFAULT_RESIZE_FILTER
from .sources import ImageRecord

__all__ = ["Engine", "LocalEngine", "MultiSizeModel", "Sink", "Stage", "StageModel", "StreamSummary", "run_stream"]

Progress = Callable[[int, int], Callable[[int], None]]


class Sink(Protocol):
    """Where the stage commits its results, batch by batch, in input order (a sink may subclass it for the
    defaults of :meth:`done` and :meth:`close`)."""

    def done(self, record: ImageRecord) -> bool:
        """Whether the output already holds this input (it is then not read at all); default: never."""
        return False

    def done_all(self, records: Sequence[ImageRecord]) -> list[bool]:
        """:meth:`done` for every input at once (a sink may tell them together, e.g. hashing files in threads)."""
        return [self.done(r) for r in records]

    def known_shas(self) -> set[str]:
        """Every sha256 whose content needs no model run (held already, or resolved by the sink itself): hashed
        but not decoded. Read once, when the inputs are known (:meth:`Stage.todo`)."""
        ...

    def append(self, items: Sequence[Decoded], outputs: np.ndarray) -> None:
        """Commit a batch durably.

        ``items``: consecutive inputs, each failed (``error``), known (``known``) or decoded; ``outputs``:
        the model's rows for the decoded ones, in order, shape (n_decoded, D).
        """
        ...

    def close(self, finish: bool = True) -> None:
        """Release the output; ``finish`` False after an error (leave it resumable); default: nothing to do."""
        return None


@dataclass
class StreamSummary:
    """The counts of one run of the stage (the closing summary).

    Attributes
    ----------
    out : str
        The sink's path.
    total : int
        Inputs listed (images found in the source).
    processed : int
        Inputs the model ran on and the sink committed.
    known : int
        Inputs whose content the sink knew (not decoded, no model run).
    duplicates : int
        Inputs whose content another input of the same run already brought (unique sinks only).
    already_done : int
        Inputs the output held before the run (not read).
    failures : list of (str, str)
        (path, reason) of inputs that could not be used, in input order.
    skipped : list of (str, str)
        (path, reason) of files refused while listing (not images, links out of the source...).
    seconds : float
        Wall time of the stream (after the model sessions are created; Ray: including the actors' start).
    provider : str
        Execution provider the model ran on.
    """

    out: str
    total: int = 0
    processed: int = 0
    known: int = 0
    duplicates: int = 0
    already_done: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    provider: str = ""

    @property
    def failed(self) -> int:
        """Inputs that failed (each with a failure record)."""
        return len(self.failures)

    @property
    def images_per_second(self) -> float:
        """Inputs handled this run per second of :attr:`seconds`."""
        handled = self.processed + self.known + self.duplicates + self.failed
        return handled / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class StageModel:
    """The model of the stage: an ONNX file from uint8 (N, size, size, 3) RGB to float32 rows, optionally
    followed by ``then`` (e.g. a head's ``predict_proba``) on its output.

    It is a recipe, not a session: each engine builds its sessions (:meth:`load`) where they run —
    the local engine in this process, the Ray engine inside each actor from the file's bytes.

    Attributes
    ----------
    path : pathlib.Path
        The ONNX model.
    input_size : int
        Side of the square input, in pixels.
    outputs : tuple of str
        The outputs to read (default: the first), e.g. a fused classifier's probabilities or the layers of a
        multi-output export, returned side by side as one float32 (N, sum of their widths) array, in this order.
    then : callable, optional
        Applied to the output, float32 (N, D) -> (N, K); must be picklable for the Ray engine.
    """

    path: Path
    input_size: int
    outputs: tuple[str, ...] = ()
    then: Callable[[np.ndarray], np.ndarray] | None = None

    def load(
        self, device: str = "auto", threads: int | None = None, streams: int = 1, path: Path | None = None
    ) -> Runner:
        """Sessions for this model (``path`` overrides where the file is, e.g. a copy on a Ray node).

        Returns
        -------
        Runner
            Callable on uint8 (N, size, size, 3) batches, with ``streams`` and ``provider``.

        Raises
        ------
        tlpipe.backbones.runtime.ProviderError
            When ``device`` "cuda" cannot be had.
        """
        embedder = OnnxEmbedder(path or self.path, device=device, threads=threads, streams=streams)
        return Runner([(embedder, list(self.outputs) or [embedder.output_name])], self.then)


@dataclass(frozen=True)
class MultiSizeModel:
    """Several :class:`StageModel` s, each at its own input size, on the same images in one pass: the
    decoder reads, hashes and decodes each image once for all the sizes
    (:func:`tlpipe.features.images.decode_image_sizes`), and the outputs come side by side, float32
    (N, sum of the widths), in ``models`` order.

    Attributes
    ----------
    models : tuple of StageModel
        One per input size (sizes distinct), without ``then``.
    """

    models: tuple[StageModel, ...]

    @property
    def input_size(self) -> tuple[int, ...]:
        return tuple(m.input_size for m in self.models)

    def load(self, device: str = "auto", threads: int | None = None, streams: int = 1) -> Runner:
        """Sessions for every model (as :meth:`StageModel.load`); the runner takes one batch per size."""
        return Runner([part for m in self.models for part in m.load(device, threads, streams).parts])


class Runner:
    """A loaded model: ``runner(pixels)`` -> output rows; thread-safe up to ``streams`` calls.

    ``parts``: (session, output names) per input size; ``pixels`` is one batch, or a tuple of one batch per part
    (their rows come side by side).
    """

    def __init__(self, parts: list[tuple[Any, list[str]]], then: Callable[[np.ndarray], np.ndarray] | None = None):
        self.parts, self.then = parts, then
        self.streams: int = min(session.streams for session, _ in parts)
        self.provider: str = parts[0][0].provider

    def __call__(self, pixels: np.ndarray | tuple[np.ndarray, ...]) -> np.ndarray:
        batches = pixels if isinstance(pixels, tuple) else (pixels,)
        out = np.hstack([np.hstack(s.run_outputs(b, names)) for (s, names), b in zip(self.parts, batches)])
        return self.then(out) if self.then is not None else out


class Stage:
    """One run of the stream into ``sink``: the per-item bookkeeping and the commits both engines share.

    Parameters
    ----------
    sink : Sink
        Where results go.
    summary : StreamSummary
        Filled in as batches commit.
    unique : bool
        Content is committed once: inputs whose sha256 another input of this run already brought are
        counted as duplicates and not passed on (the cache); otherwise every input reaches the sink
        (a score output has a row per path).
    progress : callable, optional
        ``(total, already_done) -> advance(n)``, called once the inputs are known.
    """

    def __init__(self, sink: Sink, summary: StreamSummary, *, unique: bool = False, progress: Progress | None = None):
        self.sink, self.summary, self.unique, self.progress = sink, summary, unique, progress
        self.known_shas: set[str] = set()  # the sink's known content when the run started
        self.brought: set[str] = set()  # content passed on to the model in this run (unique sinks)
        self.advance: Callable[[int], None] | None = None
        self.started = 0.0  # when the inputs were known (the stream's clock, read by run_stream)

    def todo(self, records: Sequence[ImageRecord]) -> list[ImageRecord]:
        """The inputs the sink does not hold yet; reads the sink's known content; starts the progress bar."""
        self.started = time.perf_counter()
        done_all = getattr(self.sink, "done_all", None)
        done = done_all(records) if done_all is not None else [self.sink.done(r) for r in records]
        todo = [r for r, held in zip(records, done) if not held]
        self.known_shas = self.sink.known_shas()
        self.summary.total += len(records)
        self.summary.already_done += len(records) - len(todo)
        if self.progress:
            self.advance = self.progress(self.summary.total, self.summary.already_done)
        return todo

    def admit(self, item: Decoded) -> bool:
        """Whether ``item`` goes to the model (decoded, not a duplicate); marks duplicates."""
        if item.error is not None or item.known:
            return False
        if self.unique:
            if item.sha256 in self.brought:
                item.known, item.duplicate, item.pixels = True, True, None
                return False
            self.brought.add(item.sha256)
        return True

    def commit(self, items: Sequence[Decoded], outputs: np.ndarray) -> None:
        """Hand one batch (``outputs``: rows of the admitted items, in order) to the sink and count it."""
        summary = self.summary
        self.sink.append(items, outputs)  # it may fail an item itself (e.g. a result that is not finite)
        for item in items:
            if item.error is not None:
                summary.failures.append((item.record.relpath, item.error))
            elif item.duplicate:
                summary.duplicates += 1
            elif item.known:
                summary.known += 1
            else:
                summary.processed += 1
        if self.advance:
            self.advance(len(items))


class Engine:
    """An engine of the stage: a context manager (entered before the output is opened; the Ray engine connects
    there) whose ``run(stage, records, model, *, batch_size, resize, resize_filter)`` streams ``records``
    through ``model`` into ``stage`` (calling :meth:`Stage.todo`, :meth:`Stage.admit`, :meth:`Stage.commit`)."""

    name = "local"  # the --engine it implements

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


@dataclass
class LocalEngine(Engine):
    """Decode threads overlapping inference streams in this process.

    ``workers`` decode threads (default cores + 1) keep at most ``prefetch`` decoded images in flight
    (default ``max(2 * batch_size, 4 * workers)``); full batches run in ``streams`` ONNX Runtime sessions
    (default :func:`~tlpipe.backbones.runtime.default_streams`) of ``threads`` threads each; batches commit
    in input order as their results arrive, at most ``streams`` + 1 batches held in memory.
    """

    device: str = "auto"
    workers: int | None = None
    prefetch: int | None = None
    threads: int | None = None
    streams: int | None = None

    def run(
        self,
        stage: Stage,
        records: Sequence[ImageRecord],
        model: Any,
        *,
        batch_size: int,
        resize: str,
        resize_filter: str,
    ) -> None:
        """Stream ``records`` through ``model`` into ``stage``'s sink.

        ``model``: a :class:`StageModel` or :class:`MultiSizeModel` (loaded here) or an already loaded session
        with its ``input_size`` (e.g. a :class:`~tlpipe.backbones.runtime.OnnxEmbedder`).
        """
        runner = model
        if isinstance(model, (StageModel, MultiSizeModel)):
            runner = model.load(self.device, self.threads, self.streams or default_streams())
        stage.summary.provider = str(getattr(runner, "provider", ""))
        todo = stage.todo(records)
        workers = self.workers or decode_workers()
        prefetch = self.prefetch or max(2 * batch_size, 4 * workers)
        streams: int = getattr(runner, "streams", 1)
        decoded = iter_decoded(
            todo,
            model.input_size,
            resize,
            stage.known_shas.__contains__,
            workers=workers,
            prefetch=prefetch,
            resize_filter=resize_filter,
        )
        inflight: deque[tuple[list[Decoded], Future[np.ndarray]]] = deque()

        def infer(pixels: list) -> np.ndarray:
            return runner(stack_pixels(pixels)) if pixels else np.empty((0, 0), np.float32)

        def commit_beyond(limit: int) -> None:
            while len(inflight) > limit:
                items, future = inflight.popleft()
                stage.commit(items, future.result())

        with ThreadPoolExecutor(max_workers=streams, thread_name_prefix="infer") as pool:
            for batch in iter(lambda: list(islice(decoded, batch_size)), []):
                inflight.append((batch, pool.submit(infer, [item.pixels for item in batch if stage.admit(item)])))
                commit_beyond(streams)  # at most streams running and one more decoded batch waiting
            commit_beyond(0)


def run_stream(
    records: Sequence[ImageRecord],
    model: StageModel | Any,
    sink: Sink,
    summary: StreamSummary,
    *,
    engine: Any = None,
    batch_size: int = 32,
    resize: str = "squash",
    resize_filter: str = DEFAULT_RESIZE_FILTER,
    unique: bool = False,
    progress: Progress | None = None,
) -> StreamSummary:
    """Run the stage: ``records`` -> decoder -> ``model`` -> ``sink`` with ``engine``, then close the sink.

    Parameters
    ----------
    records : sequence of ImageRecord
        The inputs, in the order their results are committed.
    model : StageModel, MultiSizeModel, loaded session or None
        What runs on each batch: a :class:`StageModel` or :class:`MultiSizeModel`, or (local engine only) a
        loaded session with its ``input_size``; None for an engine that runs no model
        (:class:`tlpipe.pipeline.scoring.score.CacheRows`).
    sink : Sink
        Where results are committed; closed here (``finish=False`` when the run raised).
    summary : StreamSummary
        Filled in and returned.
    engine : LocalEngine or RayEngine, optional
        Default: ``LocalEngine()``.
    batch_size : int
        Inputs per batch (per model call; per commit on the local engine).
    resize : str
        "squash" | "crop".
    resize_filter : str
        "bilinear" (default) | "antialias" (:data:`tlpipe.features.fastdecode.RESIZE_FILTERS`).
    unique, progress
        See :class:`Stage`.

    Returns
    -------
    StreamSummary
        ``summary``, filled in.

    Raises
    ------
    ValueError
        ``batch_size`` below 1.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, not {batch_size}")
    engine = engine or LocalEngine()
    stage = Stage(sink, summary, unique=unique, progress=progress)
    try:
        engine.run(stage, records, model, batch_size=batch_size, resize=resize, resize_filter=resize_filter)
    except BaseException:
        sink.close(finish=False)
        raise
    summary.seconds += time.perf_counter() - stage.started
    sink.close()
    return summary
