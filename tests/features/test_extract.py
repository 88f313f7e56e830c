"""Extraction end to end with a real ONNX model: counts, resume, bad input, SIGKILL at several points."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, write_photo_folder
from tlpipe.features.cache import CacheError, describe, read_feature_set
from tlpipe.features.extract import extract


def run(source, out, entry, **kw):
    return extract(source, out, model=str(entry.directory), batch_size=4, **kw)


def test_extract_then_rerun_then_append(tmp_path, tiny_entry, photo_folder):
    out = tmp_path / "cache.h5"
    first = run(photo_folder, out, tiny_entry)
    assert (first.total, first.embedded, first.failed) == (12, 12, 0)
    fs = read_feature_set(out)
    assert fs.X.shape == (12, tiny_entry.embedding_dim) and fs.class_names == ["china", "flower"]
    assert set(fs.y) == {0, 1} and fs.metadata["key"] == tiny_entry.key
    again = run(photo_folder, out, tiny_entry)
    assert (again.embedded, again.cached) == (0, 12)
    write_photo_folder(photo_folder, per_class=3, seed=1)  # 6 new photos
    more = run(photo_folder, out, tiny_entry)
    assert (more.embedded, more.cached) == (6, 12)
    assert len(read_feature_set(out)) == 18


def test_embeddings_equal_the_model_on_the_same_pixels(tmp_path, tiny_entry, photo_folder):
    from tlpipe.backbones.runtime import OnnxEmbedder
    from tlpipe.features.images import load_image

    out = tmp_path / "cache.h5"
    run(photo_folder, out, tiny_entry)
    fs = read_feature_set(out)
    pixels = np.stack([load_image(photo_folder / p, 64)[0] for p in fs.paths[:3]])
    assert np.allclose(OnnxEmbedder(tiny_entry.model_path, "cpu")(pixels), fs.X[:3], atol=1e-5)


def test_bad_files_are_recorded_and_skipped(tmp_path, tiny_entry, photo_folder):
    (photo_folder / "china" / "empty.jpg").write_bytes(b"")
    (photo_folder / "china" / "text.png").write_text("not an image")
    good = next((photo_folder / "flower").glob("*.jpg")).read_bytes()
    (photo_folder / "flower" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (photo_folder / "flower" / "copy.jpg").write_bytes(good)  # same content, another name
    (photo_folder / "notes.csv").write_text("a,b\n")
    out = tmp_path / "cache.h5"
    summary = run(photo_folder, out, tiny_entry)
    assert summary.embedded == 12 and summary.duplicates == 1
    reasons = dict(summary.failures)
    assert set(reasons) == {"china/empty.jpg", "china/text.png", "flower/truncated.jpg"}
    assert "empty" in reasons["china/empty.jpg"]
    recorded = {f["path"] for f in describe(out)["failures"]}
    assert {"china/empty.jpg", "flower/truncated.jpg", "notes.csv"} <= recorded


def test_clear_errors_leave_the_cache_untouched(tmp_path, tiny_entry, photo_folder):
    out = tmp_path / "cache.h5"
    run(photo_folder, out, tiny_entry)
    before = out.read_bytes()
    with pytest.raises(FileNotFoundError):
        run(tmp_path / "nope", out, tiny_entry)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="no images"):
        run(tmp_path / "empty", out, tiny_entry)
    with pytest.raises(CacheError, match="does not exist"):
        run(photo_folder, tmp_path / "no" / "dir" / "c.h5", tiny_entry)
    with pytest.raises(KeyError, match="unknown backbone"):
        extract(photo_folder, out, backbone="alexnet")
    assert out.read_bytes() == before


def _content(path):
    fs = read_feature_set(path)
    order = np.argsort(fs.sha256)
    return fs.sha256[order], fs.X[order], fs.y[order]


KILL_SCRIPT = """
import sys
from tlpipe.features.extract import extract
extract(sys.argv[1], sys.argv[2], model=sys.argv[3], batch_size=2, workers=1)
"""


def _committed(path: Path) -> int:
    try:
        return describe(path)["images"]
    except Exception:  # the file may not exist yet, or be mid-write: that is what we probe
        return -1


@pytest.mark.slow
def test_sigkill_at_several_points_then_rerun_equals_uninterrupted(tmp_path, tiny_entry):
    photos = write_photo_folder(tmp_path / "photos", per_class=40)
    reference = tmp_path / "reference.h5"
    extract(photos, reference, model=str(tiny_entry.directory), batch_size=2, workers=1)
    killed = tmp_path / "killed.h5"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", KILL_SCRIPT, str(photos), str(killed), str(tiny_entry.directory)]
    seen = []
    for threshold in (-1, 0, 6, 20, 40, 60, 76):  # -1: as soon as the file exists, maybe half-created
        proc = subprocess.Popen(cmd, env=env)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if killed.exists() and _committed(killed) >= threshold:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if killed.exists():  # a kill before the cache was created leaves no file, which is fine
            seen.append(describe(killed)["images"])  # the file opens after every kill
    assert any(0 < c < 80 for c in seen), f"no kill landed mid-run: {seen}"
    subprocess.run(cmd, env=env, check=True)
    sha, X, y = _content(killed)
    ref_sha, ref_X, ref_y = _content(reference)
    assert len(sha) == 80 and list(sha) == list(ref_sha) and np.array_equal(y, ref_y)
    assert np.allclose(X, ref_X, atol=1e-5)


def test_transformer_composes_with_a_head(tmp_path, tiny_entry, photo_folder):
    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from tlpipe.features import EmbeddingTransformer

    paths = sorted(photo_folder.rglob("*.jpg"))
    labels = [p.parent.name for p in paths]
    embedder = EmbeddingTransformer(model=str(tiny_entry.directory), cache=tmp_path / "t.h5", device="cpu")
    pipe = make_pipeline(clone(embedder), StandardScaler(), LogisticRegression(max_iter=500)).fit(paths, labels)
    assert pipe.score(paths, labels) > 0.9
    X = embedder.fit_transform(paths[::-1])  # order follows the input; all from the cache now
    assert X.shape == (12, tiny_entry.embedding_dim)
    assert np.allclose(X[-1], pipe[0].transform(paths[:1])[0])
    with pytest.raises(ValueError, match="could not be embedded"):
        (tmp_path / "bad.jpg").write_bytes(b"nope")
        embedder.transform([tmp_path / "bad.jpg"])


def test_streams_and_batch_sizes_give_the_same_cache(tmp_path, tiny_entry):
    photos = write_photo_folder(tmp_path / "p", per_class=9)
    (photos / "china" / "copy.jpg").write_bytes(next((photos / "flower").iterdir()).read_bytes())  # a duplicate
    (photos / "china" / "bad.jpg").write_bytes(b"not a jpeg")
    caches = {}
    for streams, batch in ((1, 32), (2, 2), (3, 1)):
        out = tmp_path / f"s{streams}.h5"
        summary = extract(photos, out, model=str(tiny_entry.directory), batch_size=batch, streams=streams)
        assert (summary.embedded, summary.duplicates, summary.failed) == (18, 1, 1)
        assert len(summary.label_conflicts) == 1  # the copy is a flower filed under china
        fs = read_feature_set(out, exclude_conflicts=False)
        caches[streams] = dict(zip(fs.sha256, fs.X))
        assert len(fs) == 18 and len(set(fs.sha256)) == 18 and len(describe(out)["failures"]) == 1
    for streams in (2, 3):
        assert caches[streams].keys() == caches[1].keys()
        for sha, x in caches[1].items():
            np.testing.assert_allclose(caches[streams][sha], x, rtol=1e-4, atol=1e-5)
