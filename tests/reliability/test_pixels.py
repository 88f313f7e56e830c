"""Issue 34: damaged pixels refused (kind 5), colour profiles rendered to sRGB (kind 10), huge files and
decompression bombs refused before they are read whole, in bounded memory (kind 13) — through ``extract`` and
``score`` with a real (tiny) backbone, and in a second process under an address-space limit."""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import subprocess
import sys
import zlib

import h5py
import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, write_photo_folder
from tests.features.test_images import (
    MP4_HEADER,
    damaged_jpegs,
    display_p3_profile,
    encode,
    saturated_photo,
    sparse,
    srgb_reference,
    srgb_rendering,
    tiff_header,
)
from tests.reliability.conftest import ENV, png_chunk
from tlpipe.features.cache import describe, read_feature_set
from tlpipe.features.extract import extract
from tlpipe.features.images import resize_image
from tlpipe.pipeline.scoring.score import score

DAMAGED = ("baseline-half-then-eoi", "progressive-zeroed-gap", "progressive-last-scans-missing", "grey-half-then-eoi")


def test_damaged_jpegs_are_failures_in_extract_and_score(tmp_path, tiny_entry, head):
    # Before: each of these was embedded (and scored) as a good image, its missing part flat grey.
    photos = write_photo_folder(tmp_path / "photos", per_class=2)
    jpegs = damaged_jpegs()
    for name in DAMAGED:
        (photos / "china" / f"{name}.jpg").write_bytes(jpegs[name])
    cache = tmp_path / "cache.h5"
    summary = extract(photos, cache, model=str(tiny_entry.directory), batch_size=2)
    failures = dict(summary.failures)
    assert sorted(failures) == sorted(f"china/{name}.jpg" for name in DAMAGED)
    assert all(reason.startswith("damaged image data: ") for reason in failures.values()), failures
    assert {f["path"] for f in describe(cache)["failures"]} == set(failures)
    assert len(read_feature_set(cache)) == 4
    out = tmp_path / "scores.jsonl"
    scored = score(photos, out, head=head.path, store=head.store, device="cpu", batch_size=2)
    assert (scored.scored, scored.failed) == (4, len(DAMAGED))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    errors = {r["path"]: r["error"] for r in rows if r["error"]}
    assert errors.keys() == failures.keys() and all(e.startswith("damaged image data") for e in errors.values())


