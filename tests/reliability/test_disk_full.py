"""A full disk: a per-process file size limit (RLIMIT_FSIZE, writes fail with EFBIG), a small tmpfs where it can be
mounted (ENOSPC), and a simulated refusal. Expected: one clear error line, exit code 2, the cache / output left at
its last complete state, and a re-run with space completes it to the uninterrupted result."""

import errno
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import tlpipe.features.cache
from tests.conftest import write_photo_folder
from tests.reliability.conftest import one_line_error, parse_output, same_rows, tlpipe
from tlpipe import features
from tlpipe.features.cache import CacheError, CacheWriter, ImageRow, describe, read_feature_set
from tlpipe.features.extract import extract
from tlpipe.pipeline.scoring.score import score


@pytest.fixture
def photos(tmp_path) -> Path:
    """10 photos, then a broken file: recording its failure allocates the failures table, the last growth."""
    folder = write_photo_folder(tmp_path / "photos", per_class=5)
    (folder / "flower" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    return folder


def content(path: Path) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    fs = read_feature_set(path)
    return list(fs.paths), fs.X, [(f["path"], f["reason"]) for f in describe(path)["failures"]]


def assert_prefix(path: Path, reference: tuple) -> int:
    """The cache opens, its counts equal the rows it can read, and those are the reference's first rows."""
    paths, X, failures = content(path)
    want_paths, want_X, want_failures = reference
    info = describe(path)
    assert info["images"] == len(paths) == next(iter(info["feature_sets"].values()))["rows"]
    assert paths == want_paths[: len(paths)] and np.allclose(X, want_X[: len(paths)], atol=1e-5)
    assert failures == want_failures[: len(failures)]
    return len(paths)


@pytest.mark.parametrize("when", ["creating", "first batch", "after commits"])
def test_extract_on_a_full_disk_fails_cleanly_and_resumes(tmp_path, tiny_entry, photos, when):
    model = str(tiny_entry.directory)
    reference = tmp_path / "reference.h5"
    extract(photos, reference, model=model, batch_size=2)
    want = content(reference)
    if when == "after commits":  # room for the photos' rows, not for the failures table that comes after
        shutil.copytree(photos, tmp_path / "good", ignore=shutil.ignore_patterns("zz_*"))
        extract(tmp_path / "good", tmp_path / "good.h5", model=model, batch_size=2)
        limit = (tmp_path / "good.h5").stat().st_size + 50_000
    else:
        limit = {"creating": 4_000, "first batch": 100_000}[when]
    out = tmp_path / "cache.h5"
    proc = tlpipe(
        "extract", photos, "--out", out, "--backbone", model, "--batch-size", "2", "--quiet", file_size_limit=limit
    )
    error = one_line_error(proc)
    if when == "creating":
        assert f"cannot create {out}: File too large" in error and not out.exists()
    else:
        assert f"cannot write {out}: File too large; the cache keeps its last committed rows" in error
        kept = assert_prefix(out, want)
        assert f"({kept} images)" in error and kept == (10 if when == "after commits" else 0)
    summary = extract(photos, out, model=model, batch_size=2)  # with space
    assert summary.failed == 1 and assert_prefix(out, want) == 10 and content(out)[2] == want[2]


def test_extract_on_a_full_tmpfs_fails_cleanly_and_resumes(tmp_path, tiny_entry, photos):
    model = str(tiny_entry.directory)
    reference = tmp_path / "reference.h5"
    extract(photos, reference, model=model, batch_size=2)
    disk = tmp_path / "small"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1300k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        proc = tlpipe("extract", photos, "--out", disk / "cache.h5", "--backbone", model, "--batch-size", "2", "-q")
        assert "No space left on device; the cache keeps its last committed rows (10 images)" in one_line_error(proc)
        assert assert_prefix(disk / "cache.h5", content(reference)) == 10
        shutil.copy(disk / "cache.h5", tmp_path / "cache.h5")
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    extract(photos, tmp_path / "cache.h5", model=model, batch_size=2)
    assert content(tmp_path / "cache.h5")[2] == content(reference)[2]
    assert assert_prefix(tmp_path / "cache.h5", content(reference)) == 10


@pytest.mark.parametrize("reservation", ["posix_fallocate", "zeros"])
def test_a_refused_reservation_leaves_the_file_byte_for_byte_as_committed(tmp_path, monkeypatch, reservation):
    """Simulated: ``posix_fallocate`` refuses, or (where it is missing, as on macOS) writing zeros past the end does."""
    path, dim = tmp_path / "c.h5", 1 << 15  # 8-row chunks: the 9th row needs a new chunk, so more space
    rows = [ImageRow(f"a/{i}.jpg", f"{i:064x}", "a", None, 1, 1) for i in range(12)]
    with CacheWriter(path) as writer:
        writer.ensure_feature_set("k", dim)
        writer.add("k", rows[:8], np.ones((8, dim), np.float32))
    committed = path.read_bytes()

    pwrite = os.pwrite

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_past_the_end(fd: int, data: bytes, offset: int) -> int:
        return full(fd, offset, len(data)) if offset >= len(committed) else pwrite(fd, data, offset)

    if reservation == "posix_fallocate":
        monkeypatch.setattr(features.cache.os, "posix_fallocate", full)
    else:
        monkeypatch.delattr(features.cache.os, "posix_fallocate")
        monkeypatch.setattr(features.cache.os, "pwrite", full_past_the_end)
    with CacheWriter(path) as writer:
        with pytest.raises(CacheError, match=r"No space left on device; the cache keeps its last committed rows \(8"):
            writer.add("k", rows[8:], np.ones((4, dim), np.float32))
        with pytest.raises(CacheError, match="No space left"):  # and writes nothing more
            writer.add_failures([("a/x.jpg", "", "not an image")])
    assert path.read_bytes() == committed
    monkeypatch.undo()
    with CacheWriter(path) as writer:
        writer.add("k", rows[8:], np.ones((4, dim), np.float32))
    assert len(read_feature_set(path)) == 12


@pytest.mark.parametrize("suffix, limit", [(".csv", 1_500), (".jsonl", 1_500), (".parquet", 6_000)])
def test_score_on_a_full_disk_fails_cleanly_and_resumes(tmp_path, head, suffix, limit):
    """CSV / JSON Lines fill up mid-run (the row being written is cut); Parquet's parts fit, its final file not."""
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    photos = shutil.copytree(head.photos, tmp_path / "photos")
    (photos / "china" / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    reference, out = tmp_path / f"reference{suffix}", tmp_path / f"scores{suffix}"
    common = dict(head=head.path, store=head.store, device="cpu", batch_size=2)
    score(photos, reference, **common)
    proc = tlpipe(
        "score",
        photos,
        "--out",
        out,
        "--head",
        head.path,
        "--store",
        head.store.root,
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--quiet",
        file_size_limit=limit,
    )
    assert f"cannot write {out}: File too large; the rows written before are kept" in one_line_error(proc)
    if suffix == ".parquet":
        assert not out.exists() and len(list((tmp_path / f"scores{suffix}.parts").glob("part-*.parquet"))) == 7
        import pyarrow.parquet as pq

        read = lambda path: pq.read_table(path).to_pylist()  # noqa: E731
    else:
        read = parse_output
        kept = read(out)
        assert 0 < len(kept) < 13
        same_rows(kept, read(reference)[: len(kept)])
    summary = score(photos, out, **common)
    assert summary.already_done == (13 if suffix == ".parquet" else len(kept))
    same_rows(read(out), read(reference))
