"""Bad rows stay rows (issue 34, kind 16): a NaN or inf embedding in a cache gives that image an error row in
score (the other rows are scored), is reported by info and audit, and is left out of fit-head and compare with a
count; audit's --threshold outside its range is refused in one line naming the range."""

import csv
import json
import shutil

import h5py
import numpy as np
import pytest

from tests.reliability.conftest import one_line_error, tlpipe
from tlpipe.features.cache import describe, read_feature_set
from tlpipe.pipeline.audit.checks import AuditError, audit
from tlpipe.pipeline.scoring.score import score


@pytest.fixture
def damaged(tmp_path, head):
    """A copy of the head's cache whose first two embeddings are NaN and inf; (cache, their paths, their sha256s)."""
    cache = shutil.copy(head.cache, tmp_path / "damaged.h5")
    fs = read_feature_set(cache)
    with h5py.File(cache, "a") as f:
        embeddings = f["features"][fs.key]["embeddings"]
        embeddings[0, 5] = np.nan
        embeddings[1, :] = np.inf
    return cache, set(fs.paths[:2].tolist()), set(fs.sha256[:2].tolist())


def read_rows(out) -> list[dict]:
    with open(out, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_score_gives_each_non_finite_row_an_error_row_and_scores_the_rest(tmp_path, head, damaged):
    cache, paths, shas = damaged
    out = tmp_path / "scores.csv"
    run = tlpipe("score", cache, "--out", out, "--head", head.path, "--store", head.store.root)
    assert run.returncode == 0, run.stderr
    rows = read_rows(out)
    assert len(rows) == 12 and {r["path"] for r in rows if r["error"]} == paths
    assert all("not finite" in r["error"] and r["label"] == "" for r in rows if r["error"])
    assert all(r["label"] in ("china", "flower") for r in rows if not r["error"])
    # scoring the images with the damaged cache as the embedding reuse: the same two error rows
    reused = score(head.photos, tmp_path / "reused.jsonl", head=head.path, store=head.store, cache=cache, device="cpu")
    assert (reused.reused, reused.failed) == (10, 2)
    errors = [json.loads(line) for line in (tmp_path / "reused.jsonl").read_text().splitlines()]
    assert {r["sha256"] for r in errors if r["error"]} == shas


def test_info_reports_non_finite_rows(damaged):
    cache, paths, _ = damaged
    run = tlpipe("info", cache)
    assert run.returncode == 0 and "2 rows with a non-finite embedding (NaN or inf)" in run.stdout, run.stdout
    data = json.loads(tlpipe("info", cache, "--json").stdout)
    (fs,) = data["feature_sets"].values()
    assert fs["nonfinite_rows"] == 2 and {r["path"] for r in fs["nonfinite"]} == paths
    assert "nonfinite_rows" not in next(iter(describe(cache)["feature_sets"].values()))  # a scan only when asked


def test_fit_head_evaluate_and_compare_leave_non_finite_rows_out_with_a_count(tmp_path, damaged):
    cache, _, _ = damaged
    fitted = tlpipe("fit-head", cache, "--out", tmp_path / "h.joblib")
    assert fitted.returncode == 0, fitted.stderr
    assert "2 rows with a non-finite embedding (NaN or inf) left out" in fitted.stdout, fitted.stdout
    sidecar = json.loads((tmp_path / "h.joblib.json").read_text())
    assert sidecar["training"]["rows"] + sidecar["evaluation"]["rows"] == 10
    evaluated = tlpipe("evaluate", tmp_path / "h.joblib", cache, "--split", "all", "--allow-train-rows")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "2 rows with a non-finite embedding (NaN or inf) left out" in evaluated.stdout, evaluated.stdout
    compared = tlpipe("compare", cache, "--models", "logreg", "--cv", "2")
    assert compared.returncode == 0, compared.stderr
    assert "2 rows with a non-finite embedding (NaN or inf) left out" in compared.stdout, compared.stdout


def test_audit_reports_and_leaves_out_non_finite_rows_and_bounds_its_threshold(tmp_path, damaged):
    pytest.importorskip("cleanlab")
    cache, paths, _ = damaged
    run = tlpipe("audit", cache, "--report", tmp_path / "report", "--cv", "2", "--no-scan-sources")
    assert run.returncode == 0, run.stderr
    assert "2 rows with a non-finite embedding (NaN or inf) left out" in run.stderr, run.stderr  # a note
    report = (tmp_path / "report" / "report.md").read_text()
    assert "non-finite embedding" in report and all(p in report for p in paths)
    for value in ("2", "0", "-0.5", "nan"):
        line = one_line_error(tlpipe("audit", cache, "--report", tmp_path / "r2", "--threshold", value))
        assert "(0, 1]" in line and "threshold" in line
    with pytest.raises(AuditError, match=r"\(0, 1\]"):
        audit(cache, threshold=1.5, scan_sources=False)
    assert not (tmp_path / "r2").exists()
