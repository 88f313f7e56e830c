"""Batch scoring end to end with real ONNX sessions: output formats, error rows, resume (after a cut tail and
after SIGKILL), cache reuse, scoring a cache, and one preprocessing path shared with extraction."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import ROOT, write_photo_folder
from tlpipe.features.cache import CacheError, CacheWriter, read_feature_set
from tlpipe.features.extract import extract
from tlpipe.pipeline.heads.estimators import make_head
from tlpipe.pipeline.heads.persistence import save_head
from tlpipe.pipeline.scoring.score import CsvOutput, ScoreError, score


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_entry, model_store):
    """12 photos, their cache, and a logistic-regression head fitted on it and saved."""
    root = tmp_path_factory.mktemp("score")
    photos = write_photo_folder(root / "photos")
    cache = root / "cache.h5"
    extract(photos, cache, model=str(tiny_entry.directory), batch_size=4)
    fs = read_feature_set(cache)
    estimator = make_head("logreg").fit(fs.X, fs.y)
    save_head(estimator, root / "logreg.joblib", feature_set=fs, metrics={}, params={})
    return SimpleNamespace(
        photos=photos, cache=cache, fs=fs, estimator=estimator, head=root / "logreg.joblib", store=model_store
    )


def run(source, out, t, **kw):
    return score(source, out, head=t.head, store=t.store, device="cpu", batch_size=4, **kw)


def read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def distribution(row: dict) -> dict[str, float]:
    """label -> probability of a JSON Lines row."""
    return {row[f"top{i}_label"]: row[f"top{i}_prob"] for i in range(1, 10) if row.get(f"top{i}_label")}


def test_csv_has_one_row_per_image_and_error_rows(tmp_path, trained):
    photos = shutil.copytree(trained.photos, tmp_path / "photos")
    good = next((photos / "flower").glob("*.jpg")).read_bytes()
    (photos / "flower" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (photos / "china" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "scores.csv"
    summary = run(photos, out, trained, top_k=3)
    assert (summary.total, summary.scored, summary.failed, summary.already_done) == (14, 12, 2, 0)
    assert summary.images_per_second > 0
    rows = read_csv(out)
    assert list(rows[0]) == [
        "path",
        "source",
        "sha256",
        "true_label",
        "label",
        "probability",
        "top1_label",
        "top1_prob",
        "top2_label",
        "top2_prob",
        "error",
    ]  # top_k 3 of 2 classes: two
    assert all(r["true_label"] == r["path"].split("/")[0] for r in rows)  # class folders: labelled
    assert len(rows) == 14 and len({r["path"] for r in rows}) == 14
    errors = {r["path"]: r for r in rows if r["error"]}
    assert set(errors) == {"flower/truncated.jpg", "china/empty.jpg"}
    assert "truncated" in errors["flower/truncated.jpg"]["error"] and "empty" in errors["china/empty.jpg"]["error"]
    assert all(r["label"] == "" and r["probability"] == "" and r["top1_label"] == "" for r in errors.values())
    for r in rows:
        if not r["error"]:
            assert r["label"] == r["top1_label"] and r["label"] in ("china", "flower") and len(r["sha256"]) == 64
            assert float(r["probability"]) >= float(r["top2_prob"])
            assert float(r["top1_prob"]) + float(r["top2_prob"]) == pytest.approx(1, abs=1e-5)
    again = run(photos, out, trained, top_k=3)
    assert (again.scored, again.failed, again.already_done) == (0, 0, 14)
    assert len(read_csv(out)) == 14


def test_csv_jsonl_and_parquet_have_the_same_columns(tmp_path, trained):
    pq = pytest.importorskip("pyarrow.parquet")
    for suffix in ("csv", "jsonl", "parquet"):
        run(trained.photos, tmp_path / f"scores.{suffix}", trained, top_k=1)
    csv_rows, jsonl_rows = read_csv(tmp_path / "scores.csv"), read_jsonl(tmp_path / "scores.jsonl")
    parquet_rows = pq.read_table(tmp_path / "scores.parquet").to_pylist()
    columns = ["path", "source", "sha256", "true_label", "label", "probability", "top1_label", "top1_prob", "error"]
    assert list(csv_rows[0]) == list(jsonl_rows[0]) == list(parquet_rows[0]) == columns
    assert len(jsonl_rows) == 12 and all(
        r["error"] is None and r["top1_label"] == r["label"] and r["top1_prob"] == r["probability"] for r in jsonl_rows
    )
    by_path = {r["path"]: r for r in parquet_rows}
    for r in jsonl_rows:
        assert by_path[r["path"]] == r and r["true_label"] == r["path"].split("/")[0]


def test_scoring_an_image_equals_the_head_on_its_cached_embedding(tmp_path, trained):
    """One preprocessing path: decode + resize + backbone in scoring are extraction's."""
    out = tmp_path / "scores.jsonl"
    run(trained.photos, out, trained, top_k=2)
    expected = trained.estimator.predict_proba(trained.fs.X)
    labels = [trained.fs.class_names[c] for c in trained.estimator.classes_]
    row_of = {sha: i for i, sha in enumerate(trained.fs.sha256)}
    rows = read_jsonl(out)
    assert len(rows) == 12
    for r in rows:
        i = row_of[r["sha256"]]
        got = distribution(r)
        assert np.allclose([got[name] for name in labels], expected[i], atol=1e-5)
        assert r["label"] == labels[int(np.argmax(expected[i]))]


