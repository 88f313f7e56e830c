"""tlpipe: transfer learning for a folder of photos.

The installed distribution has one top-level name, ``tlpipe``; its three packages live in the
repository's top-level folders and install as ``tlpipe.backbones`` (models), ``tlpipe.features``
(images, the streaming stage, the HDF5 cache) and ``tlpipe.pipeline`` (heads, evaluation, scoring,
fine-tuning, the CLI).

This facade imports nothing heavy: each name is resolved on first use, so ``import tlpipe`` stays fast
and works without TensorFlow or ONNX Runtime installed.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

# Run from a source checkout that was never installed (``PYTHONPATH=checkout python -m tlpipe.pipeline.cli``,
# as on a machine without network to install it): the three packages are the checkout's top-level folders,
# so they are found beside this one. An installed tlpipe maps them through setuptools' package-dir instead,
# and there is no `backbones` folder beside the installed `tlpipe`, so this changes nothing there.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "backbones" / "registry.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821 - a package's __path__

try:
    __version__ = version("tlpipe")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

# public name -> (module, attribute): the workflows, the settings they take, their results and the error root
_FACADE: dict[str, tuple[str, str]] = {
    # workflows (one per command)
    "extract": ("tlpipe.features.extract", "extract"),
    "fit_head": ("tlpipe.pipeline.heads.fit", "train_head"),
    "compare": ("tlpipe.pipeline.heads.selection", "compare"),
    "evaluate": ("tlpipe.pipeline.heads.evaluate", "evaluate"),
    "score": ("tlpipe.pipeline.scoring.score", "score"),
    "predict": ("tlpipe.pipeline.scoring.score", "predict"),
    "export_model": ("tlpipe.pipeline.scoring.fuse", "export_model"),
    "audit": ("tlpipe.pipeline.audit.checks", "audit"),
    "suggest": ("tlpipe.pipeline.suggest", "suggest"),
    "read_feature_set": ("tlpipe.features.cache", "read_feature_set"),
    # settings as values
    "ModelChoice": ("tlpipe.backbones.choice", "ModelChoice"),
    "FeatureSpec": ("tlpipe.features.spec", "FeatureSpec"),
    "HeadSpec": ("tlpipe.pipeline.heads.spec", "HeadSpec"),
    "RunOptions": ("tlpipe.features.spec", "RunOptions"),
    # results
    "FeatureSet": ("tlpipe.features.cache", "FeatureSet"),
    "ExtractSummary": ("tlpipe.features.extract", "ExtractSummary"),
    "TrainResult": ("tlpipe.pipeline.heads.fit", "TrainResult"),
    "CompareResult": ("tlpipe.pipeline.heads.selection", "CompareResult"),
    "EvalResult": ("tlpipe.pipeline.heads.evaluate", "EvalResult"),
    "AuditResult": ("tlpipe.pipeline.audit.checks", "AuditResult"),
    # errors
    "TlpipeError": ("tlpipe.errors", "TlpipeError"),
}

__all__ = ["__version__", *_FACADE]


def __getattr__(name: str) -> Any:
    if name in _FACADE:
        module, attribute = _FACADE[name]
        value = getattr(import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tlpipe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
