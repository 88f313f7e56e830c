"""Parquet assembly is idempotent (issue 34, kind 3): a SIGKILL at every step of assembling ``out.parquet`` from
the previous file and the run's part files, then a re-run: every image exactly once, as an uninterrupted run."""

import shutil
import signal

import pytest

from tests.conftest import write_photo_folder
from tests.reliability.conftest import python, tlpipe

pq = pytest.importorskip("pyarrow.parquet")

# score into a Parquet output; once the scoring is done and the assembly starts, the process SIGKILLs itself
# at the step named by argv[5]
KILLED_WHILE_ASSEMBLING = """
import os, signal, sys
import pyarrow.parquet as pq
from tlpipe.pipeline.scoring.score import ParquetOutput, score

source, out, head, store, step = sys.argv[1:6]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
calls = {"write": 0, "unlink": 0}
write_table, replace, unlink, rmdir = pq.ParquetWriter.write_table, os.replace, os.unlink, os.rmdir

def writing(self, *args, **kwargs):  # the assembled file's row groups, one per previous file / part
    write_table(self, *args, **kwargs)
    calls["write"] += 1
    if step == "mid-write" and calls["write"] == 2:
        die()

def replacing(src, dst, *args, **kwargs):
    if step == "before-rename":
        die()
    replace(src, dst, *args, **kwargs)
    if step == "after-rename":
        die()

def unlinking(path, *args, **kwargs):
    unlink(path, *args, **kwargs)
    calls["unlink"] += os.path.basename(os.fspath(path)).startswith("part-")
    if step == "mid-cleanup" and calls["unlink"] == 1:
        die()

def removing_folder(path, *args, **kwargs):
    if step == "before-rmdir":
        die()
    rmdir(path, *args, **kwargs)
    if step == "after-rmdir":
        die()

finish = ParquetOutput._finish

def assembling(self, done):
    pq.ParquetWriter.write_table, os.replace, os.unlink, os.rmdir = writing, replacing, unlinking, removing_folder
    finish(self, done)

ParquetOutput._finish = assembling
score(source, out, head=head, store=store, device="cpu", batch_size=4, workers=1)
"""

STEPS = ["mid-write", "before-rename", "after-rename", "mid-cleanup", "before-rmdir", "after-rmdir"]


def rows(path):
    return sorted(pq.read_table(path).to_pylist(), key=lambda r: r["path"])


@pytest.mark.parametrize("step", STEPS)
def test_a_kill_at_any_step_of_assembly_then_a_rerun_gives_each_image_once(tmp_path, head, step):
    photos = write_photo_folder(tmp_path / "photos", per_class=8, seed=3)  # 16 images
    later = shutil.move(photos / "flower", tmp_path / "flower")  # a first run on half: out.parquet exists
    reference, out = tmp_path / "reference.parquet", tmp_path / "scores.parquet"
    common = ["--head", head.path, "--store", head.store.root, "--batch-size", "4"]
    assert tlpipe("score", photos, "--out", out, *common).returncode == 0 and len(rows(out)) == 8
    shutil.move(later, photos / "flower")
    assert tlpipe("score", photos, "--out", reference, *common).returncode == 0
    killed = python(KILLED_WHILE_ASSEMBLING, photos, out, head.path, head.store.root, step)
    assert killed.wait(timeout=120) == -signal.SIGKILL
    if out.exists():  # whatever a reader finds meanwhile is a whole file: the first run's, or the complete one
        assert len(rows(out)) in (8, 16)
    again = tlpipe("score", photos, "--out", out, *common)
    assert again.returncode == 0, again.stderr
    got, want = rows(out), rows(reference)
    assert len(got) == 16 and [r["path"] for r in got] == [r["path"] for r in want]
    for g, w in zip(got, want):
        assert (g["sha256"], g["label"]) == (w["sha256"], w["label"])
        assert g["probability"] == pytest.approx(w["probability"], abs=1e-5)
    assert not out.with_name(out.name + ".parts").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left