def test_a_wide_gamut_photo_is_embedded_as_its_srgb_rendering(tmp_path, tiny_entry):
    # Before: the P3 files reached the model as raw code values, embedded apart from what they show.
    from tlpipe.backbones.runtime import OnnxEmbedder

    folder = tmp_path / "photos" / "colour"
    folder.mkdir(parents=True)
    files = {
        # under twice the input size: no DCT-domain scaling, so the reference decodes the same pixels
        "p3.jpg": encode(saturated_photo(120, 90), "JPEG", quality=95, icc_profile=display_p3_profile()),
        "p3.png": encode(saturated_photo(120, 90), "PNG", icc_profile=display_p3_profile()),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    cache = tmp_path / "cache.h5"
    extract(tmp_path / "photos", cache, model=str(tiny_entry.directory), batch_size=2)
    fs = read_feature_set(cache)
    embedded = dict(zip(fs.paths, fs.X))
    embed = OnnxEmbedder(tiny_entry.model_path, device="cpu")
    size = tiny_entry.input_size
    for name, data in files.items():
        with Image.open(io.BytesIO(data)) as im:
            raw = np.asarray(resize_image(im.convert("RGB"), size))
        rendered, ignored = embed(np.stack([srgb_reference(data, size, "bilinear"), raw]))
        scale = np.abs(rendered).max()
        assert np.abs(embedded[f"colour/{name}"] - rendered).max() <= 1e-3 * scale, name
        if name.endswith(".png"):  # (the random-init backbone hardly moves for some inputs: one is enough)
            assert np.abs(ignored - rendered).max() > 1e-2 * scale
    (key,) = describe(cache)["feature_sets"]
    assert describe(cache)["feature_sets"][key]["colour"] == "srgb-icc"
    assert fs.metadata["colour"] == "srgb-icc" and fs.colour == "srgb-icc"


def _make_legacy(cache, key: str) -> None:
    """Strip what colour management records, as in a cache made before it."""
    with h5py.File(cache, "a") as f:
        group = f["features"][key]
        del group.attrs["colour"]
        meta = json.loads(group.attrs["metadata"])
        meta.pop("colour")
        group.attrs["metadata"] = json.dumps(meta, sort_keys=True)


def test_an_append_onto_a_feature_set_made_before_colour_management_warns_by_name(tmp_path, tiny_entry, caplog):
    photos = write_photo_folder(tmp_path / "photos", per_class=2)
    cache = tmp_path / "cache.h5"
    summary = extract(photos, cache, model=str(tiny_entry.directory), batch_size=2)
    _make_legacy(cache, summary.key)
    assert describe(cache)["feature_sets"][summary.key]["colour"] == "none"
    (photos / "china" / "new.png").write_bytes(encode(saturated_photo(), "PNG", icc_profile=display_p3_profile()))
    with caplog.at_level(logging.WARNING):
        again = extract(photos, cache, model=str(tiny_entry.directory), batch_size=2)
    assert again.embedded == 1
    warned = [r.getMessage() for r in caplog.records if "colour profile" in r.getMessage()]
    assert len(warned) == 1 and summary.key in warned[0] and "new cache" in warned[0], warned
    assert any(summary.key in w and "colour" in w for w in again.warnings)
    assert describe(cache)["feature_sets"][summary.key]["colour"] == "mixed"


def bomb_png(width: int, height: int) -> bytes:
    """A real decompression bomb: a complete, valid 1-bit PNG of ``width`` x ``height`` zeros (kilobytes on disk)."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b"")


LIMITED_EXTRACT = """
import json, resource, sys
from tlpipe.features.extract import extract
import onnxruntime  # loaded before the limit: only what the run itself maps counts against it
with open("/proc/self/status") as fh:
    mapped = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
limit = mapped + int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
summary = extract(sys.argv[1], sys.argv[2], model=sys.argv[4], batch_size=2, workers=3)
print(json.dumps({"embedded": summary.embedded, "failures": dict(summary.failures)}))
"""


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_huge_files_and_bombs_are_failure_records_within_a_memory_limit(tmp_path, tiny_entry):
    # Before: every file was read whole first: the sparse multi-GB ones raised MemoryError (a traceback).
    photos = write_photo_folder(tmp_path / "photos", per_class=2)
    expected = {
        "china/slide.tif": (tiff_header(150_000, 100_000), 6 << 30, "file too large"),  # whole-slide scan
        "china/clip.jpg": (MP4_HEADER, 3 << 30, "file too large"),  # a renamed video
        "flower/movie.jpeg": (MP4_HEADER, 400 << 20, "not an image"),
        "flower/scan.tif": (tiff_header(30_000, 30_000), 400 << 20, "image too large"),
    }
    for relpath, (head_bytes, size, _) in expected.items():
        sparse(photos / relpath, head_bytes, size)
    (photos / "flower" / "bomb.png").write_bytes(bomb_png(20_000, 20_000))  # 400 M pixels: over twice Pillow's limit
    (photos / "flower" / "bomb2.png").write_bytes(bomb_png(10_000, 10_000))  # over tlpipe's limit, under 2x
    env = {**ENV, "MALLOC_ARENA_MAX": "2"}  # glibc's per-thread arenas would reserve address space we do not use
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            LIMITED_EXTRACT,
            *map(str, (photos, tmp_path / "cache.h5", 1 << 30, tiny_entry.directory)),
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["embedded"] == 4
    reasons = {path: reason for path, (_, _, reason) in expected.items()}
    reasons |= {"flower/bomb.png": "image too large", "flower/bomb2.png": "image too large"}
    assert result["failures"].keys() == reasons.keys()
    for path, reason in reasons.items():
        assert result["failures"][path].startswith(reason), (path, result["failures"][path])
    assert os.path.getsize(photos / "china" / "slide.tif") == 6 << 30  # sparse: no disk was spent


def test_the_compare_gallery_shows_the_srgb_rendering(tmp_path):
    from types import SimpleNamespace

    from tlpipe.pipeline.reports.compare import _gallery

    flat = Image.new("RGB", (200, 200), (40, 180, 90))
    data = encode(flat, "PNG", icc_profile=display_p3_profile())
    (tmp_path / "p3.png").write_bytes(data)
    (tmp_path / "bomb.png").write_bytes(bomb_png(20_000, 20_000))  # before: DecompressionBombError, uncaught
    worst = [
        {"path": name, "source": str(tmp_path), "true": "a", "predicted": "b", "probability": 0.9}
        for name in ("p3.png", "bomb.png")
    ]
    note = _gallery(SimpleNamespace(misclassified=worst), tmp_path / "misclassified.png")
    assert "1 of them could not be read" in note and "bomb.png" in note
    with Image.open(tmp_path / "misclassified.png") as sheet:
        centre = np.asarray(sheet.convert("RGB"))[80, 80].astype(int)
    expected = np.asarray(srgb_rendering(data))[100, 100].astype(int)
    assert np.abs(centre - expected).max() <= 2 and np.abs(centre - (40, 180, 90)).max() > 10
