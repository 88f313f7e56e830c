"""Score outputs keyed by content (issue 34, kind 2): a row is already in the output only when its source, path
and sha256 match. A file whose content changed is scored again and its old row superseded (one row per path);
another folder with the same names gets its own rows; a cache holding two sources with the same relative paths
resumes after a kill to every one of its rows."""

import csv
import hashlib
import json
import shutil
import signal
from pathlib import Path

import pytest

from tests.conftest import write_photo_folder
from tests.reliability.conftest import python, tlpipe
from tlpipe.features.extract import extract
from tlpipe.pipeline.scoring.score import score

# score a cache, SIGKILLed by the process itself right after its first durable batch
KILLED_AFTER_FIRST_BATCH = """
import os, signal, sys
from tlpipe.pipeline.scoring.score import PredictionSink, score

append = PredictionSink.append

def append_then_die(self, items, outputs):
    append(self, items, outputs)
    os.kill(os.getpid(), signal.SIGKILL)

PredictionSink.append = append_then_die
score(sys.argv[1], sys.argv[2], head=sys.argv[3], store=sys.argv[4], device="cpu", batch_size=int(sys.argv[5]))
"""


def rows_of(out: Path) -> list[dict]:
    if out.suffix == ".csv":
        with open(out, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    if out.suffix == ".jsonl":
        return [json.loads(line) for line in out.read_bytes().split(b"\n") if line]
    import pyarrow.parquet as pq

    return pq.read_table(out).to_pylist()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def on_disk(source: Path) -> dict[tuple[str, str], str]:
    """(source, relative path) -> sha256 of every photo under ``source``."""
    return {(str(source.resolve()), p.relative_to(source).as_posix()): sha(p) for p in source.rglob("*.jpg")}


def keyed(rows: list[dict]) -> dict[tuple[str, str], str]:
    keys = [(r["source"], r["path"]) for r in rows]
    assert len(keys) == len(set(keys)), "a (source, path) has two rows"
    return {(r["source"], r["path"]): r["sha256"] for r in rows}


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_a_changed_file_is_scored_again_and_its_old_row_superseded(tmp_path, head, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    photos = shutil.copytree(head.photos, tmp_path / "photos")
    out = tmp_path / f"scores{suffix}"
    kw = dict(head=head.path, store=head.store, device="cpu", batch_size=4)
    assert score(photos, out, **kw).scored == 12
    others = write_photo_folder(tmp_path / "others", per_class=1, seed=5)
    changed = sorted((photos / "china").glob("*.jpg"))[2]
    shutil.copy(next((others / "flower").glob("*.jpg")), changed)  # edited in place: new content, same name
    again = score(photos, out, **kw)
    assert (again.scored, again.already_done) == (1, 11)
    rows = rows_of(out)
    assert len(rows) == 12 and keyed(rows) == on_disk(photos)
    assert score(photos, out, **kw).already_done == 12 and len(rows_of(out)) == 12  # and nothing more to do


def test_another_folder_with_the_same_names_gets_its_own_rows_through_the_cli(tmp_path, head):
    first = shutil.copytree(head.photos, tmp_path / "first")
    second = tmp_path / "second"  # the same file names, other photos
    others = write_photo_folder(tmp_path / "others", per_class=6, seed=9)
    for p in first.rglob("*.jpg"):
        (second / p.relative_to(first)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sorted(others.rglob("*.jpg"))[len(list(second.rglob("*.jpg")))], second / p.relative_to(first))
    out = tmp_path / "scores.csv"
    common = ["--out", out, "--head", head.path, "--store", head.store.root, "--batch-size", "4"]
    assert tlpipe("score", first, *common).returncode == 0
    run = tlpipe("score", second, *common)
    assert run.returncode == 0 and "12 scored" in run.stdout and "0 already in the output" in run.stdout, run.stdout
    assert keyed(rows_of(out)) == on_disk(first) | on_disk(second)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_cache_of_two_sources_with_the_same_paths_resumes_to_every_row(tmp_path, head, tiny_entry, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    batch1 = write_photo_folder(tmp_path / "batch1", per_class=3, seed=1)
    batch2 = tmp_path / "batch2"
    for i, p in enumerate(sorted(write_photo_folder(tmp_path / "other", per_class=3, seed=2).rglob("*.jpg"))):
        target = batch2 / sorted(batch1.rglob("*.jpg"))[i].relative_to(batch1)  # batch1's names, other photos
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, target)
    cache = tmp_path / "cache.h5"
    for batch in (batch1, batch2):
        extract(batch, cache, model=str(tiny_entry.directory), batch_size=4)
    out = tmp_path / f"scores{suffix}"
    killed = python(KILLED_AFTER_FIRST_BATCH, cache, out, head.path, head.store.root, 7)
    assert killed.wait(timeout=120) == -signal.SIGKILL
    run = tlpipe("score", cache, "--out", out, "--head", head.path, "--store", head.store.root, "--batch-size", "4")
    assert run.returncode == 0 and "7 already in the output" in run.stdout, run.stdout + run.stderr
    assert keyed(rows_of(out)) == on_disk(batch1) | on_disk(batch2)  # 12 rows, none left out
