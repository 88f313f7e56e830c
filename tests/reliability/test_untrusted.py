"""Untrusted files, end to end: a head is unpickled only when its bytes match its sidecar (or with trust), manifest
paths leaving the data root are refused (and reported) unless allowed, and a tampered model-store entry is refused."""

import os
import pickle
import shutil
from pathlib import Path

import pytest

from tests.reliability.conftest import encoded, noise, one_line_error, parse_output, tlpipe
from tlpipe.backbones.store import ModelStore, StoreError
from tlpipe.features.cache import describe, read_feature_set
from tlpipe.features.extract import extract
from tlpipe.pipeline.heads.persistence import HeadError
from tlpipe.pipeline.scoring.score import score


class Payload:
    """Unpickling this creates a folder: proof that code from the file ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.mkdir, (self.marker,)


@pytest.fixture
def tampered_head(tmp_path, head) -> tuple[Path, Path]:
    """The trained head's sidecar next to a joblib file replaced by a payload that runs code when unpickled."""
    path = tmp_path / "head.joblib"
    shutil.copy(f"{head.path}.json", f"{path}.json")
    marker = tmp_path / "code-ran"
    path.write_bytes(pickle.dumps(Payload(str(marker))))
    return path, marker


def test_a_head_that_does_not_match_its_sidecar_is_never_unpickled(tmp_path, head, tampered_head):
    path, marker = tampered_head
    with pytest.raises(HeadError, match="does not match its sidecar"):
        score(head.photos, tmp_path / "a.csv", head=path, store=head.store, device="cpu")
    proc = tlpipe("score", head.photos, "--out", tmp_path / "b.csv", "--head", path, "--store", head.store.root)
    assert "does not match its sidecar" in one_line_error(proc) and "--trust" in proc.stderr
    os.remove(f"{path}.json")
    with pytest.raises(HeadError, match="is missing: without it .* cannot be verified"):
        score(head.photos, tmp_path / "c.csv", head=path, store=head.store, device="cpu")
    assert not marker.exists()
    assert not any((tmp_path / name).exists() for name in ("a.csv", "b.csv", "c.csv"))
    pickle.loads(path.read_bytes())  # the payload is live: loaded blindly, it runs
    assert marker.is_dir()


def test_trust_loads_a_head_whose_checksum_does_not_match(tmp_path, head):
    path = tmp_path / "head.joblib"
    shutil.copy(f"{head.path}.json", f"{path}.json")
    path.write_bytes(head.path.read_bytes() + b"\0")  # other bytes, same estimator
    proc = tlpipe("score", head.photos, "--out", tmp_path / "refused.csv", "--head", path, "--store", head.store.root)
    assert "does not match its sidecar" in one_line_error(proc)
    trusted = tlpipe(
        "score",
        head.photos,
        "--out",
        tmp_path / "scores.csv",
        "--head",
        path,
        "--store",
        head.store.root,
        "--device",
        "cpu",
        "--trust",
        "--quiet",
    )
    assert trusted.returncode == 0, trusted.stderr
    assert len(parse_output(tmp_path / "scores.csv")) == 12


def test_manifest_paths_outside_the_data_root_are_refused_unless_allowed(tmp_path, tiny_entry, head):
    data, outside = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir(), outside.mkdir()
    (data / "inside.jpg").write_bytes(encoded(noise(40), "JPEG"))
    (outside / "photo.jpg").write_bytes(encoded(noise(41), "JPEG"))
    escaping = [
        "../elsewhere/photo.jpg",
        str(outside / "photo.jpg"),
        "../../../../../../etc/passwd",
        "/etc/passwd",
        "sub/../../elsewhere/photo.jpg",
    ]
    manifest = data / "manifest.csv"
    manifest.write_text("path,label\ninside.jpg,a\n" + "".join(f"{p},b\n" for p in escaping))
    model = str(tiny_entry.directory)
    summary = extract(manifest, tmp_path / "refused.h5", model=model)
    refused = {p: "path escapes the data root (use --allow-outside-root / allow_outside_root)" for p in escaping}
    assert summary.embedded == 1 and dict(summary.skipped) == refused
    assert {f["path"]: f["reason"] for f in describe(tmp_path / "refused.h5")["failures"]} == refused
    scored = score(manifest, tmp_path / "refused.csv", head=head.path, store=head.store, device="cpu")
    assert (scored.total, scored.scored) == (1, 1) and dict(scored.skipped) == refused
    assert [r["path"] for r in parse_output(tmp_path / "refused.csv")] == ["inside.jpg"]

    proc = tlpipe("extract", manifest, "--out", tmp_path / "allowed.h5", "--backbone", model, "--allow-outside-root")
    assert proc.returncode == 0, proc.stderr
    fs = read_feature_set(tmp_path / "allowed.h5")
    assert len(fs) == 2 and "inside.jpg" in fs.paths  # the outside photo, listed three ways, is one image
    reasons = {f["path"]: f["reason"] for f in describe(tmp_path / "allowed.h5")["failures"]}
    assert reasons == {
        "../../../../../../etc/passwd": "not an image file (no extension)",
        "/etc/passwd": "not an image file (no extension)",
        "../elsewhere/photo.jpg": "listed again on line 7",
    }
    allowed = score(
        manifest, tmp_path / "allowed.csv", head=head.path, store=head.store, device="cpu", allow_outside_root=True
    )
    assert (allowed.scored, allowed.failed) == (3, 0)


def test_a_tampered_model_store_entry_is_refused(tmp_path, tiny_entry, head, photo_folder):
    store = ModelStore(tmp_path / "store")
    entry = store.root / tiny_entry.key
    shutil.copytree(tiny_entry.directory, entry)
    model = entry / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of the weights
    model.write_bytes(bytes(data))
    corrupt = f"model store entry {entry} is corrupt"
    with pytest.raises(StoreError, match=corrupt):
        extract(photo_folder, tmp_path / "a.h5", model=tiny_entry.key, store=store)
    with pytest.raises(StoreError, match=corrupt):
        score(photo_folder, tmp_path / "a.csv", head=head.path, store=store, device="cpu")
    proc = tlpipe("extract", photo_folder, "--out", tmp_path / "b.h5", "--backbone", entry)
    assert corrupt in one_line_error(proc)
    proc = tlpipe("score", photo_folder, "--out", tmp_path / "b.csv", "--head", head.path, "--store", store.root)
    assert corrupt in one_line_error(proc)
    assert not any((tmp_path / name).exists() for name in ("a.h5", "a.csv", "b.h5", "b.csv"))
