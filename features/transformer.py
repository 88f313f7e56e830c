"""A scikit-learn transformer: image paths -> embeddings, computed through (and kept in) the HDF5 cache."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from tlpipe.backbones.export import obtain_backbone
from tlpipe.errors import InputError

from .cache import CacheWriter, feature_set_key, lookup_embeddings
from .fastdecode import DEFAULT_RESIZE_FILTER
from .images import ImageError, read_image_file
from .sources import ImageRecord

__all__ = ["EmbeddingTransformer"]


class EmbeddingTransformer(TransformerMixin, BaseEstimator):
    """Embeds image files with an ONNX backbone; embeddings are cached in ``cache`` by content hash.

    Composes with heads: ``make_pipeline(EmbeddingTransformer(...), make_head("logreg"))`` fits on a
    list of paths. ``fit`` resolves (and if needed exports) the backbone; ``transform`` returns one row
    per path, in order. Images already in the cache are looked up by sha256 (only their rows are read)
    with the cache opened read-only, so any number of processes can transform cached images at once
    (``cross_val_score(..., n_jobs=2)``); only missing images open the cache for writing (its lock)
    and start the ONNX session, one per fit, reused by later ``transform`` calls. ``resize`` and
    ``resize_filter`` as in extract (both part of the feature set's key).

    Attributes
    ----------
    entry_ : the model store entry; key_ : the feature set key; n_features_in_ : 1 (one input column,
    the image path); n_features_out_ : the embedding dimension.
    """

    def __init__(
        self,
        backbone: str | None = "mobilenet_v2",
        weights="imagenet",
        cache: str | os.PathLike = "embeddings.h5",
        size: int | None = None,
        layer: str | None = None,
        pooling: str = "avg",
        model=None,
        device: str = "auto",
        batch_size: int = 32,
        store=None,
        resize: str = "squash",
        resize_filter: str = DEFAULT_RESIZE_FILTER,
    ):
        self.backbone, self.weights, self.cache, self.size, self.layer = backbone, weights, cache, size, layer
        self.pooling, self.model, self.device, self.batch_size, self.store = pooling, model, device, batch_size, store
        self.resize, self.resize_filter = resize, resize_filter

    def fit(self, X=None, y=None):
        """Resolve the backbone (export it into the store if needed). ``X`` (paths) is only counted."""
        self.entry_ = obtain_backbone(
            self.backbone, self.weights, self.size, self.layer, self.pooling, store=self.store, model=self.model
        )
        self.key_ = feature_set_key(self.entry_.key, self.resize, self.resize_filter)  # part of the identity
        self.n_features_out_ = self.entry_.embedding_dim
        self.n_features_in_ = 1  # one input column: the image path
        self._embedder = None  # the ONNX session of this fit, started on the first image not in the cache
        return self

    def transform(self, X) -> np.ndarray:
        """(n,) image paths -> (n, n_features_out_) float32 embeddings.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            Before :meth:`fit`.
        ValueError
            When images cannot be embedded (named, up to five).
        """
        check_is_fitted(self, "entry_")
        paths = [Path(p) for p in X]
        hashes, refused = [], []
        for p in paths:  # size and header first: a multi-GB file is refused unread (images.read_image_file)
            try:
                hashes.append(hashlib.sha256(read_image_file(p)).hexdigest())
            except ImageError as exc:
                refused.append(f"{p}: {exc.reason}")
        if refused:
            raise InputError(f"{len(refused)} of {len(paths)} images could not be embedded: {'; '.join(refused[:5])}")
        found = lookup_embeddings(self.cache, self.key_, hashes)
        missing = [i for i, h in enumerate(hashes) if h not in found]
        if missing:
            found |= self._embed([paths[i] for i in missing], [hashes[i] for i in missing])
        return np.stack([found[h] for h in hashes]).astype(np.float32)

    def _embed(self, paths: list[Path], hashes: list[str]) -> dict[str, np.ndarray]:
        """Embed images not in the cache into it (writer lock), with this fit's one ONNX session."""
        from tlpipe.backbones.runtime import OnnxEmbedder

        from .extract import extract_into
        from .stream import LocalEngine

        if getattr(self, "_embedder", None) is None:
            self._embedder = OnnxEmbedder(self.entry_.model_path, self.device)
        records = [ImageRecord(str(p), str(p.resolve()), None, None) for p in paths]
        with CacheWriter(self.cache) as writer:
            summary = extract_into(
                writer,
                records,
                self.entry_,
                LocalEngine(),
                model=self._embedder,
                batch_size=self.batch_size,
                resize=self.resize,
                resize_filter=self.resize_filter,
            )
        if summary.failures:
            details = "; ".join(f"{p}: {r}" for p, r in summary.failures[:5])
            raise InputError(f"{summary.failed} of {len(paths)} images could not be embedded: {details}")
        return lookup_embeddings(self.cache, self.key_, hashes)

    def __getstate__(self) -> dict:
        # An ONNX Runtime session cannot be pickled: a copy (joblib worker, saved pipeline) starts its own.
        return {k: v for k, v in self.__dict__.items() if k != "_embedder"}

    def get_feature_names_out(self, input_features=None):
        check_is_fitted(self, "entry_")
        return np.array([f"emb{i}" for i in range(self.n_features_out_)], dtype=object)
