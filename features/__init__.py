"""Features: images in, embeddings out — decoding, input discovery, extraction and the HDF5 cache.

Importing this package does not import ONNX Runtime or TensorFlow.
"""
from .cache import CacheError, CacheLockedError, CacheWriter, FeatureSet, describe, list_feature_sets, read_feature_set
from .extract import ExtractSummary, extract
from .images import ImageError, decode_image, load_image, resize_image
from .sources import ImageRecord, ImageSource, discover

__all__ = [
    "CacheError", "CacheLockedError", "CacheWriter", "ExtractSummary", "FeatureSet", "ImageError", "ImageRecord",
    "ImageSource", "decode_image", "describe", "discover", "extract", "list_feature_sets", "load_image",
    "read_feature_set", "resize_image",
]


def __getattr__(name: str):
    if name == "EmbeddingTransformer":  # imports scikit-learn: only when asked for
        from .transformer import EmbeddingTransformer

        return EmbeddingTransformer
    raise AttributeError(name)