def test_cache_reuse_skips_the_backbone_and_predicts_the_same(tmp_path, trained):
    photos = shutil.copytree(trained.photos, tmp_path / "photos")
    write_photo_folder(photos, per_class=1, seed=7)  # 2 photos the cache does not hold
    fresh = run(photos, tmp_path / "fresh.jsonl", trained)
    reused = run(photos, tmp_path / "reused.jsonl", trained, cache=trained.cache)
    assert (fresh.scored, fresh.reused) == (14, 0) and (reused.scored, reused.reused) == (2, 12)
    a = {r["path"]: r for r in read_jsonl(tmp_path / "fresh.jsonl")}
    b = {r["path"]: r for r in read_jsonl(tmp_path / "reused.jsonl")}
    assert a.keys() == b.keys()
    for path in a:
        assert a[path]["label"] == b[path]["label"]
        assert distribution(a[path]) == pytest.approx(distribution(b[path]), abs=1e-5)


def test_an_output_folder_or_format_less_extension_is_refused_before_anything_is_written(tmp_path, trained):
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(ScoreError, match="d.csv is a folder; give the output file's path"):
        run(trained.photos, tmp_path / "d.csv", trained)
    with pytest.raises(ScoreError, match="extension chooses its format"):
        run(trained.photos, tmp_path / "s.txt", trained)
    assert [p.name for p in tmp_path.iterdir()] == ["d.csv"]  # no sidecar, no lock
    assert list((tmp_path / "d.csv").iterdir()) == []
    # an output whose folder cannot be made (a file stands in its path): one clear line, nothing written
    (tmp_path / "file").write_text("x")
    with pytest.raises(ScoreError, match=r"cannot create the output's folder .*file/sub: Not a directory"):
        run(trained.photos, tmp_path / "file" / "sub" / "s.csv", trained)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.csv", "file"]


