"""ONNX Runtime sessions with explicit provider checks: ``cuda`` is strict, ``auto`` says when it falls back."""

from __future__ import annotations

import logging
import os
import queue
from pathlib import Path

import numpy as np

from tlpipe.errors import InputError, TlpipeError

from .deps import installed_onnxruntime_distributions, require

__all__ = [
    "CPU_MICRO_BATCH",
    "DEVICES",
    "MIXED_BUILDS_ENV",
    "OnnxEmbedder",
    "ProviderError",
    "create_session",
    "default_streams",
    "physical_cores",
    "session_options",
]

log = logging.getLogger(__name__)
DEVICES = ("auto", "cpu", "cuda")


class ProviderError(TlpipeError, RuntimeError):
    """The requested execution provider is not available or did not attach."""


MIXED_BUILDS_ENV = "TLPIPE_ALLOW_MIXED_ONNXRUNTIME"


def _onnxruntime():
    """The ``onnxruntime`` module, refusing an install where several ONNX Runtime builds share it.

    Two builds installed into one environment overwrite each other's files, so which one runs is an
    accident. Setting ``TLPIPE_ALLOW_MIXED_ONNXRUNTIME=1`` is the documented override for a deliberate
    layout where one build *shadows* the other on ``sys.path`` (e.g. ``onnxruntime-gpu`` unpacked into a
    folder that ``PYTHONPATH`` puts before the image's CPU build, as on the lent GPU machines): tlpipe then
    logs which file the module was loaded from and carries on.

    Raises
    ------
    ProviderError
        Several builds are installed and the override is not set.
    MissingExtra
        No ONNX Runtime is installed.
    """
    builds = installed_onnxruntime_distributions()
    allowed = os.environ.get(MIXED_BUILDS_ENV, "").strip().lower() in ("1", "true", "yes")
    if len(builds) > 1 and not allowed:
        raise ProviderError(
            f"several ONNX Runtime builds are installed together ({', '.join(builds)}); they share "
            f"the `onnxruntime` module and break each other: pip uninstall all but one "
            f"(tlpipe[cpu] or tlpipe[gpu]), or set {MIXED_BUILDS_ENV}=1 if one shadows the "
            f"other on purpose"
        )
    ort = require("onnxruntime")
    if len(builds) > 1:
        log.info(
            "%s=1: %s installed together; using onnxruntime %s from %s",
            MIXED_BUILDS_ENV,
            ", ".join(builds),
            getattr(ort, "__version__", "?"),
            getattr(ort, "__file__", "?"),
        )
    return ort


_CUDA_LIBRARIES_LOADED = False


def _preload_cuda_libraries(ort) -> None:
    """Load the CUDA / cuDNN libraries of pip's ``nvidia-*`` packages before a CUDA session is made.

    onnxruntime-gpu >= 1.21 does not find those libraries on its own unless PyTorch was imported first;
    ``onnxruntime.preload_dlls()`` loads them (ONNX Runtime's CUDA EP documentation, "Preload DLLs").
    Called once per process, only when the CUDA provider is present; a failure is logged, and the
    provider check after session creation then reports whether CUDA attached.
    """
    global _CUDA_LIBRARIES_LOADED
    if _CUDA_LIBRARIES_LOADED or not hasattr(ort, "preload_dlls"):
        return
    _CUDA_LIBRARIES_LOADED = True
    try:
        ort.preload_dlls()
    except Exception as exc:  # a missing library shows up as CUDA not attaching, reported by create_session
        log.debug("onnxruntime.preload_dlls() failed: %s", exc)


