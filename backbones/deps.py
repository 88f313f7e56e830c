"""Optional dependencies: lazy imports that fail with one line naming the extra to install."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
from types import ModuleType

from tlpipe.errors import TlpipeError

__all__ = ["MissingExtra", "_EXTRAS", "distribution_version", "installed_onnxruntime_distributions", "require"]

# module -> (distribution names that provide it, extra that installs it)
_EXTRAS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorflow": (("tensorflow", "tensorflow-cpu", "tf-nightly"), "tf"),
    "keras": (("keras",), "tf"),
    "tf2onnx": (("tf2onnx",), "tf"),
    "onnxruntime": (("onnxruntime", "onnxruntime-gpu"), "cpu"),
    "onnx": (("onnx",), "cpu"),
    "skl2onnx": (("skl2onnx",), "deploy"),
    "ray": (("ray",), "ray"),
    "pyarrow": (("pyarrow",), "parquet"),
}


class MissingExtra(TlpipeError, ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""


def require(module: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtra` with the install line for its extra."""
    if module in ("tensorflow", "keras", "tf2onnx"):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow's first import
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = _EXTRAS.get(module, ((), "dev"))[1]
        hint = "onnxruntime-gpu via tlpipe[gpu], or tlpipe[cpu]" if module == "onnxruntime" else f"tlpipe[{extra}]"
        raise MissingExtra(f"{module} is not installed: pip install '{hint}' ({exc})") from exc


def distribution_version(module: str) -> str | None:
    """Installed version of the distribution providing ``module``, without importing it."""
    for dist in _EXTRAS.get(module, ((module,), ""))[0]:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None


def installed_onnxruntime_distributions() -> list[str]:
    """Which ONNX Runtime builds are installed (more than one breaks the ``onnxruntime`` module)."""
    found = []
    for dist in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino"):
        try:
            md.version(dist)
            found.append(dist)
        except md.PackageNotFoundError:
            pass
    return found
