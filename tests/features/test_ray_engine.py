"""The Ray engine against the local one on a 2-CPU local cluster: the same cache row for row, resume, an
inference worker SIGKILLed mid-run, the driver SIGKILLed mid-run, scoring, and joblib's Ray backend."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.data", reason="Ray is not installed (pip install 'tlpipe[ray]'); the Ray engine needs it")

import ray  # noqa: E402

from tests.conftest import ROOT, write_photo_folder  # noqa: E402
from tlpipe.backbones.deps import MissingExtra  # noqa: E402
from tlpipe.features.cache import describe, read_feature_set  # noqa: E402
from tlpipe.features.extract import extract  # noqa: E402
from tlpipe.features.ray_engine import extract_ray  # noqa: E402
from tlpipe.pipeline.heads.engine import parallel_backend  # noqa: E402
from tlpipe.pipeline.heads.estimators import make_head  # noqa: E402
from tlpipe.pipeline.heads.persistence import save_head  # noqa: E402
from tlpipe.pipeline.heads.selection import compare_heads  # noqa: E402
from tlpipe.pipeline.scoring.score import ScoreError, score  # noqa: E402
from tlpipe.pipeline.scoring.score_ray import score_ray  # noqa: E402

GOOD = 60  # distinct photos: train/ 20 + test/ 10 per class; + 3 bad files and 1 copy of a train photo in test/


@pytest.fixture(scope="module")
def cluster():
    """A 2-CPU Ray on this machine for the module; yields its address (other drivers can join it)."""
    context = ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield context.address_info["address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Split folders of class folders (so labels and splits both matter), with bad files and a copy."""
    root = tmp_path_factory.mktemp("ray") / "photos"
    write_photo_folder(root / "train", per_class=20, seed=0)
    write_photo_folder(root / "test", per_class=10, seed=1)
    good = next((root / "train" / "flower").glob("*.jpg")).read_bytes()
    (root / "train" / "china" / "empty.jpg").write_bytes(b"")
    (root / "train" / "china" / "text.png").write_text("not an image")
    (root / "train" / "flower" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "test" / "flower" / "zz_copy.jpg").write_bytes(good)  # same content, another name and split
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory, photos, tiny_entry):
    """The local engine's cache of ``photos`` and its summary."""
    path = tmp_path_factory.mktemp("local") / "local.h5"
    return path, extract(photos, path, model=str(tiny_entry.directory), batch_size=4, device="cpu")


def content(path):
    """Rows sorted by sha256: (sha256, embeddings, labels, splits, paths)."""
    fs = read_feature_set(path)
    order = np.argsort(fs.sha256)
    return fs.sha256[order], fs.X[order], fs.y[order], fs.split[order], fs.paths[order]


def assert_same_cache(path, reference_path):
    sha, X, y, split, paths = content(path)
    ref_sha, ref_X, ref_y, ref_split, ref_paths = content(reference_path)
    assert len(set(sha)) == len(sha), "duplicate rows"
    assert list(sha) == list(ref_sha) and list(paths) == list(ref_paths)
    assert np.array_equal(y, ref_y) and list(split) == list(ref_split)
    assert np.allclose(X, ref_X, atol=1e-5)
    assert read_feature_set(path).class_names == read_feature_set(reference_path).class_names


def run_ray(source, out, entry, **kw):
    return extract_ray(source, out, model=str(entry.directory), batch_size=4, commit_rows=4, device="cpu", **kw)


def test_cache_equals_the_local_engine_row_for_row_and_a_rerun_appends_nothing(
    cluster, tmp_path, photos, reference, tiny_entry
):
    local_path, local = reference
    out = tmp_path / "ray.h5"
    summary = run_ray(photos, out, tiny_entry)
    # the copy counts as cached or duplicate depending on when its twin was committed: compare the sum
    counts = lambda s: (s.total, s.embedded, s.cached + s.duplicates)  # noqa: E731
    assert counts(summary) == counts(local) == (GOOD + 4, GOOD, 1)
    assert summary.failures == local.failures and summary.provider == "CPUExecutionProvider"
    assert_same_cache(out, local_path)
    assert set(read_feature_set(out).split) == {"train", "test"}
    failures = lambda p: sorted((f["path"], f["reason"]) for f in describe(p)["failures"])  # noqa: E731
    assert failures(out) == failures(local_path)
    again = run_ray(photos, out, tiny_entry)
    assert counts(again) == (GOOD + 4, 0, GOOD + 1)
    assert describe(out)["images"] == GOOD
    shutil.copytree(photos, photos.parent / "more")
    write_photo_folder(photos.parent / "more" / "train", per_class=2, seed=5)
    more = run_ray(photos.parent / "more", out, tiny_entry)
    assert counts(more) == (GOOD + 8, 4, GOOD + 1)


