"""SIGKILL at random moments, 20 times each for extract and score: after every kill the cache opens (the score
output parses) and holds a prefix of the uninterrupted result; a re-run completes to exactly that result."""

import itertools
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_photo_folder
from tests.reliability.conftest import parse_output, python, same_rows
from tlpipe.features.cache import CacheError, describe, list_feature_sets, read_feature_set

KILLS = 20
EXTRACT = """
import sys
from tlpipe.features.extract import extract
extract(sys.argv[1], sys.argv[2], model=sys.argv[3], batch_size=2, workers=1)
"""
SCORE = """
import sys
from tlpipe.pipeline.scoring.score import score
score(sys.argv[1], sys.argv[2], head=sys.argv[3], store=sys.argv[4], device="cpu", batch_size=2, workers=1)
"""


def kill_loop(
    start: Callable[[], subprocess.Popen],
    progress: Callable[[], int],
    total: int,
    check: Callable[[], int],
    reset: Callable[[], None],
    duration: float,
    seed: int,
) -> list[int]:
    """Start a run and SIGKILL it ``KILLS`` times: alternately after a random delay (up to the uninterrupted run's
    ``duration``) and once ``progress()`` passes a random threshold above where the run started. ``check()`` runs
    after each kill and returns the rows kept; a complete result is ``reset()`` so that later kills land mid-run."""
    rng = random.Random(seed)
    kept, attempts = [], 0
    while len(kept) < KILLS:
        attempts += 1
        assert attempts <= 3 * KILLS, f"only {len(kept)} of {KILLS} kills landed in {attempts - 1} runs"
        proc = start()
        if attempts % 2:
            time.sleep(rng.uniform(0, duration))
        else:
            threshold, deadline = rng.randint(max(progress(), 0) + 1, total), time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline and progress() < threshold:
                time.sleep(0.003)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kept.append(check())
            if kept[-1] == total:  # killed after its last row
                reset()
        else:
            assert proc.returncode == 0 and check() == total
            reset()
    return kept


def snapshot(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    fs = read_feature_set(path)
    return fs.paths, fs.sha256, fs.X, fs.y


@pytest.mark.slow
def test_extract_killed_20_times_then_rerun_equals_uninterrupted(tmp_path, tiny_entry):
    photos = write_photo_folder(tmp_path / "photos", per_class=14)
    good = next((photos / "flower").glob("*.jpg"))
    shutil.copy(good, photos / "flower" / "zz_copy.jpg")  # same content, another name: one row
    (photos / "china" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    (photos / "notes.txt").write_text("not an image\n")
    reference, out = tmp_path / "reference.h5", tmp_path / "killed.h5"
    started = time.monotonic()
    assert python(EXTRACT, photos, reference, tiny_entry.directory).wait() == 0
    duration = time.monotonic() - started
    ref_paths, ref_sha, ref_X, ref_y = snapshot(reference)
    ref_failures = describe(reference)["failures"]
    total = len(ref_paths)
    assert total == 28 and {f["path"] for f in ref_failures} == {"china/zz_broken.jpg", "notes.txt"}

    def committed() -> int:
        try:
            return describe(out)["images"]
        except CacheError:  # not created yet
            return -1

    def check() -> int:
        if not out.exists():  # killed before the cache was created
            return 0
        info = describe(out)  # opens after every kill
        if not list_feature_sets(out):
            assert info["images"] == 0
            return 0
        paths, sha, X, y = snapshot(out)
        n = len(paths)
        assert (
            info["images"] == n and info["feature_sets"][f"{tiny_entry.key}-filter-bilinear"]["rows"] == n
        )  # counts == readable rows
        assert list(paths) == list(ref_paths[:n]) and list(sha) == list(ref_sha[:n]) and np.array_equal(y, ref_y[:n])
        assert np.allclose(X, ref_X[:n], atol=1e-5)
        assert info["failures"] == ref_failures[: len(info["failures"])]
        return n

    def reset() -> None:
        out.unlink()

    kept = kill_loop(
        lambda: python(EXTRACT, photos, out, tiny_entry.directory), committed, total, check, reset, duration, seed=9
    )
    assert sum(0 < n < total for n in kept) >= 5, f"too few kills mid-run: {kept}"
    assert python(EXTRACT, photos, out, tiny_entry.directory).wait() == 0
    assert check() == total and describe(out)["failures"] == ref_failures


@pytest.mark.slow
def test_score_killed_20_times_then_rerun_equals_uninterrupted(tmp_path, head):
    """Runs alternate between a CSV and a JSON Lines output."""
    photos = write_photo_folder(tmp_path / "photos", per_class=12)
    (photos / "china" / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    (photos / "flower" / 'comma, "quote"\nnewline.jpg').write_bytes((photos / "china" / "china_0_000.jpg").read_bytes())
    outputs, references = [tmp_path / "killed.csv", tmp_path / "killed.jsonl"], {}
    started = time.monotonic()
    for out in outputs:
        reference = tmp_path / f"reference{out.suffix}"
        assert python(SCORE, photos, reference, head.path, head.store.root).wait() == 0
        references[out] = parse_output(reference)
    duration = (time.monotonic() - started) / 2
    total = len(references[outputs[0]])
    assert total == 26 and sum(bool(r["error"]) for r in references[outputs[0]]) == 1
    turn = itertools.cycle(outputs)
    current = [outputs[0]]

    def start() -> subprocess.Popen:
        current[0] = next(turn)
        return python(SCORE, photos, current[0], head.path, head.store.root)

    def rows() -> int:
        out = current[0]
        return out.read_bytes().count(b"\n") - (out.suffix == ".csv") if out.exists() else 0

    def check() -> int:
        got = parse_output(current[0])
        same_rows(got, references[current[0]][: len(got)])
        return len(got)

    def reset() -> None:
        for suffix in ("", ".tlpipe.json"):
            Path(f"{current[0]}{suffix}").unlink()

    kept = kill_loop(start, rows, total, check, reset, duration, seed=11)
    assert sum(0 < n < total for n in kept) >= 5, f"too few kills mid-run: {kept}"
    for out in outputs:
        assert python(SCORE, photos, out, head.path, head.store.root).wait() == 0
        same_rows(parse_output(out), references[out])
