"""Issue 14: the folders, files and manifests people really have. Right labels, whole paths, embedding settings
in the feature set's identity, options checked before anything is written, other HDF5 programs, the docs'
plain-h5py example. Each test uses generated inputs of the kind and fails on the code before the fix."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, write_photo_folder
from tlpipe.features.cache import CacheLockedError, describe, read_feature_set
from tlpipe.features.extract import extract
from tlpipe.features.sources import LayoutError, discover

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}


def run_extract(source, out, entry, **kw):
    return extract(source, out, model=str(entry.directory), **({"device": "cpu"} | kw))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tlpipe.pipeline.cli", *args], capture_output=True, text=True, env=ENV, timeout=300
    )


def sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- 2. labels -----------------------------------------------------------------------------------------------
def test_same_bytes_under_two_labels_is_a_conflict_recorded_warned_listed_and_excluded(tmp_path, tiny_entry, caplog):
    photos = write_photo_folder(tmp_path / "p", per_class=4)
    original = sorted((photos / "flower").iterdir())[0]
    shutil.copy(original, photos / "china" / "zz_copy.jpg")  # a flower filed under china too
    out = tmp_path / "c.h5"
    summary = run_extract(photos, out, tiny_entry)
    # recorded with every path and label, never settled by which path sorts first
    assert [sorted((o["path"], o["label"]) for o in c["occurrences"]) for c in summary.label_conflicts] == [
        [("china/zz_copy.jpg", "china"), (f"flower/{original.name}", "flower")]
    ]
    assert any("label conflicts" in r.getMessage() and "china/zz_copy.jpg" in r.getMessage() for r in caplog.records)
    info = describe(out)
    assert len(info["label_conflicts"]) == 1 and info["label_conflicts"][0]["sha256"] == sha(original)
    # excluded from training and evaluation by default
    fs = read_feature_set(out)
    assert sha(original) not in set(fs.sha256) and fs.excluded_conflicts == 1 and len(fs) == 7
    assert sha(original) in set(read_feature_set(out, exclude_conflicts=False).sha256)
    # the CLI: info (text and --json), extract's warning
    text = cli("info", str(out))
    assert text.returncode == 0 and "1 label conflict " in text.stdout and "china/zz_copy.jpg (china)" in text.stdout
    assert info["per_class"] == {"china": 4, "flower": 3, "(label conflict)": 1}  # not counted under either label
    data = json.loads(cli("info", str(out), "--json").stdout)
    assert {o["label"] for o in data["label_conflicts"][0]["occurrences"]} == {"china", "flower"}
    again = cli("extract", str(photos), "--backbone", str(tiny_entry.directory), "--out", str(out), "-q")
    assert again.returncode == 0 and "label conflicts" in again.stderr and "zz_copy.jpg" in again.stderr
    # fixing it (the copy removed) resolves it, and the row comes back
    (photos / "china" / "zz_copy.jpg").unlink()
    fixed = run_extract(photos, out, tiny_entry)
    assert fixed.label_conflicts == [] and describe(out)["label_conflicts"] == []
    fs = read_feature_set(out)
    assert len(fs) == 8 and fs.excluded_conflicts == 0
    assert fs.class_names[fs.y[list(fs.sha256).index(sha(original))]] == "flower"


def test_a_conflict_across_two_sources_is_recorded(tmp_path, tiny_entry):
    photos = write_photo_folder(tmp_path / "p", per_class=3)
    one = sorted((photos / "china").iterdir())[0]
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(one, other / "a.jpg")
    (other / "labels.csv").write_text("path,label\na.jpg,flower\n")
    out = tmp_path / "c.h5"
    run_extract(photos, out, tiny_entry)
    summary = run_extract(other / "labels.csv", out, tiny_entry)
    assert summary.cached == 1 and len(summary.label_conflicts) == 1
    occurrences = describe(out)["label_conflicts"][0]["occurrences"]
    assert {(o["path"], o["label"]) for o in occurrences} == {(f"china/{one.name}", "china"), ("a.jpg", "flower")}
    assert {o["source"] for o in occurrences} == {str(photos.resolve()), str((other / "labels.csv").resolve())}
    assert sha(one) not in set(read_feature_set(out).sha256)


def test_a_rerun_after_relabelling_or_moving_updates_rows_without_re_embedding(tmp_path, tiny_entry):
    photos = write_photo_folder(tmp_path / "p", per_class=3)
    out = tmp_path / "c.h5"
    run_extract(photos, out, tiny_entry)
    before = read_feature_set(out)
    moved = sorted((photos / "china").iterdir())[0]
    moved.rename(photos / "flower" / "was_china.jpg")  # relabelled by moving it to another class folder
    renamed = sorted((photos / "flower").iterdir())[0]
    renamed.rename(photos / "flower" / "renamed.jpg")  # same bytes, new path, same label
    summary = run_extract(photos, out, tiny_entry)
    assert (summary.embedded, summary.cached, summary.relabelled) == (0, 6, 2)
    after = read_feature_set(out)
    np.testing.assert_array_equal(after.X, before.X)  # nothing re-embedded
    row = list(after.sha256).index(sha(photos / "flower" / "was_china.jpg"))
    assert (after.paths[row], after.class_names[after.y[row]]) == ("flower/was_china.jpg", "flower")
    assert "flower/renamed.jpg" in set(after.paths)
    assert run_extract(photos, out, tiny_entry).relabelled == 0  # nothing changed since


def test_a_manifest_label_or_split_edit_updates_rows(tmp_path, tiny_entry):
    photos = write_photo_folder(tmp_path / "p", per_class=2)
    files = sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.jpg"))
    manifest = photos / "m.csv"
    manifest.write_text("path,label,split\n" + "".join(f"{f},{f.split('/')[0]},train\n" for f in files))
    out = tmp_path / "c.h5"
    run_extract(manifest, out, tiny_entry)
    manifest.write_text(
        "path,label,split\n"
        + "".join(
            f"{f},{'flower' if i == 0 else f.split('/')[0]},{'test' if i == 1 else 'train'}\n"
            for i, f in enumerate(files)
        )
    )
    summary = run_extract(manifest, out, tiny_entry)
    assert (summary.embedded, summary.relabelled) == (0, 2)
    fs = read_feature_set(out)
    by_path = {p: (fs.class_names[y], s) for p, y, s in zip(fs.paths, fs.y, fs.split)}
    assert by_path[files[0]] == ("flower", "train") and by_path[files[1]] == (files[1].split("/")[0], "test")


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)


@pytest.mark.parametrize(
    ("files", "layout", "expected"),
    [
        # split folders by structure, whatever their names
        (
            ["2019/cats/a.png", "2019/dogs/b.png", "2020/cats/c.png", "2020/dogs/d.png"],
            "split_folders",
            {"2019/cats/a.png": ("cats", "2019"), "2020/dogs/d.png": ("dogs", "2020")},
        ),
        # a flat folder of unlabelled images beside split folders
        (
            ["train/cats/a.png", "train/dogs/b.png", "test1/x.png", "test1/y.png"],
            "split_folders",
            {"train/cats/a.png": ("cats", "train"), "test1/x.png": (None, "test1")},
        ),
        # a single wrapper folder around the class folders, seen through
        (
            ["dataset/cats/a.png", "dataset/dogs/b.png"],
            "class_folders",
            {"dataset/cats/a.png": ("cats", None), "dataset/dogs/b.png": ("dogs", None)},
        ),
        # ... and around split folders
        (
            ["PetImages/train/cats/a.png", "PetImages/train/dogs/b.png", "PetImages/val/cats/c.png"],
            "split_folders",
            {"PetImages/val/cats/c.png": ("cats", "val")},
        ),
        # split folders named as such, holding only bare images: unlabelled splits, not classes
        (
            ["train/a.png", "test/b.png"],
            "split_folders",
            {"train/a.png": (None, "train"), "test/b.png": (None, "test")},
        ),
        # bare folders, some named like splits: no folder holds class folders, so they are classes (issue 34)
        (
            ["train/a.png", "test1/b.png"],
            "class_folders",
            {"train/a.png": ("train", None), "test1/b.png": ("test1", None)},
        ),
    ],
    ids=["named-anyhow", "flat-beside-splits", "wrapper", "wrapper-splits", "bare-splits", "split-named-bare"],
)
def test_layouts_are_recognised_by_structure(tmp_path, files, layout, expected):
    for i, name in enumerate(files):
        _png(tmp_path / name, i)
    source = discover(tmp_path)
    assert source.layout == layout
    got = {r.relpath: (r.label, r.split) for r in source.records}
    assert len(got) == len(files) and {k: got[k] for k in expected} == expected


@pytest.mark.parametrize(
    "files",
    [
        ["animals/cats/a.png", "animals/dogs/b.png", "misc/x.png"],  # one grouping folder beside bare images
        ["cats/indoor/a.png", "dogs/big/b.png", "dogs/small/c.png"],  # nested folders that differ
    ],
    ids=["one-grouping-folder", "differing-children"],
)
def test_ambiguous_layouts_are_refused_with_a_manifest_hint(tmp_path, files):
    for i, name in enumerate(files):
        _png(tmp_path / name, i)
    with pytest.raises(LayoutError, match="cannot tell which folders .* CSV manifest") as info:
        discover(tmp_path)
    assert "\n" not in str(info.value)


def test_when_labels_do_not_matter_every_image_is_listed(tmp_path):
    """Scoring lists a folder with labelled=False: an ambiguous layout is no reason to refuse, nothing is skipped."""
    files = ["animals/cats/a.png", "animals/dogs/b.png", "misc/x.png", "loose.png"]
    for i, name in enumerate(files):
        _png(tmp_path / name, i)
    source = discover(tmp_path, labelled=False)
    assert [(r.relpath, r.label) for r in source.records] == [(f, None) for f in sorted(files)]


def test_a_single_class_warns(tmp_path):
    _png(tmp_path / "cats" / "a.png", 0)
    _png(tmp_path / "cats" / "b.png", 1)
    source = discover(tmp_path)
    assert source.class_names == ["cats"] and any("single class" in w for w in source.warnings)


# -- 3. paths and manifests --------------------------------------------------------------------------------------
def test_long_paths_are_kept_whole_and_failures_keyed_by_full_path(tmp_path, tiny_entry):
    photos = write_photo_folder(tmp_path / "p", per_class=2)
    deep = photos / "china" / "/".join(["d" * 200] * 3)  # > 600 bytes below the class folder
    deep.mkdir(parents=True)
    first = sorted((photos / "china").glob("*.jpg"))[0]
    names = [deep / ("x" * 100 + "_1.jpg"), deep / ("x" * 100 + "_2.jpg")]
    Image.open(first).save(names[0], quality=90)
    Image.open(first).rotate(90).save(names[1], quality=90)
    (deep / ("x" * 100 + "_bad1.jpg")).write_bytes(b"no")
    (deep / ("x" * 100 + "_bad2.jpg")).write_bytes(b"nope")
    out = tmp_path / "c.h5"
    summary = run_extract(photos, out, tiny_entry)
    rel = [n.relative_to(photos).as_posix() for n in names]
    assert len(rel[0].encode()) > 700 and summary.embedded == 6
    assert set(rel) <= set(read_feature_set(out).paths)
    failures = {f["path"] for f in describe(out)["failures"]}
    assert {p for p in failures if "_bad" in p} == {
        rel[0].replace("_1.jpg", "_bad1.jpg"),
        rel[0].replace("_1.jpg", "_bad2.jpg"),
    }


def test_manifests_people_write(tmp_path):
    root = tmp_path / "data"
    _png(root / "cats" / "a.png", 0)
    _png(root / unicodedata.normalize("NFD", "chats/été.png"), 1)  # as macOS writes it
    _png(tmp_path / "outside.png", 2)
    rows = [
        "cats\\a.png,cats",  # Windows separators
        unicodedata.normalize("NFC", "chats/été.png") + ",chats",  # NFC in the manifest
        "../outside.png,cats",
        str(tmp_path / "outside.png") + ",cats",
        "C:\\photos\\x.png,cats",
    ]
    text = "path,label\n" + "\n".join(rows) + "\n"
    for encoding, data in (
        ("utf-8", text.encode()),
        ("utf-16", text.encode("utf-16")),
        ("utf-16-be-bom", b"\xfe\xff" + text.encode("utf-16-be")),
    ):
        (root / "m.csv").write_bytes(data)
        source = discover(root / "m.csv")
        assert [r.relpath for r in source.records] == ["cats/a.png", unicodedata.normalize("NFC", "chats/été.png")], (
            encoding
        )
        assert all(os.path.exists(r.abspath) for r in source.records), encoding
        assert [w for w in source.warnings if "outside" in w] == [
            f"3 manifest paths outside {root} (absolute or with ..) refused: pass --allow-outside-root to read them"
        ]
    # another encoding: read byte for byte, with a one-line hint to save it as UTF-8
    (root / "m.csv").write_bytes("path,label\ncats/a.png,chat noir é\n".encode("cp1252"))
    source = discover(root / "m.csv")
    assert len(source.records) == 1 and any(
        "not UTF-8" in w and "save the manifest as UTF-8" in w for w in source.warnings
    )


def test_each_row_records_its_source(tmp_path, tiny_entry):
    a, b = tmp_path / "a", tmp_path / "b"
    for i, root in enumerate((a, b)):  # the same relative paths, different pictures
        _png(root / "cats" / "x.png", 10 + i)
        _png(root / "dogs" / "y.png", 20 + i)
    out = tmp_path / "c.h5"
    run_extract(a, out, tiny_entry)
    run_extract(b, out, tiny_entry)
    fs = read_feature_set(out)
    assert len(fs) == 4 and sorted(zip(fs.paths, fs.source.tolist())) == [
        ("cats/x.png", 0),
        ("cats/x.png", 1),
        ("dogs/y.png", 0),
        ("dogs/y.png", 1),
    ]
    assert [s["path"] for s in describe(out)["sources"]] == [str(a.resolve()), str(b.resolve())]
    assert "source 1: " + str(b.resolve()) in cli("info", str(out)).stdout


def test_skipped_inputs_are_named_in_the_summary_and_info(tmp_path, tiny_entry):
    photos = write_photo_folder(tmp_path / "p", per_class=2)
    (photos / "china" / "notes.txt").write_text("a note")
    (photos / "stray.jpg").write_bytes(
        (photos / "china").joinpath(next(iter(os.listdir(photos / "china")))).read_bytes()
    )
    out = tmp_path / "c.h5"
    done = cli("extract", str(photos), "--backbone", str(tiny_entry.directory), "--out", str(out), "--device", "cpu")
    assert done.returncode == 0
    assert "skipped china/notes.txt: not an image file (.txt)" in done.stderr
    assert "skipped stray.jpg: outside the class folders" in done.stderr
    info = cli("info", str(out)).stdout
    assert "2 skipped inputs" in info and "china/notes.txt: not an image file (.txt)" in info
    assert {(f["path"], f["stage"]) for f in describe(out)["failures"]} == {
        ("china/notes.txt", "listing"),
        ("stray.jpg", "listing"),
    }


# -- 4. every setting that changes an embedding is part of the feature set's identity -------------------------
def test_resize_mode_is_part_of_the_feature_set_and_travels_to_head_fused_model_and_score(
    tmp_path, tiny_entry, model_store
):
    from tlpipe.pipeline.heads.fit import train_head
    from tlpipe.pipeline.scoring.score import ScoreError, score

    photos = write_photo_folder(tmp_path / "p", per_class=6)
    out = tmp_path / "c.h5"
    squash = extract(photos, out, model=tiny_entry.key, store=model_store, device="cpu")
    crop = extract(photos, out, model=tiny_entry.key, store=model_store, device="cpu", resize="crop")
    assert crop.embedded == 12 and crop.cached == 0 and crop.key != squash.key  # before: all "already cached"
    sets = describe(out)["feature_sets"]
    assert {fs["resize"] for fs in sets.values()} == {"squash", "crop"}
    fs = read_feature_set(out, crop.key)
    assert fs.resize == "crop" and fs.metadata["resize"] == "crop"
    head = tmp_path / "head.joblib"
    train_head(out, "logreg", head, features=crop.key)
    sidecar = json.loads((tmp_path / "head.joblib.json").read_text())
    assert sidecar["feature_set"]["resize"] == "crop"
    # score takes the mode from the head; an explicit one that disagrees is refused
    scored = score(photos, tmp_path / "s.csv", head=head, store=model_store, device="cpu", cache=out)
    assert scored.scored + scored.reused == 12
    with pytest.raises(ScoreError, match="--resize squash disagrees .* made with --resize crop"):
        score(photos, tmp_path / "t.csv", head=head, store=model_store, resize="squash")
    pytest.importorskip("skl2onnx")
    from tlpipe.pipeline.scoring.fuse import export_model

    record = export_model(head, tmp_path / "clf.onnx", store=model_store)
    assert record["backbone"]["resize"] == "crop"
    with pytest.raises(ScoreError, match="disagrees"):
        score(photos, tmp_path / "u.csv", model=tmp_path / "clf.onnx", resize="squash")


def test_the_sklearn_transformer_keeps_squash_and_crop_apart(tmp_path, tiny_entry):
    from tlpipe.features.transformer import EmbeddingTransformer

    paths = []
    for i in range(4):  # not square, so squash and crop differ
        y, x = np.mgrid[0:60, 0:150]
        arr = np.stack([(x * (i + 1)) % 256, (y * 4) % 256, (x + y * i) % 256], -1).astype(np.uint8)
        paths.append(tmp_path / f"wide{i}.png")
        Image.fromarray(arr).save(paths[-1])
    cache = tmp_path / "c.h5"
    squash = EmbeddingTransformer(model=str(tiny_entry.directory), cache=cache, device="cpu").fit_transform(paths)
    crop = EmbeddingTransformer(
        model=str(tiny_entry.directory), cache=cache, device="cpu", resize="crop"
    ).fit_transform(paths)
    sets = describe(cache)["feature_sets"]
    assert sorted(fs["resize"] for fs in sets.values()) == ["crop", "squash"]
    # the key grammar: <model key>[-resize-<mode>][-filter-<filter>] (bilinear is the default filter)
    keys = (tiny_entry.key + "-filter-bilinear", tiny_entry.key + "-resize-crop-filter-bilinear")
    for key, got in zip(keys, (squash, crop)):
        fs = read_feature_set(cache, key)
        order = [list(fs.sha256).index(sha(p)) for p in paths]
        np.testing.assert_array_equal(fs.X[order], got)
    assert not np.array_equal(squash, crop)


# -- 5. bad options fail before anything is written ------------------------------------------------------------
@pytest.mark.parametrize(
    "option",
    [
        ("--resize", "Crop"),
        ("--dtype", "float64"),
        ("--device", "gpu"),
        ("--precision", "int4"),
        ("--pooling", "mean"),
        ("--resize-filter", "Bilinear"),
    ],
)
def test_bad_option_values_fail_before_a_cache_is_created(tmp_path, tiny_entry, option):
    photos = write_photo_folder(tmp_path / "p", per_class=1)
    out = tmp_path / "c.h5"
    done = cli("extract", str(photos), "--backbone", str(tiny_entry.directory), "--out", str(out), *option)
    assert done.returncode == 2 and option[1] in done.stderr and not out.exists()
    assert not list(tmp_path.glob("*.h5*"))
    helptext = cli("extract", "--help").stdout
    assert "squash|crop" in helptext and "float32|float16" in helptext and "fp32|int8|fp16" in helptext


def test_the_library_validates_options_before_creating_the_cache(tmp_path, tiny_entry):
    photos = write_photo_folder(tmp_path / "p", per_class=1)
    out = tmp_path / "c.h5"
    for bad in ({"resize": "Crop"}, {"dtype": "float64"}, {"device": "gpu"}, {"precision": "int4"}):
        with pytest.raises(ValueError, match="must be one of"):
            run_extract(photos, out, tiny_entry, **bad)
        assert not out.exists()
    assert run_extract(photos, out, tiny_entry, dtype="float16").embedded == 2  # nothing left behind to block it


# -- 6. another HDF5 program holding the cache open for writing ----------------------------------------------
HOLD = """
import sys, time, h5py
f = h5py.File(sys.argv[1], "a")
print("open", flush=True)
sys.stdin.readline()
f.close()
"""


def test_a_cache_held_open_for_writing_by_another_program_is_refused(tmp_path, tiny_entry):
    photos = write_photo_folder(tmp_path / "p", per_class=2)
    out = tmp_path / "c.h5"
    run_extract(photos, out, tiny_entry)
    before = out.read_bytes()
    more = write_photo_folder(tmp_path / "more", per_class=2, seed=1)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(CacheLockedError, match="open for writing in another program"):
            run_extract(more, out, tiny_entry)
        done = cli("extract", str(more), "--backbone", str(tiny_entry.directory), "--out", str(out), "-q")
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "another program" in done.stderr
    finally:
        holder.communicate("\n", timeout=30)
    assert out.read_bytes() == before
    assert run_extract(more, out, tiny_entry).embedded == 4  # released: appends as usual


def test_another_program_cannot_open_the_cache_for_writing_while_extract_writes(tmp_path, tiny_entry):
    from tlpipe.features.cache import CacheWriter

    photos = write_photo_folder(tmp_path / "p", per_class=1)
    out = tmp_path / "c.h5"
    run_extract(photos, out, tiny_entry)
    probe = (
        "import sys, h5py\n"
        "try:\n    h5py.File(sys.argv[1], 'a').close(); print('opened')\nexcept OSError as e:\n    print('refused')\n"
        "with h5py.File(sys.argv[1], 'r') as f: print(int(f['images'].attrs['count']))\n"
    )
    with CacheWriter(out):
        got = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True, env=ENV)
    assert got.stdout.split() == ["refused", "2"]  # a plain h5py reader still reads


# -- 7. the docs' plain-h5py example (docs/guide/extract.md) --------------------------------------------------
def test_the_readme_h5py_example_runs_on_a_cache_with_non_ascii_paths(tmp_path, tiny_entry):
    root = tmp_path / "data"
    names = ["chats/été.png", "chiens/犬.png", "chiens/Ωmega.png"]
    for i, name in enumerate(names):
        _png(root / name, i)
    out = tmp_path / "cache.h5"
    run_extract(root, out, tiny_entry)
    guide = (ROOT / "docs" / "guide" / "extract.md").read_text()  # the cache's schema lives there
    block = next(b for b in re.findall(r"```python\n(.*?)```", guide, re.S) if 'h5py.File("cache.h5"' in b)
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(
            compile(block, "docs/guide/extract.md", "exec"), namespace
        )  # before: .astype(str) raised UnicodeDecodeError
    finally:
        os.chdir(cwd)
    assert sorted(namespace["paths"]) == sorted(names)
    assert [namespace["class_names"][i] for i in namespace["labels"]] == [n.split("/")[0] for n in namespace["paths"]]
    assert namespace["X"].shape[0] == 3 and namespace["resize"] == "squash"
    with h5py.File(out, "r") as f:
        assert f.attrs["tlpipe_cache_version"] == 2


# -- 1. check: embeddings of every format x orientation x mode against the upright 8-bit RGB original ---------
def test_embeddings_of_every_format_orientation_and_mode_match_the_upright_original(tiny_entry):
    """Cosine >= 0.99 to the upright original's embedding, or refused with a reason (a random-init backbone: the
    check compares pixels through a real network; the pixel tests in test_images.py are the finer check)."""
    from tests.features.test_images import content_corpus, exif_containers, mode_corpus, oriented, upright
    from tlpipe.backbones.runtime import OnnxEmbedder
    from tlpipe.features.images import ImageError, decode_image

    embed = OnnxEmbedder(tiny_entry.model_path, device="cpu")
    size = tiny_entry.input_size
    buffer = __import__("io").BytesIO()
    upright().save(buffer, "PNG")
    corpus = {f"{fmt}-orientation-{o}": oriented(fmt, o) for fmt in exif_containers() for o in range(1, 9)}
    # formats whose corpus file is colour (GIF, PCX, XBM, MSP hold grey or 1-bit pictures there)
    corpus |= {
        f"format-{fmt}": data
        for fmt, data in content_corpus().items()
        if fmt not in ("ICO", "GIF", "PCX", "XBM", "MSP")
    }
    grey = {name: data for name, (data, expected) in mode_corpus().items()}
    names, pixels, refused = [], [], {}
    for name, data in corpus.items():
        try:
            pixels.append(decode_image(data, size)[0])
            names.append(name)
        except ImageError as exc:
            refused[name] = exc.reason
    reference = embed(decode_image(buffer.getvalue(), size)[0][None])[0]
    got = embed(np.stack(pixels))
    cosine = got @ reference / (np.linalg.norm(got, axis=1) * np.linalg.norm(reference))
    assert not refused and dict(zip(names, cosine.round(4))) == pytest.approx({n: 1.0 for n in names}, abs=0.01), {
        n: c for n, c in zip(names, cosine) if c < 0.99
    }
    # the check discriminates: the upright picture rotated once more is far below the bar
    wrong = embed(
        np.asarray(Image.fromarray(decode_image(buffer.getvalue(), size)[0]).transpose(Image.Transpose.ROTATE_90))[None]
    )[0]
    assert wrong @ reference / (np.linalg.norm(wrong) * np.linalg.norm(reference)) < 0.99
    # modes: each file against its own expected 8-bit picture
    for name, data in grey.items():
        expected = mode_corpus()[name][1]
        want = embed(np.asarray(Image.fromarray(expected).resize((size, size), Image.Resampling.BILINEAR))[None])[0]
        have = embed(decode_image(data, size)[0][None])[0]
        assert have @ want / (np.linalg.norm(have) * np.linalg.norm(want)) >= 0.99, name
