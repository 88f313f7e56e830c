"""EmbeddingTransformer as a scikit-learn citizen: fitted state, read-only cache hits, parallel CV."""

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline

from tests.conftest import write_photo_folder
from tlpipe.features import EmbeddingTransformer
from tlpipe.features.cache import CacheWriter, lookup_embeddings, read_feature_set
from tlpipe.pipeline.heads.estimators import make_head


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = write_photo_folder(tmp_path_factory.mktemp("photos"), per_class=8, seed=3)
    paths = sorted(root.rglob("*.jpg"))
    return paths, np.array([p.parent.name for p in paths])


def test_not_fitted_then_one_session_per_fit(photos, tiny_entry, tmp_path):
    paths, _ = photos
    embedder = EmbeddingTransformer(model=str(tiny_entry.directory), cache=tmp_path / "e.h5", device="cpu")
    with pytest.raises(NotFittedError):
        embedder.transform(paths[:2])
    with pytest.raises(NotFittedError):
        embedder.get_feature_names_out()
    embedder.fit(paths)
    assert embedder.n_features_in_ == 1 and embedder.n_features_out_ == tiny_entry.embedding_dim
    first = embedder.transform(paths[:3])
    session = embedder._embedder
    assert session is not None
    embedder.transform(paths[3:6])  # new images: embedded with the same session
    assert embedder._embedder is session
    embedder.fit(paths)
    assert embedder._embedder is None  # a new fit, a new session when one is needed
    np.testing.assert_allclose(embedder.transform(paths[:3]), first)  # from the cache: no session started
    assert embedder._embedder is None


def test_cached_images_are_read_without_the_writer_lock(photos, tiny_entry, tmp_path):
    paths, _ = photos
    cache = tmp_path / "e.h5"
    embedder = EmbeddingTransformer(model=str(tiny_entry.directory), cache=cache, device="cpu").fit(paths)
    X = embedder.transform(paths)
    with CacheWriter(cache):  # another writer holds the lock: cached rows are still readable
        np.testing.assert_array_equal(embedder.transform(paths[::-1]), X[::-1])
    # lookup by sha256 returns exactly the asked rows (only those are read), and nothing for unknown hashes
    fs = read_feature_set(cache)
    wanted = list(fs.sha256[[0, 5, 7]]) + ["0" * 64]
    found = lookup_embeddings(cache, fs.key, wanted)
    assert sorted(found) == sorted(wanted[:3])
    for i in (0, 5, 7):
        np.testing.assert_array_equal(found[fs.sha256[i]], fs.X[i])
    assert (
        lookup_embeddings(cache, "no-such-key", wanted) == {}
        and lookup_embeddings(tmp_path / "none.h5", fs.key, wanted) == {}
    )


def test_parallel_cross_validation_over_the_transformer(photos, tiny_entry, tmp_path):
    paths, labels = photos
    cache = tmp_path / "e.h5"
    embedder = EmbeddingTransformer(model=str(tiny_entry.directory), cache=cache, device="cpu")
    embedder.fit_transform(paths)  # fill the cache once
    pipe = make_pipeline(embedder, make_head("logreg", C=1.0))
    # two worker processes, each fitting and transforming: both read the cache, neither needs the lock
    # (held here all along, so a worker that asked for it would fail)
    with CacheWriter(cache):
        parallel = cross_val_score(pipe, paths, labels, cv=2, n_jobs=2, error_score="raise")
    serial = cross_val_score(pipe, paths, labels, cv=2, n_jobs=1)
    np.testing.assert_array_equal(parallel, serial)
    assert parallel.mean() > 0.7
