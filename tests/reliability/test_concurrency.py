"""Two writers on one cache (the second is refused, nothing is damaged) and readers while a writer appends (every
read succeeds and returns a consistent prefix of the final cache, growing over time)."""

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

import tlpipe.features.cache
from tests.conftest import write_photo_folder
from tests.reliability.conftest import one_line_error, python, tlpipe
from tlpipe import features
from tlpipe.features.cache import READ_ATTEMPTS, CacheError, describe, list_feature_sets, read_feature_set
from tlpipe.pipeline.heads.selection import compare_heads

# extract with a slowed embedder: ``delay`` seconds per batch, and after the first batch it waits while ``gate``
# exists, so the test decides how long the writer holds the cache
SLOW_EXTRACT = """
import os, sys, time
from tlpipe.backbones.runtime import OnnxEmbedder
from tlpipe.features.extract import extract

source, out, model, gate, delay = sys.argv[1:6]
embed, batches = OnnxEmbedder.run_outputs, []

def slowed(self, pixels, names=None):  # every model call runs through run_outputs
    while batches and os.path.exists(gate):
        time.sleep(0.01)
    batches.append(len(pixels))
    time.sleep(float(delay))
    return embed(self, pixels, names)

OnnxEmbedder.run_outputs = slowed
extract(source, out, model=model, batch_size=1, workers=1, streams=1)  # one inference thread: batches in order
"""


def committed(path: Path) -> int:
    try:
        return describe(path)["images"]
    except CacheError:  # not created yet
        return -1


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None and time.monotonic() < deadline, "the writer ended or stalled first"
        time.sleep(0.01)


def test_a_second_extract_on_the_same_cache_is_refused(tmp_path, tiny_entry):
    photos = write_photo_folder(tmp_path / "photos", per_class=4)
    reference, out, gate = tmp_path / "reference.h5", tmp_path / "cache.h5", tmp_path / "gate"
    assert python(SLOW_EXTRACT, photos, reference, tiny_entry.directory, gate, 0).wait() == 0
    gate.touch()
    writer = python(SLOW_EXTRACT, photos, out, tiny_entry.directory, gate, 0)
    try:
        wait_for(lambda: committed(out) >= 1, writer)  # the first writer holds the cache and has committed
        second = tlpipe("extract", photos, "--out", out, "--backbone", tiny_entry.directory, "--quiet")
        assert f"is being written by pid {writer.pid}; wait for it to finish" in one_line_error(second)
        assert writer.poll() is None and committed(out) == 1
    finally:
        gate.unlink()
        assert writer.wait(timeout=120) == 0
    got, want = read_feature_set(out), read_feature_set(reference)
    assert list(got.sha256) == list(want.sha256) and np.allclose(got.X, want.X, atol=1e-5)
    assert tlpipe("extract", photos, "--out", out, "--backbone", tiny_entry.directory, "--quiet").returncode == 0
    assert not Path(str(out) + ".lock").exists()  # the lock file goes with its writer


def test_reads_while_extract_appends_are_consistent_growing_prefixes(tmp_path, tiny_entry):
    photos = write_photo_folder(tmp_path / "photos", per_class=12)
    out = tmp_path / "cache.h5"
    writer = python(SLOW_EXTRACT, photos, out, tiny_entry.directory, tmp_path / "no-gate", 0.03)
    snapshots, compared = [], 0
    try:
        wait_for(lambda: bool(out.exists() and list_feature_sets(out)), writer)
        while writer.poll() is None:
            fs = read_feature_set(out)  # must never fail
            info = describe(out)
            assert info["images"] >= len(fs) and info["feature_sets"][fs.key]["rows"] >= len(fs)
            snapshots.append(fs)
            if compared < 3 and min(np.bincount(fs.y, minlength=2)) >= 2:
                result = compare_heads(fs, ["logreg"], cv=2, n_jobs=1, holdout=False, pca=None)
                assert result.best == "logreg" and result.heads[0].folds
                compared += 1
    finally:
        writer.wait(timeout=120)
    assert writer.returncode == 0
    final = read_feature_set(out)
    sizes = [len(fs) for fs in snapshots]
    assert len(final) == 24 and sizes == sorted(sizes) and len(set(sizes)) >= 5, sizes
    assert compared >= 1
    for fs in snapshots:
        n = len(fs)
        assert list(fs.sha256) == list(final.sha256[:n]) and list(fs.paths) == list(final.paths[:n])
        assert np.array_equal(fs.y, final.y[:n]) and np.array_equal(fs.X, final.X[:n])
        assert fs.class_names == final.class_names and fs.cache_id == final.cache_id