def _embed_workers() -> list[int]:
    """Process ids of the inference actors (Ray titles a worker process after its actor)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"MapBatches(ModelActor)" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:  # exited meanwhile
            continue
    return pids


def _sigkill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_an_inference_worker_killed_mid_run_is_restarted_and_nothing_is_lost_or_doubled(
    cluster, tmp_path, photos, reference, tiny_entry
):
    killed: list[tuple[list[int], int]] = []  # (pids, images committed when they were killed)

    def progress(total, done):
        committed = 0

        def advance(n):
            nonlocal committed
            committed += n
            if not killed:  # after the first committed batch: the actor still has most of the work queued
                pids = _embed_workers()
                for pid in pids:
                    _sigkill(pid)
                killed.append((pids, committed))

        return advance

    out = tmp_path / "ray.h5"
    summary = run_ray(photos, out, tiny_entry, progress=progress)
    ((pids, committed),) = killed
    assert pids and 0 < committed < summary.total and not any(Path(f"/proc/{p}").exists() for p in pids)
    assert (summary.embedded, summary.cached + summary.duplicates, summary.failed) == (GOOD, 1, 3)
    assert_same_cache(out, reference[0])


KILL_SCRIPT = """
import sys
from tlpipe.features.ray_engine import extract_ray
extract_ray(sys.argv[1], sys.argv[2], model=sys.argv[3], address=sys.argv[4], batch_size=2, commit_rows=2,
            device="cpu")
"""


def _committed(path) -> int:
    try:
        return describe(path)["images"]
    except Exception:  # not created yet, or mid-write: that is what we probe
        return -1


@pytest.mark.slow
def test_a_driver_killed_mid_run_then_rerun_gives_the_same_cache(cluster, tmp_path, photos, reference, tiny_entry):
    out = tmp_path / "killed.h5"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(photos), str(out), str(tiny_entry.directory), cluster],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 90
    while proc.poll() is None and time.monotonic() < deadline and _committed(out) < 4:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = describe(out)["images"]  # the file opens after the kill
    assert 0 < committed < GOOD, f"the kill did not land mid-run ({committed} rows committed)"
    summary = run_ray(photos, out, tiny_entry)
    assert (summary.embedded, summary.failed) == (GOOD - committed, 3)
    assert_same_cache(out, reference[0])


def read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def assert_same_rows(path, reference_path):
    rows, ref = read_csv(path), read_csv(reference_path)
    assert [r["path"] for r in rows] == [r["path"] for r in ref]
    for row, want in zip(rows, ref):
        assert {k: v for k, v in row.items() if "prob" not in k} == {k: v for k, v in want.items() if "prob" not in k}
        for column in [k for k in row if "prob" in k and want[k]]:
            assert float(row[column]) == pytest.approx(float(want[column]), abs=1e-6)


def test_score_via_ray_writes_the_local_engines_rows(cluster, tmp_path, photos, reference, tiny_entry, model_store):
    fs = read_feature_set(reference[0])
    head = tmp_path / "logreg.joblib"
    save_head(make_head("logreg").fit(fs.X, fs.y), head, feature_set=fs, metrics={}, params={})
    kw = {"head": head, "store": model_store, "device": "cpu", "batch_size": 4}
    local = score(photos, tmp_path / "local.csv", **kw)
    remote = score_ray(photos, tmp_path / "ray.csv", **kw)
    assert (
        (remote.total, remote.scored, remote.failed, remote.reused)
        == (local.total, local.scored, local.failed, local.reused)
        == (GOOD + 4, GOOD + 1, 3, 0)
    )
    assert sorted(remote.failures) == sorted(local.failures)
    assert_same_rows(tmp_path / "ray.csv", tmp_path / "local.csv")
    again = score_ray(photos, tmp_path / "ray.csv", **kw)
    assert (again.already_done, again.scored) == (GOOD + 4, 0)
    other = tmp_path / "other.joblib"  # another head: a re-run onto ray.csv with it is refused, as locally
    save_head(make_head("logreg").fit(fs.X, 1 - fs.y), other, feature_set=fs, metrics={}, params={})
    with pytest.raises(ScoreError, match="another model"):
        score_ray(photos, tmp_path / "ray.csv", **{**kw, "head": other})
    assert_same_rows(tmp_path / "ray.csv", tmp_path / "local.csv")
    reused = score_ray(photos, tmp_path / "reused.csv", cache=reference[0], **kw)
    assert (reused.reused, reused.scored, reused.failed) == (GOOD + 1, 0, 3)
    assert_same_rows(tmp_path / "reused.csv", tmp_path / "local.csv")


SCORE_KILL_SCRIPT = """
import sys
from tlpipe.pipeline.scoring.score_ray import score_ray
score_ray(sys.argv[1], sys.argv[2], head=sys.argv[3], store=sys.argv[4], address=sys.argv[5], batch_size=2,
          commit_rows=2, device="cpu")