def physical_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def session_options(threads: int | None = None):
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or physical_cores()
    options.inter_op_num_threads = 1
    # Decoding threads share the cores: idle ORT workers must not spin on them.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def create_session(model_path: str | Path, device: str = "auto", threads: int | None = None):
    """An InferenceSession on ``device`` (auto | cpu | cuda), checked with ``get_providers()``."""
    if device not in DEVICES:
        raise InputError(f"device must be one of {DEVICES}, not {device!r}")
    ort = _onnxruntime()
    available = ort.get_available_providers()
    wants_cuda = device in ("auto", "cuda")
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise ProviderError(
            f"--device cuda: this ONNX Runtime has no CUDA provider (available: {', '.join(available)}); "
            f"install tlpipe[gpu] (onnxruntime-gpu) and the CUDA libraries it needs"
        )
    providers = ["CPUExecutionProvider"]
    if wants_cuda and "CUDAExecutionProvider" in available:
        _preload_cuda_libraries(ort)
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = ort.InferenceSession(str(model_path), sess_options=session_options(threads), providers=providers)
    except Exception as exc:  # some builds raise, rather than fall back, when the CUDA provider cannot start
        if providers[0] != "CUDAExecutionProvider":
            raise
        if device == "cuda":
            raise ProviderError(
                f"--device cuda: the CUDA provider failed to start ({' '.join(str(exc).split())[:300]})"
            ) from exc
        log.warning(
            "--device auto: the CUDA provider failed to start (%s); running on the CPU",
            " ".join(str(exc).split())[:300],
        )
        session = ort.InferenceSession(
            str(model_path), sess_options=session_options(threads), providers=["CPUExecutionProvider"]
        )
    attached = session.get_providers()
    if wants_cuda and "CUDAExecutionProvider" not in attached:
        if device == "cuda":
            raise ProviderError(
                "--device cuda: the CUDA provider did not attach (missing CUDA/cuDNN libraries?); "
                f"the session runs on {', '.join(attached)}"
            )
        if "CUDAExecutionProvider" in available:
            log.warning(
                "--device auto: CUDA is available but did not attach (no GPU visible, or CUDA/cuDNN "
                "libraries missing); running on the CPU"
            )
    return session


def default_streams() -> int:
    """Concurrent CPU sessions for throughput work: two single-purpose sessions that split the cores beat one
    session using them all (no straggler thread holds up an operator while a decode thread has its core;
    measured 2x1 vs 1x2 threads on 2 cores: fp32 221 vs 202 img/s, int8 470 vs 427 at batch 32)."""
    return min(2, physical_cores())


CPU_MICRO_BATCH = 4


class OnnxEmbedder:
    """uint8 image batches -> float32 embeddings through ONNX Runtime.

    ``streams`` > 1 (CPU only) holds that many sessions of ``threads`` threads each (default: the cores split
    between them); calls from that many threads at once then run side by side. On the CPU a batch runs in
    chunks of ``micro_batch`` images (default 4), whose activations stay in cache: measured on MobileNetV2
    @224 end to end, 196-201 img/s against 179-185 for whole batches of 32 (fp32; int8 +5 %)."""

    def __init__(
        self,
        model_path: str | Path,
        device: str = "auto",
        threads: int | None = None,
        streams: int = 1,
        micro_batch: int | None = None,
        output: str | None = None,
    ):
        if streams < 1:
            raise InputError(f"streams must be at least 1, not {streams}")
        if micro_batch is not None and micro_batch < 1:
            raise InputError(f"micro_batch must be at least 1, not {micro_batch}")
        per_stream = threads or max(1, physical_cores() // streams)
        self.session = create_session(model_path, device=device, threads=per_stream)
        on_cpu = self.session.get_providers()[0] == "CPUExecutionProvider"
        if not on_cpu:
            streams = 1  # one GPU session: the device runs one batch at a time anyway
        self.streams = streams
        self.micro_batch = micro_batch or (CPU_MICRO_BATCH if on_cpu else None)
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._free.put(self.session)
        for _ in range(streams - 1):
            self._free.put(create_session(model_path, device="cpu", threads=per_stream))
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = output or self.session.get_outputs()[0].name  # e.g. a fused classifier's probabilities
        self.output_names = [o.name for o in self.session.get_outputs()]
        shape = self.session.get_inputs()[0].shape
        self.input_size = int(shape[1]) if isinstance(shape[1], int) else None

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """The first output (``embeddings``) for a uint8 (N, H, W, 3) batch."""
        return self.run_outputs(images, [self.output_name])[0]

    def run_outputs(self, images: np.ndarray, names: list[str] | None = None) -> list[np.ndarray]:
        """Outputs ``names`` (default: all, in the model's order) for a uint8 (N, H, W, 3) batch, e.g. the
        per-layer embeddings of a multi-output export."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise InputError(f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
        names = names or self.output_names
        session = self._free.get()
        try:
            step = self.micro_batch or len(images)
            if len(images) <= step:
                return session.run(names, {self.input_name: images})
            parts = [session.run(names, {self.input_name: images[i : i + step]}) for i in range(0, len(images), step)]
            return [np.concatenate([p[k] for p in parts]) for k in range(len(names))]
        finally:
            self._free.put(session)
