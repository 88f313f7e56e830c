"""Shared pieces of the reliability tests: a generated corpus of hostile inputs, a trained head, and helpers to
run tlpipe in a subprocess (to kill it, limit its file size, or race it)."""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, write_photo_folder

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
NON_UTF8 = b"flower/caf\xe9.jpg"  # a Latin-1 file name: not valid UTF-8
ODD_NAME = 'flower/comma, "quote"\nnewline.png'  # valid on POSIX; CSV must quote it
VANISHING = "china/vanishing.jpg"  # listed, then deleted before it is read (see ``vanish``)


@dataclass(frozen=True)
class Expect:
    """What should happen to one input: ``embedded`` (a row), ``failed`` (a failure / an error row) or
    ``skipped`` (refused while listing: no row), with a part of the recorded reason."""

    outcome: str
    reason: str = ""


def display(relpath: str) -> str:
    """A relative path as the cache and the score output store it (undecodable bytes as backslash escapes)."""
    return relpath.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> Image.Image:
    """A small random image (distinct content per seed, so no two corpus files share a hash)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` RGB pixels, with almost no pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


def bomb_jpeg(width: int, height: int) -> bytes:
    """A small baseline JPEG whose frame header (SOF0) claims ``width`` x ``height``."""
    data = bytearray(encoded(noise(5), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def write_corpus(root: Path) -> dict[str, Expect]:
    """Class folders of real photos plus every hostile input of a folder tree; returns the expected outcome
    per stored path (see :func:`display`)."""
    write_photo_folder(root, per_class=2)
    expected = {display(str(p.relative_to(root))): Expect("embedded") for p in root.rglob("*.jpg")}
    good = encoded(noise(1), "JPEG")
    png = bytearray(encoded(noise(2), "PNG"))
    png[29] ^= 0xFF  # the IHDR chunk's CRC (bytes 29-32)
    frames = [noise(10 + i) for i in range(3)]
    files = {
        "china/zero.jpg": (b"", Expect("failed", "empty file")),
        "china/truncated.jpg": (good[: len(good) // 2], Expect("failed", "truncated image")),
        "china/bad_crc.png": (bytes(png), Expect("failed", "corrupt image header")),
        "china/text.jpg": (b"hello, I am a text file\n", Expect("failed", "not an image")),
        "china/bomb.png": (bomb_png(100_000, 100_000), Expect("failed", "image too large")),
        "china/bomb.jpg": (bomb_jpeg(12_000, 9_000), Expect("failed", "image too large")),
        VANISHING: (encoded(noise(3), "JPEG"), Expect("failed", "cannot read: No such file")),
        "flower/one_pixel.png": (encoded(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"), Expect("embedded")),
        "flower/sixteen_bit.png": (
            encoded(Image.fromarray((np.arange(32 * 24, dtype=np.uint16) * 80).reshape(24, 32)), "PNG"),
            Expect("embedded"),
        ),
        "flower/cmyk.jpg": (encoded(noise(4, mode="CMYK"), "JPEG"), Expect("embedded")),
        "flower/animated.gif": (
            encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40),
            Expect("embedded"),
        ),
        ODD_NAME: (encoded(noise(6), "PNG"), Expect("embedded")),
    }
    for relpath, (data, expect) in files.items():
        (root / relpath).write_bytes(data)
        expected[relpath] = expect
    (root / NON_UTF8.decode("utf-8", "surrogateescape")).write_bytes(encoded(noise(7), "JPEG"))
    expected[display(os.fsdecode(NON_UTF8))] = Expect("embedded")
    os.symlink("..", root / "flower" / "loop")  # back to the root: a directory cycle
    expected["flower/loop"] = Expect("skipped", "symlink loop")
    os.symlink("self.jpg", root / "flower" / "self.jpg")  # a link to itself
    expected["flower/self.jpg"] = Expect("skipped", "Too many levels of symbolic links")
    return expected


@pytest.fixture
def vanish(monkeypatch) -> Callable[[ModuleType], None]:
    """``vanish(module)``: after ``module.discover`` lists the inputs, delete VANISHING from the source folder."""

    def arm(module: ModuleType) -> None:
        discover = module.discover

        def listed_then_deleted(source, **kwargs):
            found = discover(source, **kwargs)
            (Path(source) / VANISHING).unlink()
            return found

        monkeypatch.setattr(module, "discover", listed_then_deleted)

    return arm


@pytest.fixture(scope="session")
def head(tmp_path_factory, tiny_entry, model_store) -> SimpleNamespace:
    """A logistic-regression head on 12 photos embedded by the tiny backbone, saved with its sidecar."""
    from tlpipe.features.cache import read_feature_set
    from tlpipe.features.extract import extract
    from tlpipe.pipeline.heads.estimators import make_head
    from tlpipe.pipeline.heads.persistence import save_head

    root = tmp_path_factory.mktemp("head")
    photos = write_photo_folder(root / "photos")
    cache = root / "cache.h5"
    extract(photos, cache, model=str(tiny_entry.directory), batch_size=4)
    fs = read_feature_set(cache)
    path = root / "logreg.joblib"
    save_head(make_head("logreg").fit(fs.X, fs.y), path, feature_set=fs, metrics={}, params={})
    return SimpleNamespace(path=path, store=model_store, photos=photos, cache=cache, fs=fs)


def python(code: str, *args, **popen) -> subprocess.Popen:
    """Start ``python -c code args`` with the repository importable."""
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=ENV, cwd=ROOT, **popen)


def tlpipe(*args, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    """Run the CLI; with ``file_size_limit``, no file it writes may grow past that many bytes (RLIMIT_FSIZE
    with SIGXFSZ ignored: writes fail with EFBIG, as on a full disk)."""
    code = "import runpy, sys; sys.argv[0] = 'tlpipe'; runpy.run_module('tlpipe.pipeline.cli', run_name='__main__')"
    if file_size_limit is not None:
        code = (
            "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({file_size_limit}, {file_size_limit})); " + code
        )
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        errors="backslashreplace",
    )


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The CLI's error line: exit code 2 and exactly one non-empty line on stderr."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), (proc.returncode, proc.stderr)
    return lines[0]


def parse_output(path: Path) -> list[dict]:
    """The complete rows of a CSV / JSON Lines output; only the last record may be cut short (by the kill)."""
    if not path.exists():
        return []
    text = path.read_bytes().decode("utf-8")
    if path.suffix == ".jsonl":
        lines = text.split("\n")
        return [json.loads(line) for line in lines[:-1]]  # lines[-1]: "" or the record being written
    records = list(csv.reader(io.StringIO(text, newline="")))
    if not text.endswith("\n"):
        records = records[:-1]
    if not records:
        return []
    header, rows = records[0], records[1:]
    if rows and len(rows[-1]) != len(header):  # cut after a newline inside a quoted field
        rows = rows[:-1]
    assert all(len(r) == len(header) for r in rows), "a record other than the last is damaged"
    return [dict(zip(header, r)) for r in rows]


def same_rows(got: list[dict], want: list[dict]) -> None:
    assert [r["path"] for r in got] == [r["path"] for r in want]
    for g, w in zip(got, want):
        assert (g["label"], g["sha256"], g["error"]) == (w["label"], w["sha256"], w["error"])
        if w["probability"] not in ("", None):
            assert float(g["probability"]) == pytest.approx(float(w["probability"]), abs=1e-5)
