"""The streaming stage shared by extract and score: bounded memory, in-order commits through any sink,
``tlpipe.predict`` (the stage into memory), and the installed distribution's single top-level name."""

from __future__ import annotations

import csv
import gc
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import tlpipe
from tests.conftest import ROOT, write_photo_folder
from tlpipe.features.cache import CacheWriter, read_feature_set
from tlpipe.features.decoder import Decoded
from tlpipe.features.extract import CacheSink, ExtractSummary, extract
from tlpipe.features.sources import discover
from tlpipe.features.stream import LocalEngine, StageModel, run_stream
from tlpipe.pipeline.heads.estimators import make_head
from tlpipe.pipeline.heads.persistence import save_head
from tlpipe.pipeline.scoring.score import ScoreError, predict, score


def live_decoded() -> int:
    """Decoded images alive in this process (pixels held)."""
    return sum(1 for o in gc.get_objects() if type(o) is Decoded and o.pixels is not None)


class BoundedSink(CacheSink):
    """The cache sink, checking at every commit how many decoded images the stage holds."""

    peak = 0

    def append(self, items, outputs):
        BoundedSink.peak = max(BoundedSink.peak, live_decoded())
        super().append(items, outputs)


def test_the_local_engine_holds_a_bounded_number_of_decoded_images(tmp_path, tiny_entry):
    photos = write_photo_folder(tmp_path / "photos", per_class=40)
    records = discover(photos).records
    batch, prefetch, streams = 4, 6, 2
    with CacheWriter(tmp_path / "c.h5") as writer:
        key = tiny_entry.key
        writer.ensure_feature_set(key, tiny_entry.embedding_dim)
        summary = ExtractSummary(out=str(writer.path), key=key)
        model = StageModel(tiny_entry.model_path, tiny_entry.input_size)
        run_stream(
            records,
            model,
            BoundedSink(writer, key),
            summary,
            batch_size=batch,
            unique=True,
            engine=LocalEngine(device="cpu", workers=2, prefetch=prefetch, streams=streams),
        )
    assert summary.embedded == 80 and summary.failed == 0
    # at most: the decoder's prefetch, the batch being filled, and the batches in the inference streams
    assert 0 < BoundedSink.peak <= prefetch + batch * (streams + 1), BoundedSink.peak
    assert len(read_feature_set(tmp_path / "c.h5")) == 80


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_entry, model_store):
    root = tmp_path_factory.mktemp("stream")
    photos = write_photo_folder(root / "photos")
    extract(photos, root / "cache.h5", model=str(tiny_entry.directory), batch_size=4)
    fs = read_feature_set(root / "cache.h5")
    save_head(make_head("logreg").fit(fs.X, fs.y), root / "logreg.joblib", feature_set=fs, metrics={}, params={})
    return root, photos, fs


def test_predict_returns_probabilities_and_errors_in_input_order(tmp_path, trained, model_store):
    root, photos, fs = trained
    good = sorted(photos.rglob("*.jpg"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(good[0].read_bytes()[:100])
    paths = [good[3], broken, tmp_path / "missing.jpg", good[0], good[3]]
    got = predict(paths, head=root / "logreg.joblib", store=model_store, device="cpu", batch_size=2)
    assert got.labels == fs.class_names and got.paths == [str(p) for p in paths]
    assert got.probabilities.dtype == np.float32 and got.probabilities.shape == (5, 2)
    assert got.errors[0] is None and got.errors[3] is None and got.errors[4] is None
    assert "truncated" in got.errors[1] or "image" in got.errors[1]
    assert got.errors[2].startswith("cannot read")
    assert np.isnan(got.probabilities[[1, 2]]).all()
    assert np.allclose(got.probabilities[[0, 3, 4]].sum(axis=1), 1, atol=1e-5)
    assert np.array_equal(got.probabilities[0], got.probabilities[4])  # same file, same row
    # the same probabilities as the scoring output's rows
    score(photos, tmp_path / "s.csv", head=root / "logreg.joblib", store=model_store, device="cpu", batch_size=4)
    rows = {r["path"]: r for r in csv.DictReader(open(tmp_path / "s.csv", newline=""))}
    for i in (0, 3):
        row = rows[str(paths[i].relative_to(photos))]
        assert got.predicted[i] == row["label"]
        assert got.probabilities[i, got.labels.index(row["label"])] == pytest.approx(
            float(row["probability"]), abs=1e-6
        )
    assert got.predicted[1] is None
    with pytest.raises(ValueError, match="exactly one"):
        predict(paths, store=model_store)


@pytest.mark.slow
def test_predict_with_a_fused_classifier_equals_the_head(tmp_path, trained, model_store, tiny_entry):
    from tlpipe.pipeline.scoring.fuse import export_model

    root, photos, _ = trained
    fused = tmp_path / "fused.onnx"
    export_model(root / "logreg.joblib", fused, store=model_store)
    paths = sorted(photos.rglob("*.jpg"))[:5]
    by_head = tlpipe.predict(paths, head=root / "logreg.joblib", store=model_store, device="cpu")
    by_fused = tlpipe.predict(paths, model=fused, device="cpu")
    assert by_fused.labels == by_head.labels and by_fused.errors == [None] * 5
    assert np.allclose(by_fused.probabilities, by_head.probabilities, atol=1e-4)
    with pytest.raises(ScoreError, match="not a tlpipe classifier"):
        predict(paths, model=tiny_entry.model_path)  # a backbone: embeddings, not probabilities


def test_the_wheel_installs_one_top_level_name_and_the_facade_imports(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("tlpipe-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert z.read(top_level).decode().split() == ["tlpipe"]
    assert {n.split("/")[0] for n in names} == {"tlpipe", wheel.name.split("-py3")[0] + ".dist-info"}
    assert {"tlpipe/features/stream.py", "tlpipe/features/decoder.py", "tlpipe/pipeline/scoring/score.py"} <= set(names)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import tlpipe, sys; tlpipe.predict; "
            "print(sorted(m for m in ('onnxruntime', 'tensorflow') if m in sys.modules))",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # the facade imports neither ONNX Runtime nor TensorFlow


def test_progress_is_started_once_per_pass_and_advanced_by_every_input(tmp_path, tiny_entry):
    photos = write_photo_folder(tmp_path / "photos", per_class=5)
    (photos / "china" / "broken.jpg").write_bytes(b"not an image")
    calls: list[tuple[int, int]] = []
    advanced: list[int] = []

    def progress(total, done):
        calls.append((total, done))
        return advanced.append

    extract(photos, tmp_path / "c.h5", model=str(tiny_entry.directory), batch_size=4, progress=progress)
    assert calls == [(11, 0)] and sum(advanced) == 11 and max(advanced) <= 4
    calls.clear(), advanced.clear()
    extract(photos, tmp_path / "c.h5", model=str(tiny_entry.directory), batch_size=4, progress=progress)
    assert calls == [(11, 0)] and sum(advanced) == 11  # content known: hashed, not decoded, still counted
