"""The HDF5 cache: plain-h5py readable schema, committed counts, tail repair, single writer, clear errors."""

import json

import h5py
import numpy as np
import pytest

from tlpipe.features.cache import (
    CACHE_VERSION,
    CacheError,
    CacheLockedError,
    CacheWriter,
    ImageRow,
    describe,
    read_feature_set,
)


def rows(n, start=0, label="a", split="train"):
    return [ImageRow(f"{label}/{i}.jpg", f"{i:064x}", label, split, 10 + i, 20) for i in range(start, start + n)]


def write(path, key="k", n=4, dim=3, start=0, **kw):
    with CacheWriter(path) as w:
        w.ensure_feature_set(key, dim, metadata={"backbone": "b", "input_size": 8}, **kw)
        w.add(key, rows(n, start), np.arange(n * dim, dtype=np.float32).reshape(n, dim) + start)


def test_plain_h5py_reads_the_schema(tmp_path):
    path = tmp_path / "c.h5"
    write(path, n=4)
    with h5py.File(path, "r") as f:
        assert f.attrs["tlpipe_cache_version"] == CACHE_VERSION
        n = f["images"].attrs["count"]
        assert n == 4 and f["images/sha256"][0] == b"0" * 64
        g = f["features/k"]
        emb, image_row = g["embeddings"][: g.attrs["count"]], g["image_row"][: g.attrs["count"]]
        span = f["images/path_span"][:n]
        blob = f["images/path_utf8"][: f["images"].attrs["path_bytes"]].tobytes()
        paths = [blob[a:b].decode("utf-8") for a, b in span]
        assert emb.shape == (4, 3) and [paths[r] for r in image_row] == [f"a/{i}.jpg" for i in range(4)]
        assert json.loads(f["images"].attrs["class_names"]) == ["a"]
        assert f["images/split"].asstr()[0] == "train"
        assert tuple(f["images/size"][1]) == (11, 20)


def test_no_duplicates_and_second_feature_set(tmp_path):
    path = tmp_path / "c.h5"
    write(path, n=4)
    write(path, n=6)  # 4 already there: only 2 appended
    write(path, key="other", n=4, dim=5)  # another feature set over the same images
    fs = read_feature_set(path, "k")
    assert len(fs) == 6 and len(set(fs.sha256)) == 6
    other = read_feature_set(path, "oth")  # unique prefix
    assert other.X.shape == (4, 5) and list(other.sha256) == list(fs.sha256[:4])
    assert describe(path)["images"] == 6
    with pytest.raises(CacheError, match="several feature sets"):
        read_feature_set(path)


def test_uncommitted_tail_is_cut_on_open(tmp_path):
    """Rows written past the committed count (a killed writer) are not part of the cache."""
    path = tmp_path / "c.h5"
    write(path, n=3)
    with h5py.File(path, "a") as f:  # what a writer killed before advancing the counts leaves behind
        for name in ("path_span", "source", "sha256", "label", "split", "size"):
            f["images"][name].resize(5, axis=0)
        f["images/path_utf8"].resize(f["images"].attrs["path_bytes"] + 40, axis=0)
        f["features/k/embeddings"].resize(5, axis=0)
    assert len(read_feature_set(path)) == 3
    write(path, n=5)
    fs = read_feature_set(path)
    assert len(fs) == 5 and np.allclose(fs.X[3], [9, 10, 11])


def test_second_writer_gets_a_clear_error(tmp_path):
    path = tmp_path / "c.h5"
    with CacheWriter(path):
        with pytest.raises(CacheLockedError, match="being written by pid"):
            CacheWriter(path)
    CacheWriter(path).close()  # free again


def test_dimension_and_dtype_mismatch_leave_cache_untouched(tmp_path):
    path = tmp_path / "c.h5"
    write(path, n=2)
    before = read_feature_set(path).X.copy()
    with pytest.raises(CacheError, match="dimension 3, not 4"):
        write(path, n=3, dim=4)
    with pytest.raises(CacheError, match="float32, not float16"):
        write(path, n=3, dtype="float16")
    assert np.array_equal(read_feature_set(path).X, before)


def test_float16_storage(tmp_path):
    path = tmp_path / "c.h5"
    write(path, n=2, dtype="float16")
    fs = read_feature_set(path)
    assert fs.X.dtype == np.float32 and describe(path)["feature_sets"]["k"]["dtype"] == "float16"


def test_not_a_cache(tmp_path):
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f["a"] = 1
    with pytest.raises(CacheError, match="not a tlpipe cache"):
        read_feature_set(path)
    with pytest.raises(CacheError, match="does not exist"):
        read_feature_set(tmp_path / "missing.h5")


def test_a_version_1_cache_is_refused_with_a_reason(tmp_path):
    """Schema 2 changed the layout (whole paths, source, resize in the identity): a v1 file is refused, not guessed."""
    path = tmp_path / "old.h5"
    write(path, n=2)
    with h5py.File(path, "a") as f:
        f.attrs["tlpipe_cache_version"] = 1
    before = path.read_bytes()
    for attempt in (lambda: read_feature_set(path), lambda: describe(path), lambda: CacheWriter(path)):
        with pytest.raises(CacheError, match="version 1 cache.*resize mode.*extract into a new cache file"):
            attempt()
    assert path.read_bytes() == before
