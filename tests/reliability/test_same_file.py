"""One file, two names (issue 34, kind 1): a second writer that reaches a cache or an output through another
spelling (a symlink, a hard link, a relative path beside an absolute one) is refused with the one-line message
naming the first writer's pid, as real second processes; the first writer finishes undisturbed."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_photo_folder
from tests.reliability.conftest import ENV, one_line_error, python
from tests.reliability.test_concurrency import SLOW_EXTRACT, committed, wait_for
from tlpipe.features.cache import read_feature_set

# the CLI as a second process, run from ``cwd`` (so a relative path means what it says there)
CLI = "import runpy, sys; sys.argv[0] = 'tlpipe'; runpy.run_module('tlpipe.pipeline.cli', run_name='__main__')"

# score with a slowed backbone: after the first batch it waits while ``gate`` exists
SLOW_SCORE = """
import os, sys, time
from tlpipe.backbones.runtime import OnnxEmbedder
from tlpipe.pipeline.scoring.score import score

source, out, head, store, gate = sys.argv[1:6]
run, batches = OnnxEmbedder.run_outputs, []

def slowed(self, pixels, names=None):
    while batches and os.path.exists(gate):
        time.sleep(0.01)
    batches.append(len(pixels))
    return run(self, pixels, names)

OnnxEmbedder.run_outputs = slowed
score(source, out, head=head, store=store, device="cpu", batch_size=2, workers=1)
"""

# export-cache / fit-head, paused on ``gate`` once under way (at the read of the feature set / at the fit)
SLOW_WRITER = """
import importlib, os, sys, time

module, name, gate, call = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
target = importlib.import_module(module)
original = getattr(target, name)

def paused(*args, **kwargs):
    while os.path.exists(gate):
        time.sleep(0.01)
    return original(*args, **kwargs)

setattr(target, name, paused)
if call[0] == "export":  # else "fit"
    from tlpipe.features.cache import export_cache
    export_cache(call[1], call[2])
else:
    from tlpipe.pipeline.heads.fit import train_head
    train_head(call[1], "logreg", call[2])
"""


def cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CLI, *map(str, args)], env=ENV, cwd=cwd, capture_output=True, text=True
    )


def other_names(target: Path, spelling: str) -> tuple[Path, Path]:
    """(cwd, the name to give) that reach ``target`` by ``spelling``."""
    elsewhere = target.parent / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    if spelling == "symlink":
        link = elsewhere / ("link" + target.suffix)
        link.symlink_to(target)
        return elsewhere, link
    if spelling == "hardlink":
        link = elsewhere / ("hard" + target.suffix)
        os.link(target, link)
        return elsewhere, link
    return target.parent, Path(target.name)  # relative, beside the absolute path the first writer was given


@pytest.mark.parametrize("spelling", ["symlink", "hardlink", "relative"])
def test_a_second_extract_on_the_same_cache_by_another_name_is_refused(tmp_path, tiny_entry, spelling):
    photos = write_photo_folder(tmp_path / "photos", per_class=3)
    reference, out, gate = tmp_path / "reference.h5", tmp_path / "cache.h5", tmp_path / "gate"
    assert python(SLOW_EXTRACT, photos, reference, tiny_entry.directory, gate, 0).wait() == 0
    gate.touch()
    writer = python(SLOW_EXTRACT, photos, out.resolve(), tiny_entry.directory, gate, 0)
    try:
        wait_for(lambda: committed(out) >= 1, writer)  # the first writer holds the cache and has committed
        cwd, name = other_names(out, spelling)
        second = cli("extract", photos, "--out", name, "--backbone", tiny_entry.directory, "--quiet", cwd=cwd)
        assert f"is being written by pid {writer.pid}; wait for it to finish" in one_line_error(second)
        assert writer.poll() is None and committed(out) == 1
    finally:
        gate.unlink()
        assert writer.wait(timeout=120) == 0
    got, want = read_feature_set(out), read_feature_set(reference)
    assert list(got.sha256) == list(want.sha256) and np.allclose(got.X, want.X, atol=1e-5)
    assert sorted(p.name for p in tmp_path.glob("**/*.lock")) == []  # each lock file went with its writer


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
@pytest.mark.parametrize("spelling", ["symlink", "hardlink", "relative"])
def test_a_second_score_into_the_same_output_by_another_name_is_refused(tmp_path, head, spelling, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    photos = shutil.copytree(head.photos, tmp_path / "photos")
    out, gate = tmp_path / f"scores{suffix}", tmp_path / "gate"
    if suffix == ".parquet":  # a first run on half the photos: the assembled file exists while the next one writes
        aside = shutil.move(photos / "china", tmp_path / "china")
        assert python(SLOW_SCORE, photos, out, head.path, head.store.root, gate).wait() == 0
        shutil.move(aside, photos / "china")
    gate.touch()
    writer = python(SLOW_SCORE, photos, out, head.path, head.store.root, gate)
    try:
        parts = out.with_name(out.name + ".parts")
        wait_for(
            lambda: (
                bool(list(parts.glob("part-*")))
                if suffix == ".parquet"
                else (out.exists() and out.stat().st_size > 200)
            ),
            writer,
        )
        cwd, name = other_names(out, spelling)
        second = cli("score", photos, "--out", name, "--head", head.path, "--store", head.store.root, cwd=cwd)
        assert f"is being written by pid {writer.pid}; wait for it to finish" in one_line_error(second)
        assert writer.poll() is None
    finally:
        gate.unlink()
        assert writer.wait(timeout=120) == 0
    again = cli("score", photos, "--out", out, "--head", head.path, "--store", head.store.root, cwd=tmp_path)
    assert again.returncode == 0 and "12 already in the output" in again.stdout, again.stdout + again.stderr
    assert sorted(p.name for p in tmp_path.glob("**/*.lock")) == []


def test_export_cache_and_fit_head_refuse_a_second_writer_by_another_name(tmp_path, head):
    """Outputs replaced atomically are locked too, for the whole run (a head and its sidecar are one pair)."""
    gate = tmp_path / "gate"
    for target, paused, command in (
        (tmp_path / "embeddings.parquet", ("tlpipe.features.cache", "read_feature_set"), "export-cache"),
        (tmp_path / "head.joblib", ("tlpipe.pipeline.heads.fit", "fit_head"), "fit-head"),
    ):
        if command == "export-cache":
            pytest.importorskip("pyarrow")
        gate.touch()
        writer = python(SLOW_WRITER, *paused, gate, command.split("-")[0], head.cache, target)
        lock = target.with_name(target.name + ".lock")
        try:
            wait_for(lock.exists, writer)
            cwd, name = other_names(target, "symlink")
            second = cli(command, head.cache, "--out", name, cwd=cwd)
            assert f"is being written by pid {writer.pid}; wait for it to finish" in one_line_error(second)
            assert not target.exists()
        finally:
            gate.unlink()
            assert writer.wait(timeout=120) == 0
        assert target.exists() and not lock.exists()