def test_scoring_a_cache_uses_its_embeddings(tmp_path, trained):
    out = tmp_path / "cache_scores.csv"
    summary = score(trained.cache, out, head=trained.head, batch_size=5)
    assert (summary.total, summary.reused, summary.scored) == (12, 12, 0)
    rows = read_csv(out)
    assert [r["path"] for r in rows] == list(trained.fs.paths)
    assert [r["true_label"] for r in rows] == [trained.fs.class_names[y] for y in trained.fs.y]  # the cache's labels
    expected = trained.estimator.predict_proba(trained.fs.X)
    assert np.allclose([float(r["probability"]) for r in rows], expected.max(axis=1), atol=1e-5)
    assert score(trained.cache, out, head=trained.head).already_done == 12


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_row_cut_short_is_dropped_and_scored_again(tmp_path, trained, suffix):
    reference = tmp_path / f"reference{suffix}"
    run(trained.photos, reference, trained)
    data = reference.read_bytes()
    lines = data.splitlines(keepends=True)
    out = tmp_path / f"cut{suffix}"
    out.write_bytes(b"".join(lines[:5]) + lines[5][:17])  # 4 or 5 complete rows, then half a row
    shutil.copy(f"{reference}.tlpipe.json", f"{out}.tlpipe.json")  # as the interrupted run left it
    summary = run(trained.photos, out, trained)
    assert summary.already_done == (4 if suffix == ".csv" else 5) and summary.written == 12 - summary.already_done
    read = read_csv if suffix == ".csv" else read_jsonl
    got, want = (sorted(read(path), key=lambda r: r["path"]) for path in (out, reference))

    # the rows scored again run in other batches (3 images instead of 4): ONNX Runtime's float sums may differ
    # in the 7th digit, so probabilities are compared to 1e-6, everything else exactly
    def probabilities(row: dict) -> list[str]:
        return [k for k in row if k == "probability" or k.endswith("_prob")]

    assert [{**r, **dict.fromkeys(probabilities(r))} for r in got] == [
        {**r, **dict.fromkeys(probabilities(r))} for r in want
    ]
    assert all(probabilities(r) for r in want)
    for a, b in zip(got, want):
        assert np.allclose([float(a[k]) for k in probabilities(a)], [float(b[k]) for k in probabilities(b)], atol=1e-6)


KILL_SCRIPT = """
import sys
from tlpipe.pipeline.scoring.score import score
score(sys.argv[1], sys.argv[2], head=sys.argv[3], store=sys.argv[4], device="cpu", batch_size=2, workers=1)
"""


def _rows_written(out: Path) -> int:
    if out.suffix == ".parquet":
        return 2 * len(list(Path(str(out) + ".parts").glob("part-*.parquet")))
    return out.read_bytes().count(b"\n") - (out.suffix == ".csv") if out.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("suffix, kill_at", [(".csv", (2, 45)), (".parquet", (30,))])
def test_sigkill_at_several_points_then_rerun_equals_uninterrupted(tmp_path, trained, suffix, kill_at):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    photos = write_photo_folder(tmp_path / "photos", per_class=40)
    (photos / "china" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    reference = tmp_path / f"reference{suffix}"
    score(photos, reference, head=trained.head, store=trained.store, device="cpu", batch_size=2, workers=1)
    out = tmp_path / f"killed{suffix}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-c", KILL_SCRIPT, str(photos), str(out), str(trained.head), str(trained.store.root)]
    seen = []
    for threshold in kill_at:  # rows in the output when the kill is sent
        proc = subprocess.Popen(cmd, env=env)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline and _rows_written(out) < threshold:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        seen.append(_rows_written(out))
    assert any(0 < n < 81 for n in seen), f"no kill landed mid-run: {seen}"
    subprocess.run(cmd, env=env, check=True)
    if suffix == ".csv":
        got, want = read_csv(out), read_csv(reference)
    else:
        import pyarrow.parquet as pq

        got, want = pq.read_table(out).to_pylist(), pq.read_table(reference).to_pylist()
        assert not Path(str(out) + ".parts").exists()
    assert len(got) == 81 and len({r["path"] for r in got}) == 81
    got, want = ({r["path"]: r for r in rows} for rows in (got, want))
    assert got.keys() == want.keys() and got["china/broken.jpg"]["error"]
    for path, row in want.items():
        assert got[path]["label"] == row["label"] and got[path]["sha256"] == row["sha256"]
        if row["probability"] not in ("", None):
            assert float(got[path]["probability"]) == pytest.approx(float(row["probability"]), abs=1e-5)


