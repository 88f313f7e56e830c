"""Synthetic but embedding-like data written to real HDF5 caches."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from tlpipe.features.cache import CacheWriter, ImageRow, read_feature_set

KEY = "resnet50-224-avg-test"
MODEL_SHA = "ab" * 32


def embeddings(n_per_class=(40, 40, 40, 40), dim=32, seed=0, spread=2.5):
    """ReLU'd class blobs around random centres in a low-rank subspace; classes 0 and 1 are close (the
    hard pair). Returns float32 X (non-negative) and int labels."""
    rng = np.random.default_rng(seed)
    k = len(n_per_class)
    centres = rng.normal(0, spread, (k, 8))
    centres[1] = centres[0] + rng.normal(0, spread / 2.5, 8)
    y = np.repeat(np.arange(k), n_per_class)
    mixing = rng.normal(0, 1 / np.sqrt(8), (8, dim))
    X = np.maximum((centres[y] + rng.normal(0, 0.6, (len(y), 8))) @ mixing + rng.normal(0.3, 0.3, (len(y), dim)), 0)
    order = rng.permutation(len(y))
    return X[order].astype(np.float32), y[order]


def write_cache(path: Path, X, y, *, class_names=None, splits=None, key=KEY, metadata=None, order=None) -> Path:
    """Write rows into a real cache; label -1 is unlabelled; ``order`` is the row order written (it decides
    the cache's class numbering, which goes by first appearance)."""
    class_names = class_names or [f"class_{i}" for i in range(int(y.max()) + 1)]
    meta = {
        "key": key,
        "backbone": "ResNet50",
        "embedding_dim": X.shape[1],
        "input_size": 224,
        "pooling": "avg",
        "model_sha256": MODEL_SHA,
    } | (metadata or {})
    rows = []
    for i in range(len(y)):
        split = None if splits is None else splits[i]
        label = None if y[i] < 0 else class_names[y[i]]
        rows.append(
            ImageRow(f"img/{i:05d}.jpg", hashlib.sha256(f"{key}{i}".encode()).hexdigest(), label, split, 64, 48)
        )
    order = np.arange(len(y)) if order is None else order
    with CacheWriter(path) as writer:
        writer.ensure_feature_set(key, X.shape[1], metadata=meta)
        writer.add(key, [rows[i] for i in order], X[order])
    return path


@pytest.fixture(scope="session")
def synthetic():
    """The :func:`embeddings` generator."""
    return embeddings


@pytest.fixture(scope="session")
def cache_writer():
    """The :func:`write_cache` helper."""
    return write_cache


@pytest.fixture
def synthetic_cache(tmp_path):
    """Factory: synthetic_cache(**write_cache kwargs, n_per_class=..., dim=..., seed=...) -> FeatureSet."""
    counter = iter(range(1000))

    def make(n_per_class=(40, 40, 40, 40), dim=32, seed=0, **kwargs):
        X, y = embeddings(n_per_class, dim, seed)
        if callable(kwargs.get("splits")):
            kwargs["splits"] = kwargs["splits"](y)
        return read_feature_set(write_cache(tmp_path / f"cache{next(counter)}.h5", X, y, **kwargs))

    return make
