"""`tlpipe audit` on real HDF5 caches whose rows point at real image files: planted duplicates, leaks,
conflicts, flipped labels and an outlier must be found; the exclude list must round-trip through
compare / fit-head / evaluate; TensorFlow and ONNX Runtime must never be imported."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT
from tlpipe.features.cache import CacheError, CacheWriter, ImageRow, read_exclude_list, read_feature_set

pytest.importorskip("cleanlab", reason="tlpipe[audit] (cleanlab) is not installed")

KEY = "mobilenet_v2-test-avg"


def _image(path: Path, seed: int) -> str:
    """A small generated image with content unique to ``seed``; returns its sha256."""
    rng = np.random.default_rng(seed)
    pixels = (rng.random((24, 32, 3)) * 255).astype(np.uint8)
    pixels[:, : 1 + seed % 30] = (seed * 37) % 256
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, "PNG")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def planted_cache(tmp_path: Path) -> tuple[Path, dict]:
    """Split folders train/ and test/ with class folders; a cache over them with synthetic embeddings and:
    a near duplicate across splits (leak), a near duplicate under the other label (conflict), a
    byte-identical copy under the other class folder (exact conflict, stored once in the cache), two
    flipped labels and one outlier."""
    root = tmp_path / "photos"
    # ReLU'd class blobs in 64 dimensions: distinct rows are at most ~0.87 cosine apart, like photos
    gen = np.random.default_rng(3)
    y = np.repeat([0, 1], 40)
    X = np.maximum(gen.normal(0, 1, (2, 64))[y] + gen.normal(0, 1, (80, 64)), 0).astype(np.float32)
    n = len(y)
    splits = np.where(np.arange(n) % 4 == 0, "test", "train")
    rng = np.random.default_rng(7)
    # near duplicates: rows 1 (train) -> 2 (test), and 5 -> 6 with the other label
    X[2] = X[1] * 1.02 + rng.normal(0, 0.01, X.shape[1]).astype(np.float32)
    y[2], splits[1], splits[2] = y[1], "train", "test"
    X[6] = X[5] + rng.normal(0, 0.01, X.shape[1]).astype(np.float32)
    y[6], splits[5], splits[6] = 1 - y[5], "train", "train"
    # flipped labels: rows far inside their class blob, labelled with the other class
    flipped = []
    for cls in (0, 1):
        members = [i for i in np.flatnonzero(y == cls) if i > 10][:1]
        flipped += members
    for f in flipped:
        y[f] = 1 - y[f]
    # an outlier: a direction no other row has
    X[9] = 0.0
    X[9, :2] = 5.0
    rows, paths = [], []
    for i in range(n):
        rel = f"{splits[i]}/class_{y[i]}/img_{i:03d}.png"
        sha = _image(root / rel, i)
        rows.append(ImageRow(rel, sha, f"class_{y[i]}", str(splits[i]), 32, 24))
        paths.append(rel)
    # the byte-identical copy of row 12 in the other class folder of the other split: extract keeps one row
    exact = f"{'train' if splits[12] == 'test' else 'test'}/class_{1 - y[12]}/copy_of_12.png"
    (root / exact).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / paths[12], root / exact)
    path = tmp_path / "cache.h5"
    with CacheWriter(path) as writer:
        writer.note_source(str(root))
        writer.register_classes(["class_0", "class_1"])
        writer.ensure_feature_set(KEY, X.shape[1], metadata={"backbone": "test", "input_size": 32})
        writer.add(KEY, rows, X)
    return path, {"root": root, "rows": rows, "flipped": flipped, "exact": exact, "X": X}


def test_audit_finds_planted_problems(tmp_path):
    from tlpipe.pipeline.audit.checks import audit

    cache, planted = planted_cache(tmp_path)
    rows = planted["rows"]
    report = tmp_path / "report"
    result = audit(cache, report=report, write_exclude=tmp_path / "exclude.txt", cv=4)
    by_rows = {frozenset(m.path for m in c.members): c for c in result.clusters}
    leak = by_rows[frozenset({rows[1].path, rows[2].path})]
    assert leak.leak and not leak.conflict and leak.kind == "near"
    conflict = by_rows[frozenset({rows[5].path, rows[6].path})]
    assert conflict.conflict and not conflict.leak
    exact = by_rows[frozenset({rows[12].path, planted["exact"]})]
    assert exact.kind == "exact" and exact.conflict and exact.leak
    assert result.clusters[0].leak and [c.leak for c in result.clusters] == sorted(
        (c.leak for c in result.clusters), reverse=True
    )
    assert len(result.clusters) == 3  # nothing else is that similar
    # flipped labels are the top suspects, with the other label suggested
    top = {i.row: i for i in result.label_issues[:4]}
    for row in planted["flipped"]:
        assert row in top and top[row].flagged and top[row].suggested != top[row].given
    assert result.outliers[0].row == 9 and result.outliers[0].flagged
    # exclude list: the test copy of the leak is kept, its train copy and both conflicting rows go
    listed = read_exclude_list(tmp_path / "exclude.txt")
    assert rows[1].sha256 in listed and rows[2].sha256 not in listed
    assert {rows[5].sha256, rows[6].sha256, rows[12].sha256, rows[9].sha256} <= listed
    assert {rows[i].sha256 for i in planted["flipped"]} <= listed
    assert listed == set(result.flagged)
    fs = read_feature_set(cache, exclude=tmp_path / "exclude.txt")
    assert fs.excluded == len(listed) and len(fs) == len(rows) - len(listed) and not set(fs.sha256) & listed
    # the report: Markdown, CSV, JSON and PNGs that open
    text = (report / "report.md").read_text()
    assert "split leaks" in text and rows[1].path in text and "class_0" in text
    for name in ("duplicates.png", "label_issues.png", "outliers.png", "similarity.png"):
        with Image.open(report / name) as im:
            assert im.size[0] > 200 and im.size[1] > 100
    lines = (report / "duplicates.csv").read_text().splitlines()
    assert lines[0].startswith("cluster,kind,leak") and len(lines) == 1 + 6


def test_contact_sheet_placeholders_say_why(tmp_path):
    from tlpipe.pipeline.audit.checks import audit
    from tlpipe.pipeline.reports.audit import _thumbnail

    cache, planted = planted_cache(tmp_path)
    rows, root = planted["rows"], planted["root"]
    (root / rows[9].path).unlink()
    (root / rows[3].path).write_bytes(b"changed")
    result = audit(cache, report=tmp_path / "r", scan_sources=False, cv=4)
    image, reason = _thumbnail(result.roots, rows[9].path, rows[9].sha256, 64)
    assert image is None and reason.startswith("not found under")
    image, reason = _thumbnail(result.roots, rows[3].path, rows[3].sha256, 64)
    assert image is None and reason == "file changed since extraction"
    image, reason = _thumbnail(result.roots, rows[4].path, rows[4].sha256, 64)
    assert image.shape == (64, 64, 3) and reason == ""
    assert (tmp_path / "r" / "outliers.png").stat().st_size > 0
    assert any("not scanned" in n for n in result.notes)


def test_neighbour_backends_agree_and_skip_self():
    from tlpipe.pipeline.audit.checks import nearest_neighbours, normalise_rows

    pytest.importorskip("usearch")
    rng = np.random.default_rng(0)
    X = np.maximum(rng.normal(0, 1, (1500, 48)), 0).astype(np.float32)
    X[7] = X[3]  # an identical pair: each is the other's nearest, at cosine 1
    normalise_rows(X, block_rows=100)
    assert np.allclose(np.linalg.norm(X, axis=1), 1, atol=1e-5)
    exact, cos_exact, used = nearest_neighbours(X, 5, backend="sklearn", block_rows=256)
    approx, cos_approx, used_approx = nearest_neighbours(X, 5, backend="usearch", block_rows=256)
    assert (used, used_approx) == ("sklearn", "usearch")
    assert not (exact == np.arange(len(X))[:, None]).any() and not (approx == np.arange(len(X))[:, None]).any()
    assert exact[3, 0] == 7 and exact[7, 0] == 3 and cos_exact[3, 0] == pytest.approx(1, abs=1e-5)
    assert np.mean(exact[:, 0] == approx[:, 0]) > 0.95
    brute = X @ X.T
    np.fill_diagonal(brute, -np.inf)
    assert np.allclose(cos_exact[:, 0], brute.max(axis=1), atol=1e-4)
    assert np.all(np.diff(cos_exact, axis=1) <= 1e-6)


def test_exclude_lists_are_checked_and_used_by_the_cli(tmp_path):
    cache, planted = planted_cache(tmp_path)
    rows = planted["rows"]
    bad = tmp_path / "bad.txt"
    bad.write_text("# header\n" + rows[0].sha256 + "\nnot-a-digest\n")
    with pytest.raises(CacheError, match="line 3"):
        read_exclude_list(bad)
    good = tmp_path / "exclude.txt"
    good.write_text(f"# two rows\n{rows[0].sha256}  # a reason\n\n{rows[1].sha256.upper()}\n")
    assert read_exclude_list(good) == {rows[0].sha256, rows[1].sha256}

    def tlpipe(*args):
        return subprocess.run(
            [sys.executable, "-m", "tlpipe.pipeline.cli", *map(str, args)],
            capture_output=True,
            text=True,
            env={**os.environ, "COLUMNS": "200"},
            cwd=tmp_path,
        )

    from tlpipe.pipeline.heads.selection import compare_heads

    fs = read_feature_set(cache, exclude=good)
    assert "2 rows left out by an exclude list" in compare_heads(fs, ["logreg"], cv=3, n_jobs=1).setup
    done = tlpipe("fit-head", cache, "--out", tmp_path / "h.joblib", "--exclude", good)
    assert done.returncode == 0 and "2 rows left out by the exclude list" in done.stdout, done.stdout + done.stderr
    # every labelled row but the 2 excluded ones, training rows allowed explicitly (evaluate refuses them otherwise)
    done = tlpipe("evaluate", tmp_path / "h.joblib", cache, "--exclude", good, "--split", "all", "--allow-train-rows")
    assert done.returncode == 0 and "78 " in done.stdout and "2 rows excluded" in done.stdout, done.stdout
    done = tlpipe("evaluate", tmp_path / "h.joblib", cache, "--exclude", good, "--split", "all")
    assert done.returncode == 2 and "--allow-train-rows" in done.stderr, done.stderr
    done = tlpipe("compare", cache, "--models", "logreg", "--exclude", bad)
    assert done.returncode == 2 and done.stderr.strip().startswith("error:") and "line 3" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_audit_runs_without_tensorflow_or_onnxruntime_and_names_the_missing_extra(tmp_path):
    cache, _ = planted_cache(tmp_path)
    blocked = tmp_path / "blocked"
    log = tmp_path / "attempts.log"
    for module in ("tensorflow", "onnxruntime"):
        (blocked / module).mkdir(parents=True)
        (blocked / module / "__init__.py").write_text(
            f"import os\nopen(os.environ['BLOCK_LOG'], 'a').write('{module}\\n')\n"
            "raise ImportError('blocked for test')\n"
        )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(blocked), str(ROOT)]),
        "BLOCK_LOG": str(log),
        "COLUMNS": "200",
    }
    script = textwrap.dedent("""
        import sys
        import tlpipe
        result = tlpipe.audit(sys.argv[1], report=sys.argv[2], cv=4)
        print(result.summary())
        assert "tensorflow" not in sys.modules and "onnxruntime" not in sys.modules, "imported"
    """)
    done = subprocess.run(
        [sys.executable, "-c", script, str(cache), str(tmp_path / "r")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "'split_leaks': 2" in done.stdout and not log.exists()
    assert (tmp_path / "r" / "duplicates.png").exists()
    # without cleanlab: one line naming the extra, exit 2
    (blocked / "cleanlab").mkdir()
    (blocked / "cleanlab" / "__init__.py").write_text("raise ImportError('blocked for test')\n")
    done = subprocess.run(
        [sys.executable, "-m", "tlpipe.pipeline.cli", "audit", str(cache), "--report", str(tmp_path / "r2")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "error: cleanlab is not installed: pip install 'tlpipe[audit]'"


def test_label_conflicts_recorded_by_the_cache_are_listed_without_scanning(tmp_path):
    from tlpipe.pipeline.audit.checks import audit

    cache, planted = planted_cache(tmp_path)
    row = planted["rows"][20]
    other = "class_1" if row.label == "class_0" else "class_0"
    with CacheWriter(cache) as writer:
        _, conflicts = writer.reconcile(
            0, {row.sha256: [(row.path, row.label, row.split), ("elsewhere/same.png", other, "test")]}
        )
    assert len(conflicts) == 1
    assert read_feature_set(cache).excluded_conflicts == 1  # training leaves it out; the audit lists it
    result = audit(cache, scan_sources=False, cv=4)
    cluster = next(c for c in result.clusters if any(m.path == "elsewhere/same.png" for m in c.members))
    assert cluster.kind == "exact" and cluster.conflict and sorted(cluster.labels) == ["class_0", "class_1"]
    assert row.sha256 in result.flagged and result.rows == len(planted["rows"])