"""


@pytest.mark.slow
def test_score_with_its_driver_killed_mid_run_then_rerun_gives_the_local_rows(
    cluster, tmp_path, photos, reference, model_store
):
    fs = read_feature_set(reference[0])
    head = tmp_path / "logreg.joblib"
    save_head(make_head("logreg").fit(fs.X, fs.y), head, feature_set=fs, metrics={}, params={})
    kw = {"head": head, "store": model_store, "device": "cpu", "batch_size": 4}
    score(photos, tmp_path / "local.csv", **kw)
    out = tmp_path / "killed.csv"
    rows = lambda: out.read_bytes().count(b"\n") - 1 if out.exists() else -1  # noqa: E731
    proc = subprocess.Popen(
        [sys.executable, "-c", SCORE_KILL_SCRIPT, str(photos), str(out), str(head), str(model_store.root), cluster],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 90
    while proc.poll() is None and time.monotonic() < deadline and rows() < 4:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = rows()
    assert 0 < written < GOOD + 4, f"the kill did not land mid-run ({written} rows)"
    summary = score_ray(photos, out, **kw)
    assert summary.already_done in (written, written - 1)  # a record cut by the kill is scored again
    assert summary.already_done + summary.scored + summary.failed == GOOD + 4
    assert_same_rows(out, tmp_path / "local.csv")


def test_compare_under_the_ray_joblib_backend_equals_local(cluster, reference):
    fs = read_feature_set(reference[0])
    with parallel_backend("local"):
        local = compare_heads(fs, ["logreg", "svm"], cv=3)
    with parallel_backend("ray"):
        remote = compare_heads(fs, ["logreg", "svm"], cv=3)
    for a, b in zip(local.heads, remote.heads):
        assert (a.name, a.params, a.accuracy, a.macro_f1) == (b.name, b.params, b.accuracy, b.macro_f1)
        assert a.log_loss == pytest.approx(b.log_loss, abs=1e-12)
    assert np.array_equal(local.y_pred, remote.y_pred) and local.best == remote.best
    with pytest.raises(ValueError, match="engine must be one of"):
        with parallel_backend("spark"):
            pass


def test_without_ray_the_error_names_the_extra(monkeypatch, tmp_path, photos, tiny_entry):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    with pytest.raises(MissingExtra, match=r"pip install 'tlpipe\[ray\]'"):
        run_ray(photos, tmp_path / "c.h5", tiny_entry)
    with pytest.raises(MissingExtra, match=r"tlpipe\[ray\]"):
        with parallel_backend("ray"):
            pass
    assert not (tmp_path / "c.h5").exists()


MEMORY_SCRIPT = """
import json, sys, threading, time
from pathlib import Path
from tlpipe.features.ray_engine import extract_ray
from tlpipe.pipeline.scoring.score_ray import score_ray

def private_rss():
    # private memory only: the object store's shared pages the driver reads batches from are not its own
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))

def growth(run):
    start, peak, done = private_rss(), [0], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], private_rss())
            time.sleep(0.002)
    sampler = threading.Thread(target=sample)
    sampler.start()
    run()
    done.set()
    sampler.join()
    return max(peak[0], private_rss()) - start

model, head, store, address, work = sys.argv[1:]
kw = dict(address=address, batch_size=8, commit_rows=16, device="cpu")
grown = {}
for name in ("warm", "small", "large"):
    folder = Path(work) / name
    grown["extract", name] = growth(lambda: extract_ray(folder, folder.with_suffix(".h5"), model=model, **kw))
    grown["score", name] = growth(lambda: score_ray(folder, folder.with_suffix(".csv"), head=head, store=store, **kw))
print(json.dumps({" ".join(k): v for k, v in grown.items()}))
"""


def write_noise_folder(root: Path, images: int, seed: int) -> Path:
    """``images`` distinct small JPEGs of noise in two class folders (cheap to write and to decode)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(images):
        (root / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), np.uint8)).save(root / "ab"[i % 2] / f"{i}.jpg")
    return root


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the driver's memory from /proc")
def test_the_drivers_memory_does_not_grow_with_the_number_of_images(cluster, tmp_path, model_store):
    """Extract and score on Ray, 100 then 600 images, in a fresh driver process: its private memory grows
    by about as much for 600 as for 100. The backbone's output is large on purpose (128 px, no pooling:
    4 x 4 x 1280 floats, 80 KB an image), so a driver holding every result would grow by 40 MB more."""
    from tlpipe.backbones.export import export_backbone

    entry = export_backbone("mobilenet_v2_0.35", weights="none", size=128, pooling="none", store=model_store)
    for name, images in (("warm", 20), ("small", 100), ("large", 600)):
        write_noise_folder(tmp_path / name, images, seed=images)
    fs = read_feature_set(extract(tmp_path / "warm", tmp_path / "train.h5", model=str(entry.directory)).out)
    head = tmp_path / "head.joblib"
    save_head(make_head("logreg").fit(fs.X, fs.y), head, feature_set=fs, metrics={}, params={})
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            MEMORY_SCRIPT,
            str(entry.directory),
            str(head),
            str(model_store.root),
            cluster,
            str(tmp_path),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    grown = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(read_feature_set(tmp_path / "large.h5")) == 600 and len(read_csv(tmp_path / "large.csv")) == 600
    for command in ("extract", "score"):
        more = grown[f"{command} large"] - grown[f"{command} small"]
        assert more < 16 * 2**20, f"{command}: the driver grew {more / 2**20:.1f} MB more for 600 images ({grown})"
