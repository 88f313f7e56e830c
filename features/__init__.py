"""Features: images in, embeddings out — decoding, input discovery, the streaming stage (decoder, stage,
local and Ray engines), extraction and the HDF5 cache.

Importing this package does not import ONNX Runtime or TensorFlow.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# public name -> submodule; imported on first use, so code that needs only the cache (heads, compare, and
# every joblib worker they start) does not pay for Pillow, the decoder and the stage (~55 ms a process)
_NAMES = {
    "cache": (
        "CacheError",
        "CacheLockedError",
        "CacheWriter",
        "FeatureSet",
        "FeatureSetReader",
        "describe",
        "list_feature_sets",
        "read_feature_set",
    ),
    "decoder": ("Decoded", "decode_record", "iter_decoded"),
    "extract": ("CacheSink", "ExtractSummary"),
    "images": ("ImageError", "decode_image", "load_image", "resize_image"),
    "sources": ("ImageRecord", "ImageSource", "discover"),
    "stream": ("LocalEngine", "Sink", "Stage", "StageModel", "StreamSummary", "run_stream"),
    "transformer": ("EmbeddingTransformer",),  # imports scikit-learn
}
_HOME = {name: module for module, names in _NAMES.items() for name in names}
# ``tlpipe.features.extract`` is the submodule (one name, one meaning): the function is ``tlpipe.extract``
# (the facade) or ``tlpipe.features.extract.extract``.

if TYPE_CHECKING:
    from .cache import (
        CacheError,
        CacheLockedError,
        CacheWriter,
        FeatureSet,
        FeatureSetReader,
        describe,
        list_feature_sets,
        read_feature_set,
    )
    from .decoder import Decoded, decode_record, iter_decoded
    from .extract import CacheSink, ExtractSummary
    from .images import ImageError, decode_image, load_image, resize_image
    from .sources import ImageRecord, ImageSource, discover
    from .stream import LocalEngine, Sink, Stage, StageModel, StreamSummary, run_stream
    from .transformer import EmbeddingTransformer

__all__ = sorted(name for name in _HOME if name != "EmbeddingTransformer")


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(import_module(f"{__name__}.{_HOME[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(_HOME)