GROWING_WRITER = """
import sys
import numpy as np
from tlpipe.features.cache import CacheWriter, ImageRow

dim = 1 << 15  # 128 KiB rows: a new 8-row chunk, so a bigger file, every 8 rows
with CacheWriter(sys.argv[1]) as writer:
    writer.ensure_feature_set("k", dim)
    for i in range(int(sys.argv[2])):
        row = ImageRow(f"{'ab'[i % 2]}/{i}.jpg", f"{i:064x}", "ab"[i % 2], None, i, i)
        writer.add("k", [row], np.full((1, dim), i, dtype=np.float32))
"""


def test_reads_while_a_writer_grows_the_file_every_few_rows(tmp_path):
    """The same with a file that grows every 4th commit, where a reader most often meets a half-done commit."""
    out, rows = tmp_path / "cache.h5", 160
    writer = python(GROWING_WRITER, out, rows)
    sizes = []
    try:
        wait_for(lambda: bool(out.exists() and list_feature_sets(out)), writer)
        while writer.poll() is None:
            fs = read_feature_set(out)
            assert np.array_equal(fs.X[:, ::4096], np.repeat(np.arange(len(fs), dtype=np.float32), 8).reshape(-1, 8))
            assert list(fs.paths) == [f"{'ab'[i % 2]}/{i}.jpg" for i in range(len(fs))]
            sizes.append(len(fs))
    finally:
        writer.wait(timeout=120)
    assert writer.returncode == 0 and len(read_feature_set(out)) == rows
    assert sizes == sorted(sizes) and len(set(sizes)) >= 10, sizes


@pytest.fixture
def small_cache(tmp_path) -> Path:
    from tlpipe.features.cache import CacheWriter, ImageRow

    path = tmp_path / "c.h5"
    with CacheWriter(path) as writer:
        writer.ensure_feature_set("k", 3)
        writer.add(
            "k",
            [ImageRow(f"a/{i}.jpg", f"{i:064x}", "a", None, 1, 1) for i in range(4)],
            np.arange(12, dtype=np.float32).reshape(4, 3),
        )
    return path


def test_a_reader_retries_what_a_concurrent_commit_explains(small_cache, monkeypatch):
    """HDF5 refuses a file whose superblock is newer than the size it saw (a writer was extending it): such an
    open is retried; an error that persists is reported once the retries are spent."""
    real, calls = h5py.File, []

    def racing(*args, **kwargs) -> h5py.File:
        calls.append(1)
        if len(calls) <= failures:
            raise OSError("Unable to synchronously open file (truncated file: eof = 13264, stored_eof = 1234224)")
        return real(*args, **kwargs)

    monkeypatch.setattr(features.cache.h5py, "File", racing)
    failures = 2
    assert len(read_feature_set(small_cache)) == 4 and len(calls) == 3
    calls.clear()
    failures = READ_ATTEMPTS
    with pytest.raises(CacheError, match="truncated file"):
        describe(small_cache)
    assert len(calls) == READ_ATTEMPTS


def test_counts_that_do_not_add_up_are_reported_as_damage(small_cache):
    """Counts from two commits are retried; when they stay inconsistent the file is damaged, and says so."""
    with h5py.File(small_cache, "a") as f:
        f["images"].attrs["count"] = 2  # the feature set points at image rows 2 and 3, which are not committed
    with pytest.raises(CacheError, match="points past the image table; the file is damaged"):
        read_feature_set(small_cache)
