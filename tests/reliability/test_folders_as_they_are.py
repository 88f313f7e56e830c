"""Issue 34, kinds 6, 7, 8, 11, 12 and 15: the folder as it is now, labels and splits as the folder means them, any
bytes in names. Generated folders, the real tiny backbone, the CLI as a second process where the issue names a
command. Each test failed on the code before the fix (see docs/reliability.md, "Round 3")."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT
from tlpipe.features.cache import describe, read_feature_set
from tlpipe.features.extract import extract
from tlpipe.features.sources import SPLIT_ALIASES, discover, normalize_split

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
LATIN1 = os.fsdecode(b"caf\xe9")  # a Latin-1 name, as unzip writes it: not UTF-8 (a surrogate escape in Python)
SHOWN = "caf\\xe9"  # how tlpipe shows and writes it


def cli(*args) -> subprocess.CompletedProcess:
    """The CLI in a second process; stdout and stderr as bytes (so invalid UTF-8 is seen, not smoothed over)."""
    return subprocess.run(
        [sys.executable, "-m", "tlpipe.pipeline.cli", *map(str, args)], capture_output=True, env=ENV, timeout=600
    )


def text(proc: subprocess.CompletedProcess) -> str:
    """stdout + stderr, which must be valid UTF-8."""
    return proc.stdout.decode("utf-8") + proc.stderr.decode("utf-8")


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "backslashreplace")[-3000:]
    assert b"Traceback" not in proc.stderr
    return text(proc)


def png(path: Path, seed: int, size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    pixels[: size // 2] //= 1 + seed % 3  # some structure, so classes differ a little
    Image.fromarray(pixels).save(path, "PNG")
    return path


def classes(root: Path, names, per_class: int, seed: int = 0) -> Path:
    for c, name in enumerate(names):
        for i in range(per_class):
            png(root / name / f"{i}.png", seed + 100 * c + i)
    return root


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_extract(source, out, entry, **kw):
    return extract(source, out, model=str(entry.directory), device="cpu", **kw)


# -- kind 6: deleted or edited photos -----------------------------------------------------------------------------
def test_deleted_and_edited_photos_are_reported_and_left_out_unless_kept(tmp_path, tiny_entry):
    root = classes(tmp_path / "photos", ("cats", "dogs"), 6)
    out = tmp_path / "cache.h5"
    run_extract(root, out, tiny_entry)
    deleted, edited = root / "cats" / "0.png", root / "dogs" / "1.png"
    old = {sha(deleted), sha(edited)}
    deleted.unlink()
    png(edited, 999)  # edited in place: same path, new content

    proc = cli("extract", root, "--backbone", tiny_entry.directory, "--out", out, "--device", "cpu")
    said = ok(proc)
    assert "1 cached image gone" in said and "1 changed" in said, said
    assert "gone cats/0.png" in said and "changed dogs/1.png" in said, said
    again = run_extract(root, out, tiny_entry)  # nothing new to report: it was said once
    assert again.gone == [] and again.embedded == 0

    info = describe(out)
    assert info["images"] == 11 and info["per_class"] == {"cats": 5, "dogs": 6}
    assert sorted((m["path"], m["reason"]) for m in info["missing"]) == [
        ("cats/0.png", "gone"),
        ("dogs/1.png", "changed"),
    ]
    fs = read_feature_set(out)
    assert len(fs) == 11 and fs.excluded_missing == 2 and not old & set(fs.sha256)
    assert len(set(fs.paths)) == len(fs)  # the edited file: one row, its new content
    assert fs.sha256[list(fs.paths).index("dogs/1.png")] == sha(edited)
    kept = read_feature_set(out, keep_missing=True)
    assert len(kept) == 13 and old <= set(kept.sha256) and kept.excluded_missing == 0

    # fit-head, compare and audit leave them out, with a count; --keep-missing keeps them
    head = tmp_path / "h.joblib"
    fitted = json.loads(cli("fit-head", out, "--out", head, "--json").stdout)
    used = lambda fit: sum(len(fit["metadata"][part]["sha256"]) for part in ("training", "evaluation"))  # noqa: E731
    assert used(fitted) == 11
    assert "2 rows whose source file is gone or changed since extract left out" in fitted["setup"]
    kept_fit = json.loads(cli("fit-head", out, "--out", head, "--json", "--keep-missing").stdout)
    assert used(kept_fit) == 13
    assert "gone or changed" not in kept_fit["setup"]
    compared = ok(cli("compare", out, "--models", "logreg", "--cv", "2"))
    assert "2 rows whose source file is gone or changed since extract left out" in compared
    assert "gone or changed" not in ok(cli("compare", out, "--models", "logreg", "--cv", "2", "--keep-missing"))
    audited = ok(cli("audit", out, "--report", tmp_path / "audit", "--cv", "2", "--no-scan-sources"))
    assert "· 11 rows" in audited and "2 rows whose source file is gone or changed" in audited
    kept_audit = ok(cli("audit", out, "--report", tmp_path / "a2", "--cv", "2", "--no-scan-sources", "--keep-missing"))
    assert "· 13 rows" in kept_audit

    # the library: the same parameter
    from tlpipe.pipeline.audit.checks import audit
    from tlpipe.pipeline.heads.fit import train_head

    assert audit(out, scan_sources=False, cv=2, keep_missing=True).rows == 13
    assert used({"metadata": train_head(out, out=tmp_path / "lib.joblib", keep_missing=True).metadata}) == 13

    # the deleted file back: its row is used again, without re-embedding
    png(deleted, 0)
    assert sha(deleted) in old
    back = run_extract(root, out, tiny_entry)
    assert back.embedded == 0 and len(read_feature_set(out)) == 12 and describe(out)["images"] == 12


def test_a_row_gone_from_one_source_is_taken_up_by_another_that_holds_it(tmp_path, tiny_entry):
    first = classes(tmp_path / "a", ("cats", "dogs"), 2)
    second = classes(tmp_path / "b", ("cats", "dogs"), 2)  # the same bytes, another source
    out = tmp_path / "cache.h5"
    run_extract(first, out, tiny_entry)
    run_extract(second, out, tiny_entry)
    (first / "cats" / "0.png").unlink()
    assert [g[0] for g in run_extract(first, out, tiny_entry).gone] == ["cats/0.png"]
    assert len(read_feature_set(out)) == 3
    run_extract(second, out, tiny_entry)  # b still holds that content: the row is b's now, and used
    fs = read_feature_set(out)
    assert len(fs) == 4 and fs.excluded_missing == 0


# -- kind 7: a symlinked alias of a class folder -------------------------------------------------------------------
def test_an_alias_symlink_of_a_class_folder_never_takes_its_images(tmp_path, tiny_entry):
    root = classes(tmp_path / "photos", ("cats", "dogs"), 3)
    os.symlink("cats", root / "Kitties")  # sorts before cats
    os.symlink(root / "dogs", root / "zz_dogs")  # sorts after dogs
    os.symlink("..", root / "cats" / "loop")  # a real loop
    classes(tmp_path / "elsewhere", ("birds",), 2, seed=50)
    os.symlink(tmp_path / "elsewhere" / "birds", root / "birds")  # a folder outside the tree: followed

    source = discover(root)
    labels = {r.relpath: r.label for r in source.records}
    assert source.class_names == ["birds", "cats", "dogs"]
    assert sorted(p for p, label in labels.items() if label == "cats") == ["cats/0.png", "cats/1.png", "cats/2.png"]
    assert (
        sum(label == "dogs" for label in labels.values()) == 3 and sum(lab == "birds" for lab in labels.values()) == 2
    )
    skipped = dict(source.skipped)
    assert "alias of cats" in skipped["Kitties"] and "alias of dogs" in skipped["zz_dogs"]
    assert "symlink loop" in skipped["cats/loop"]
    assert any("Kitties" in w and "cats" in w for w in source.warnings)

    out = tmp_path / "cache.h5"
    said = ok(cli("extract", root, "--backbone", tiny_entry.directory, "--out", out, "--device", "cpu"))
    assert "Kitties" in said and "alias of cats" in said
    assert describe(out)["per_class"] == {"birds": 2, "cats": 3, "dogs": 3}


# -- kind 8: split folders whose train folder is not literally "train" ---------------------------------------------
@pytest.mark.parametrize("train_name", ["training_data", "Training Data", "train-set"])
def test_split_folders_named_anyhow_are_the_splits_heads_use(tmp_path, tiny_entry, train_name):
    root = tmp_path / "data"
    classes(root / train_name, ("cats", "dogs"), 5)
    classes(root / "test", ("cats", "dogs"), 3, seed=500)
    out = tmp_path / "cache.h5"
    run_extract(root, out, tiny_entry)
    fs = read_feature_set(out)
    assert sorted(set(fs.split)) == ["test", "train"] and int(np.sum(fs.split == "train")) == 10

    fitted = ok(cli("fit-head", out, "--out", tmp_path / "h.joblib"))
    assert "cache split column: train on 'train' (10 rows), evaluate on 'test' (6 rows)" in fitted, fitted
    compared = ok(cli("compare", out, "--models", "logreg", "--cv", "2"))
    assert "no usable split column" not in compared and "on 10 rows" in compared, compared
    evaluated = json.loads(cli("evaluate", tmp_path / "h.joblib", out, "--json").stdout)
    assert evaluated["split"] == "test" and evaluated["n"] == 6


def test_one_definition_of_split_names_for_extract_and_heads(tmp_path, tiny_entry):
    from tlpipe.pipeline.heads.estimators import select_split

    assert {SPLIT_ALIASES[a] for a in ("training_data", "training_set", "trainset", "train")} == {"train"}
    assert {SPLIT_ALIASES[a] for a in ("valid", "val", "validation")} == {"val"}
    assert {SPLIT_ALIASES[a] for a in ("test_set", "test", "testing")} == {"test"}
    # a cache written before (the split column holds the folder's own name) reads with the shared names
    root = tmp_path / "data"
    classes(root / "training_data", ("cats", "dogs"), 4)
    classes(root / "validation", ("cats", "dogs"), 2, seed=300)
    out = tmp_path / "cache.h5"
    run_extract(root, out, tiny_entry)
    with h5py.File(out, "r+") as f:
        n = int(f["images"].attrs["count"])
        split = f["images"]["split"][:n]
        f["images"]["split"][:n] = np.where(split == b"train", b"training_data", b"Validation")
    fs = read_feature_set(out)
    train, test, setup = select_split(fs)
    assert (len(train), len(test)) == (8, 4) and "evaluate on 'val'" in setup
    assert describe(out)["per_split"] == {"train": 8, "val": 4}
    # evaluate --split takes the names as extract does
    ok(cli("fit-head", out, "--out", tmp_path / "h.joblib"))
    assert json.loads(cli("evaluate", tmp_path / "h.joblib", out, "--split", "validation", "--json").stdout)["n"] == 4


def test_test_rows_without_training_rows_are_refused_not_trained_on(tmp_path, tiny_entry):
    root = tmp_path / "data"
    files = [png(root / f"{c}_{i}.png", 10 * k + i) for k, c in enumerate(("cats", "dogs")) for i in range(6)]
    manifest = root / "m.csv"
    manifest.write_text(
        "path,label,split\n"
        + "".join(f"{p.name},{p.name[:4]},{'batch_a' if i % 2 else 'test'}\n" for i, p in enumerate(files))
    )
    out = tmp_path / "cache.h5"
    run_extract(manifest, out, tiny_entry)
    proc = cli("fit-head", out, "--out", tmp_path / "h.joblib")
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr
    line = proc.stderr.decode().strip()
    assert "'test'" in line and "no 'train'" in line and "batch_a" in line, line
    assert not (tmp_path / "h.joblib").exists()


# -- kind 11: names that are not UTF-8 are stored losslessly ---------------------------------------------------------
def test_non_utf8_file_names_are_stored_losslessly_and_a_rerun_changes_nothing(tmp_path, tiny_entry):
    root = classes(tmp_path / "photos", ("cats", "dogs"), 3)
    png(root / "cats" / f"{LATIN1}.png", 77)
    png(root / LATIN1 / "x.png", 78)  # a folder name too (a third class)
    png(root / LATIN1 / "y.png", 79)
    (root / "dogs" / f"{LATIN1}-broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")  # a failure, by name
    out = tmp_path / "cache.h5"
    first = run_extract(root, out, tiny_entry)
    assert first.embedded == 9 and first.failed == 1

    def state():
        with h5py.File(out, "r") as f:
            images, failures = f["images"], f["failures"]
            blob = images["path_utf8"][: images.attrs["path_bytes"]].tobytes()
            return (
                blob,
                int(images.attrs["path_bytes"]),
                int(failures.attrs["count"]),
                int(failures.attrs["path_bytes"]),
            )

    before = state()
    assert b"cats/caf\xe9.png" in before[0] and (b"caf\xe9/x.png" in before[0])  # the file system's own bytes
    said = ok(cli("extract", root, "--backbone", tiny_entry.directory, "--out", out, "--device", "cpu"))
    assert "cached rows updated" not in said and "gone" not in said, said
    second = run_extract(root, out, tiny_entry)
    assert (second.embedded, second.relabelled, second.gone) == (0, 0, [])
    assert state() == before  # nothing rewritten, the blob does not grow
    fs = read_feature_set(out)
    assert "cats/caf\\xe9.png" in set(fs.paths) and f"{SHOWN}/x.png" in set(fs.paths)  # shown with escapes


# -- kind 12: a class folder whose name is not UTF-8, through every output --------------------------------------------
def test_a_non_utf8_class_name_gives_valid_reports_json_and_parquet(tmp_path, tiny_entry, model_store):
    pytest.importorskip("pyarrow")
    root = classes(tmp_path / "photos", ("cats", LATIN1), 8)
    png(root / "cats" / f"{LATIN1}.png", 555)
    out = tmp_path / "cache.h5"
    run_extract(root, out, tiny_entry)

    shown = cli("info", out, "--json")
    ok(shown)
    info = json.loads(shown.stdout.decode("utf-8"))
    assert set(info["class_names"]) == {"cats", SHOWN}
    head = tmp_path / "h.joblib"
    ok(cli("fit-head", out, "--out", head))
    evaluated = cli("evaluate", head, out, "--split", "all", "--allow-train-rows", "--json")
    ok(evaluated)
    assert SHOWN in json.loads(evaluated.stdout.decode("utf-8"))["labels"]
    ok(cli("evaluate", head, out, "--split", "all", "--allow-train-rows", "--report", tmp_path / "ev"))
    assert SHOWN in json.loads((tmp_path / "ev" / "evaluation.json").read_bytes().decode("utf-8"))["labels"]
    ok(cli("compare", out, "--models", "logreg", "--cv", "2", "--report", tmp_path / "cmp"))
    ok(cli("audit", out, "--report", tmp_path / "aud", "--cv", "2"))
    for report in ("cmp", "aud"):
        written = list((tmp_path / report).rglob("*"))
        assert (tmp_path / report / "report.md").exists(), written
        for path in written:
            if path.suffix in (".md", ".json", ".csv", ".html"):
                path.read_bytes().decode("utf-8")  # valid UTF-8
            if path.suffix == ".json":
                json.loads(path.read_bytes())
        assert SHOWN in (tmp_path / report / "report.md").read_text(encoding="utf-8")
    ok(cli("export-cache", out, "--out", tmp_path / "e.parquet"))
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "e.parquet")
    assert SHOWN in set(table.column("label").to_pylist())
    assert "cats/caf\\xe9.png" in set(table.column("path").to_pylist())
    ok(cli("export-model", head, "--out", tmp_path / "fused.onnx", "--store", model_store.root, "--images", root))
    assert (tmp_path / "fused.onnx").stat().st_size > 0


# -- kind 15: a class named train or test in plain class folders ----------------------------------------------------
def test_a_class_named_like_a_split_in_plain_class_folders_is_a_class(tmp_path, tiny_entry):
    root = classes(tmp_path / "voc", ("bus", "car", "train", "truck"), 2)
    source = discover(root)
    assert source.layout == "class_folders" and source.class_names == ["bus", "car", "train", "truck"]
    assert {r.split for r in source.records} == {None}
    assert any("train" in w and "class" in w for w in source.warnings)
    out = tmp_path / "cache.h5"
    said = ok(cli("extract", root, "--backbone", tiny_entry.directory, "--out", out, "--device", "cpu"))
    assert "train" in said
    assert describe(out)["per_class"] == {"bus": 2, "car": 2, "train": 2, "truck": 2}
    # split folders still are split folders when they hold class folders
    split_root = tmp_path / "splits"
    classes(split_root / "train", ("bus", "car"), 1)
    classes(split_root / "test", ("bus", "car"), 1, seed=9)
    assert discover(split_root).layout == "split_folders"
    assert normalize_split("Train") == "train"