def test_parquet_without_pyarrow_names_the_install(tmp_path, trained, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    with pytest.raises(ImportError, match=r"tlpipe\[parquet\]"):
        run(trained.photos, tmp_path / "scores.parquet", trained)
    assert not (tmp_path / "scores.parquet").exists()


def test_parquet_round_trip(tmp_path, trained):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "scores.parquet"
    assert run(trained.photos, out, trained).scored == 12
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 12 and rows[0]["top1_label"] and not Path(str(out) + ".parts").exists()
    assert run(trained.photos, out, trained).already_done == 12 and pq.read_table(out).num_rows == 12


def test_clear_errors(tmp_path, trained):
    with pytest.raises(ValueError, match="exactly one"):
        score(trained.photos, tmp_path / "s.csv")
    with pytest.raises(ValueError, match="exactly one"):
        score(trained.photos, tmp_path / "s.csv", head=trained.head, model=tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="needs the head"):
        score(trained.cache, tmp_path / "s.csv", model=tmp_path / "m.onnx")
    with pytest.raises(ScoreError, match=r"\.csv, \.jsonl, \.parquet"):
        run(trained.photos, tmp_path / "s.txt", trained)
    with pytest.raises(ScoreError, match="not a tlpipe classifier"):
        score(trained.photos, tmp_path / "s.csv", model=trained.store.root / trained.fs.metadata["key"] / "model.onnx")
    with CacheWriter(tmp_path / "empty.h5"):
        pass
    with pytest.raises(CacheError, match="holds no feature set"):
        run(trained.photos, tmp_path / "s.csv", trained, cache=tmp_path / "empty.h5")
    assert not (tmp_path / "s.csv").exists()  # refused before the output was created
    run(trained.photos, tmp_path / "s.csv", trained, top_k=1)
    with pytest.raises(ScoreError, match="another model or options"):
        run(trained.photos, tmp_path / "s.csv", trained, top_k=2)
    (tmp_path / "header_only.csv").write_text("path,label\n")  # someone else's file: never overwritten
    with pytest.raises(ScoreError, match="not written by tlpipe"):
        run(trained.photos, tmp_path / "header_only.csv", trained, top_k=1)
    assert (tmp_path / "header_only.csv").read_text() == "path,label\n"
    shutil.copy(tmp_path / "s.csv.tlpipe.json", tmp_path / "held.csv.tlpipe.json")  # a same-model run holds it
    held = CsvOutput(tmp_path / "held.csv", 1)
    try:
        with pytest.raises(ScoreError, match=f"held.csv is being written by pid {os.getpid()}; wait"):
            run(trained.photos, tmp_path / "held.csv", trained, top_k=1)
    finally:
        held.close()
    assert not (tmp_path / "held.csv.lock").exists() and not (tmp_path / "s.csv.lock").exists()  # cleaned up


def test_resume_refuses_another_model_or_a_foreign_file(tmp_path, trained):
    out = tmp_path / "scores.csv"
    run(trained.photos, out, trained)
    other = tmp_path / "other.joblib"
    for suffix in ("", ".json"):
        Path(str(other) + suffix).write_bytes(Path(str(trained.head) + suffix).read_bytes())
    with open(other, "ab") as fh:  # same head, other bytes: its checksum no longer matches, so trust it
        fh.write(b"\0")
    with pytest.raises(ScoreError, match="another model"):
        score(trained.photos, out, head=other, trust=True, store=trained.store, device="cpu")
    foreign = tmp_path / "mine.csv"
    foreign.write_text("my,own,file\n")
    with pytest.raises(ScoreError, match="not written by tlpipe"):
        run(trained.photos, foreign, trained)
    assert foreign.read_text() == "my,own,file\n"
