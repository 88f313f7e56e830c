import io
import os
import threading
from pathlib import Path

import pytest
from PIL import Image

from tlpipe.features.sources import ImageRecord, discover, normalize_split

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
CATS_VS_DOGS = SHARED / "datasets" / "cats_vs_dogs"

_buf = io.BytesIO()
Image.new("RGB", (4, 4), (200, 0, 0)).save(_buf, "PNG")
PNG = _buf.getvalue()


def make(root: Path, *relpaths: str) -> None:
    for rel in relpaths:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(PNG if Path(rel).suffix in {".png", ".jpg", ".gif"} else b"x,y\n")


def rels(source):
    return [r.relpath for r in source.records]


def test_class_folders(tmp_path):
    make(
        tmp_path,
        "dogs/d1.jpg",
        "cats/b.png",
        "cats/a.jpg",
        "cats/deep/c.gif",
        "cats/notes.txt",
        "stray.jpg",
        "manifest.csv",
        "summary.json",
        ".DS_Store",
        ".cache/x.jpg",
        "cats/.x.jpg",
        "empty/readme",
    )
    src = discover(tmp_path)
    assert src.layout == "class_folders"
    assert src.root == str(tmp_path)
    assert rels(src) == ["cats/a.jpg", "cats/b.png", "cats/deep/c.gif", "dogs/d1.jpg"]
    assert [r.label for r in src.records] == ["cats", "cats", "cats", "dogs"]
    assert {r.split for r in src.records} == {None}
    assert src.records[0].abspath == str(tmp_path / "cats" / "a.jpg")
    assert src.class_names == ["cats", "dogs"]
    assert src.skipped == [
        ("cats/notes.txt", "not an image file (.txt)"),
        ("empty/readme", "not an image file (no extension)"),
        ("manifest.csv", "not an image file (.csv)"),
        ("stray.jpg", "outside the class folders"),
        ("summary.json", "not an image file (.json)"),
    ]
    assert [src.labels_index(r) for r in src.records] == [0, 0, 0, 1]
    assert src.labels_index(ImageRecord("x.jpg", "/x.jpg", None, None)) == -1


def test_split_folders(tmp_path):
    make(
        tmp_path,
        "train/cats/a.jpg",
        "train/dogs/b.jpg",
        "val/cats/c.jpg",
        "test/u1.jpg",
        "test/u2.jpg",
        "loose.jpg",
        "README.md",
    )
    src = discover(tmp_path)
    assert src.layout == "split_folders"
    got = [(r.relpath, r.label, r.split) for r in src.records]
    assert got == [
        ("test/u1.jpg", None, "test"),
        ("test/u2.jpg", None, "test"),
        ("train/cats/a.jpg", "cats", "train"),
        ("train/dogs/b.jpg", "dogs", "train"),
        ("val/cats/c.jpg", "cats", "val"),
    ]
    assert src.class_names == ["cats", "dogs"]
    assert ("loose.jpg", "outside the split folders") in src.skipped
    assert ("README.md", "not an image file (.md)") in src.skipped


def test_split_names_are_normalised(tmp_path):
    make(tmp_path, "Training_Set/cats/a.jpg", "test_set/cats/b.jpg", "dev/dogs/c.jpg", "test_set/x.jpg")
    src = discover(tmp_path)
    assert src.layout == "split_folders"
    assert [(r.relpath, r.split) for r in src.records] == [
        ("Training_Set/cats/a.jpg", "train"),
        ("dev/dogs/c.jpg", "val"),
        ("test_set/cats/b.jpg", "test"),
    ]
    assert src.skipped == [("test_set/x.jpg", "outside the class folders")]
    assert [normalize_split(s) for s in (" TrainSet ", "validation", "testing", "holdout")] == [
        "train",
        "val",
        "test",
        "holdout",
    ]


def test_flat_folder(tmp_path):
    make(tmp_path, "b.jpg", "a.png", "docs/readme.txt", "notes.csv")
    src = discover(tmp_path)
    assert src.layout == "flat"
    assert rels(src) == ["a.png", "b.jpg"]
    assert src.class_names == [] and {r.label for r in src.records} == {None}
    assert [s[0] for s in src.skipped] == ["docs/readme.txt", "notes.csv"]


def test_empty_folder(tmp_path):
    src = discover(tmp_path)
    assert (src.layout, src.records, src.class_names, src.skipped) == ("flat", [], [], [])


