"""A scikit-learn transformer: image paths -> embeddings, computed through (and kept in) the HDF5 cache."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from tlpipe.backbones.export import obtain_backbone
from tlpipe.backbones.runtime import OnnxEmbedder

from .cache import CacheWriter, feature_set_key, lookup_embeddings
from .extract import run_extraction
from .fastdecode import DEFAULT_RESIZE_FILTER
from .sources import ImageRecord


class EmbeddingTransformer(TransformerMixin, BaseEstimator):
    """Embeds image files with an ONNX backbone; embeddings are cached in ``cache`` by content hash.

    Composes with heads: ``make_pipeline(EmbeddingTransformer(...), make_head("logreg"))`` fits on a
    list of paths. ``fit`` resolves (and if needed exports) the backbone; ``transform`` embeds what the
    cache lacks and returns one row per path, in order. ``resize`` and ``resize_filter`` as in extract (both
    part of the feature set's key).
    """

    def __init__(self, backbone: str | None = "mobilenet_v2", weights="imagenet", cache: str | os.PathLike = "embeddings.h5",
                 size: int | None = None, layer: str | None = None, pooling: str = "avg", model=None,
                 device: str = "auto", batch_size: int = 32, store=None, resize: str = "squash",
                 resize_filter: str = DEFAULT_RESIZE_FILTER):
        self.backbone, self.weights, self.cache, self.size, self.layer = backbone, weights, cache, size, layer
        self.pooling, self.model, self.device, self.batch_size, self.store = pooling, model, device, batch_size, store
        self.resize, self.resize_filter = resize, resize_filter

    def fit(self, X=None, y=None):
        self.entry_ = obtain_backbone(self.backbone, self.weights, self.size, self.layer, self.pooling,
                                      store=self.store, model=self.model)
        self.key_ = feature_set_key(self.entry_.key, self.resize, self.resize_filter)  # part of the identity
        self.n_features_out_ = self.entry_.embedding_dim
        return self

    def transform(self, X) -> np.ndarray:
        if not hasattr(self, "entry_"):
            self.fit()
        paths = [Path(p) for p in X]
        records = [ImageRecord(str(p), str(p.resolve()), None, None) for p in paths]
        with CacheWriter(self.cache) as writer:
            summary = run_extraction(records, self.entry_, writer, OnnxEmbedder(self.entry_.model_path, self.device),
                                     batch_size=self.batch_size, resize=self.resize,
                                     resize_filter=self.resize_filter)
        if summary.failures:
            details = "; ".join(f"{p}: {r}" for p, r in summary.failures[:5])
            raise ValueError(f"{summary.failed} of {len(paths)} images could not be embedded: {details}")
        hashes = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
        found = lookup_embeddings(self.cache, self.key_, hashes)
        return np.stack([found[h] for h in hashes]).astype(np.float32)

    def get_feature_names_out(self, input_features=None):
        return np.array([f"emb{i}" for i in range(self.n_features_out_)], dtype=object)
