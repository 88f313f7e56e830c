"""The cache in other tools (issue 16, item 4): pandas, Parquet, NumPy and HDF5 dimension labels."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from tests.conftest import ROOT
from tlpipe.features.cache import CacheWriter, ImageRow, export_cache, read_feature_set, to_pandas

KEY = "tiny-8-avg-test"


@pytest.fixture
def cache(tmp_path):
    """A real cache: 5 images (one unlabelled, one without a split) in one feature set of dimension 3."""
    path = tmp_path / "c.h5"
    labels, splits = ["cat", "dog", None, "cat", "dog"], ["train", "train", "test", "", "test"]
    X = np.arange(15, dtype=np.float32).reshape(5, 3)
    with CacheWriter(path) as writer:
        source = writer.note_source("/data/photos")
        rows = [
            ImageRow(f"{label or 'x'}/{i}.jpg", f"{i:064x}", label, split or None, 10, 20, source)
            for i, (label, split) in enumerate(zip(labels, splits))
        ]
        writer.ensure_feature_set(KEY, 3, metadata={"backbone": "tiny"})
        writer.add(KEY, rows, X)
    return path


def test_to_pandas(cache):
    pytest.importorskip("pandas")
    frame = to_pandas(cache, features="tiny")
    assert list(frame.columns) == ["path", "source", "label", "split", "sha256", "embedding"]
    assert frame["source"].tolist() == ["/data/photos"] * 5
    assert frame["path"].tolist() == ["cat/0.jpg", "dog/1.jpg", "x/2.jpg", "cat/3.jpg", "dog/4.jpg"]
    pd = pytest.importorskip("pandas")
    values = lambda column: [None if pd.isna(v) else v for v in frame[column]]  # noqa: E731 - missing: NaN / NA
    assert values("label") == ["cat", "dog", None, "cat", "dog"]
    assert values("split") == ["train", "train", "test", None, "test"]
    assert frame["sha256"][4] == f"{4:064x}"
    assert np.array_equal(np.stack(frame["embedding"]), np.arange(15, dtype=np.float32).reshape(5, 3))
    assert frame.attrs["feature_set"] == KEY and frame.attrs["class_names"] == ["cat", "dog"]


def test_export_parquet_reads_back_in_pandas(cache, tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    done = export_cache(cache, tmp_path / "e.parquet")
    assert done == {"out": str(tmp_path / "e.parquet"), "format": "parquet", "feature_set": KEY, "rows": 5, "dim": 3}
    back, frame = pd.read_parquet(tmp_path / "e.parquet"), to_pandas(cache)
    assert back.drop(columns="embedding").equals(frame.drop(columns="embedding"))
    assert np.array_equal(np.stack(back["embedding"]), np.stack(frame["embedding"]))


def test_export_npz_and_the_cli(cache, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tlpipe.pipeline.cli",
            "export-cache",
            str(cache),
            "--out",
            str(tmp_path / "e.npz"),
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0 and json.loads(proc.stdout)["rows"] == 5, proc.stderr
    with np.load(tmp_path / "e.npz") as z:  # no allow_pickle needed
        fs = read_feature_set(cache)
        assert np.array_equal(z["embeddings"], fs.X) and z["label"].tolist() == [0, 1, -1, 0, 1]
        assert (
            z["class_names"].tolist() == ["cat", "dog"] and z["path"][2] == "x/2.jpg" and str(z["feature_set"]) == KEY
        )
    bad = subprocess.run(
        [sys.executable, "-m", "tlpipe.pipeline.cli", "export-cache", str(cache), "--out", str(tmp_path / "e.csv")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: export format must be one of parquet, npz")


def test_hdf5_dimension_labels(cache):
    with h5py.File(cache, "r") as f:
        assert [d.label for d in f["images/sha256"].dims] == ["image"]
        assert [d.label for d in f["images/path_span"].dims] == ["image", "start_end"]
        assert [d.label for d in f["images/path_utf8"].dims] == ["byte"]
        assert [d.label for d in f["images/size"].dims] == ["image", "width_height"]
        assert [d.label for d in f["failures/reason"].dims] == ["failure"]
        assert [d.label for d in f[f"features/{KEY}/embeddings"].dims] == ["row", "dimension"]
        assert [d.label for d in f[f"features/{KEY}/image_row"].dims] == ["row"]
