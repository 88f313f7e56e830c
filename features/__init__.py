"""Features: images in, embeddings out — decoding, input discovery, the streaming stage (decoder, stage,
local and Ray engines), extraction and the HDF5 cache.

Importing this package does not import ONNX Runtime or TensorFlow.
"""
from .cache import (CacheError, CacheLockedError, CacheWriter, FeatureSet, FeatureSetReader, describe,
                    list_feature_sets, read_feature_set)
from .decoder import Decoded, decode_record, iter_decoded
from .extract import CacheSink, ExtractSummary, extract
from .images import ImageError, decode_image, load_image, resize_image
from .sources import ImageRecord, ImageSource, discover
from .stream import LocalEngine, Sink, Stage, StageModel, StreamSummary, run_stream

__all__ = [
    "CacheError", "CacheLockedError", "CacheSink", "CacheWriter", "Decoded", "ExtractSummary", "FeatureSet",
    "FeatureSetReader", "ImageError", "ImageRecord", "ImageSource", "LocalEngine", "Sink", "Stage", "StageModel",
    "StreamSummary", "decode_image", "decode_record", "describe", "discover", "extract", "iter_decoded",
    "list_feature_sets", "load_image", "read_feature_set", "resize_image", "run_stream",
]


def __getattr__(name: str):
    if name == "EmbeddingTransformer":  # imports scikit-learn: only when asked for
        from .transformer import EmbeddingTransformer

        return EmbeddingTransformer
    raise AttributeError(name)