def test_manifest(tmp_path):
    (tmp_path / "manifest.csv").write_text(
        "file,cls,split,src_path,blob,bytes,width,height,format,mode,sha256\n"
        "cats/test_set_cat.4001.jpg,cats,test_set,dataset/test_set/cats/cat.4001.jpg,2cb8,92704,"
        "498,415,JPEG,RGB,a350\n"
        "dogs/d.jpg,dogs,training_set,x,y,1,2,3,JPEG,RGB,z\n"
        "unlabelled.png,,,,,,,,,,\n"
        "\n"
        "notes/readme.txt,cats,train,,,,,,,,\n"
        ",cats,train,,,,,,,,\n"
        "./cats/../dogs/d.jpg,dogs,train,,,,,,,,\n"
    )
    src = discover(tmp_path / "manifest.csv")
    assert src.layout == "manifest" and src.root == str(tmp_path)
    assert [(r.relpath, r.label, r.split) for r in src.records] == [
        ("cats/test_set_cat.4001.jpg", "cats", "test"),
        ("dogs/d.jpg", "dogs", "train"),
        ("unlabelled.png", None, None),
    ]
    assert src.records[0].abspath == str(tmp_path / "cats" / "test_set_cat.4001.jpg")
    assert src.class_names == ["cats", "dogs"]
    assert src.skipped == [
        ("notes/readme.txt", "not an image file (.txt)"),
        ("line 7", "empty path"),
        ("dogs/d.jpg", "listed again on line 8"),
    ]


def test_manifest_paths_outside_the_root(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    inside = data / "in" / "a.jpg"
    (data / "m.csv").write_text(f"Path,Label\n../outside.jpg,x\n{tmp_path / 'abs.jpg'},y\n{inside},z\n")
    src = discover(data / "m.csv")
    assert [(r.relpath, r.abspath) for r in src.records] == [("in/a.jpg", str(inside))]
    reason = "path escapes the data root (use --allow-outside-root / allow_outside_root)"
    assert src.skipped == [("../outside.jpg", reason), (str(tmp_path / "abs.jpg"), reason)]

    allowed = discover(data / "m.csv", allow_outside_root=True)
    assert [(r.relpath, r.abspath, r.label) for r in allowed.records] == [
        ("../outside.jpg", str(tmp_path / "outside.jpg"), "x"),
        (str(tmp_path / "abs.jpg"), str(tmp_path / "abs.jpg"), "y"),
        ("in/a.jpg", str(inside), "z"),
    ]
    assert allowed.skipped == []


def test_manifest_without_path_column(tmp_path):
    (tmp_path / "m.csv").write_text("name,label\na.jpg,cat\n")
    with pytest.raises(ValueError, match="path, file, filename, image, filepath"):
        discover(tmp_path / "m.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="header"):
        discover(tmp_path / "empty.csv")


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="image source not found"):
        discover(tmp_path / "nope")
    (tmp_path / "a.json").write_text("{}")
    with pytest.raises(ValueError, match="neither a directory nor a .csv"):
        discover(tmp_path / "a.json")


def test_symlinks_followed_once(tmp_path):
    make(tmp_path, "cats/a.jpg", "dogs/b.jpg")
    os.symlink(tmp_path, tmp_path / "cats" / "loop")
    os.symlink(".", tmp_path / "dogs" / "self")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "cats" / "broken.jpg")
    os.symlink(tmp_path / "cats", tmp_path / "kittens")
    result = []
    worker = threading.Thread(target=lambda: result.append(discover(tmp_path)), daemon=True)
    worker.start()
    worker.join(10)
    assert result, "discover did not finish"
    src = result[0]
    assert rels(src) == ["cats/a.jpg", "dogs/b.jpg"]
    assert ("cats/broken.jpg", "broken symbolic link") in src.skipped
    looped = sorted(rel for rel, reason in src.skipped if "symlink loop" in reason)
    assert looped == ["cats/loop", "dogs/self"]
    assert dict(src.skipped)["kittens"].startswith("alias of cats")  # not a loop (issue 34): the real name wins


def test_deterministic_order(tmp_path):
    names = ["z/9.jpg", "a/b.jpg", "M/a.jpg", "a/A.jpg", "z/10.jpg", "a/sub/x.jpg"]
    make(tmp_path, *names)
    first, second = discover(tmp_path), discover(tmp_path)
    assert first == second
    assert rels(first) == sorted(names)


@pytest.mark.shared
def test_shared_cats_vs_dogs_folder():
    if not CATS_VS_DOGS.is_dir():
        pytest.skip("../shared not present")
    src = discover(CATS_VS_DOGS)
    assert src.layout == "class_folders"
    assert len(src.records) == 1000
    assert src.class_names == ["cats", "dogs"]
    assert {rel for rel, _ in src.skipped} == {"manifest.csv", "summary.json"}


@pytest.mark.shared
def test_shared_cats_vs_dogs_manifest():
    if not CATS_VS_DOGS.is_dir():
        pytest.skip("../shared not present")
    src = discover(CATS_VS_DOGS / "manifest.csv")
    assert len(src.records) == 1000
    assert {r.split for r in src.records} == {"train", "test"}
    assert src.class_names == ["cats", "dogs"]
    assert src.skipped == []
