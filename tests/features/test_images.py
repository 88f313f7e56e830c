import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from tlpipe.features.images import (
    MAX_PIXELS,
    ImageError,
    decode_image,
    decode_image_sizes,
    load_image,
    resize_image,
)

RED, GREEN, BLUE = (220, 20, 30), (20, 200, 40), (30, 40, 210)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus mild noise: a stand-in for a photograph."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack(
        [
            128 + 100 * np.sin(x / 37.0),
            128 + 100 * np.cos(y / 23.0),
            128 + 60 * np.sin((x + y) / 51.0),
        ],
        axis=-1,
    )
    rgb += np.random.default_rng(seed).normal(0, 6, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def stripes(width: int, height: int, colours) -> Image.Image:
    arr = np.zeros((height, width, 3), np.uint8)
    for i, colour in enumerate(colours):
        arr[:, i * width // len(colours) : (i + 1) * width // len(colours)] = colour
    return Image.fromarray(arr)


def png_header(width: int, height: int) -> bytes:
    """A PNG with a valid IHDR declaring width x height and no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def assert_array(arr: np.ndarray, size: int) -> None:
    assert arr.shape == (size, size, 3)
    assert arr.dtype == np.uint8
    assert arr.flags.c_contiguous


def close(arr: np.ndarray, colour, tol: float = 12) -> bool:
    return bool(np.abs(arr.reshape(-1, 3).mean(0) - np.array(colour)).max() <= tol)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"])
def test_every_format_decodes(fmt):
    arr, original = decode_image(encode(Image.new("RGB", (60, 40), RED), fmt), 32)
    assert_array(arr, 32)
    assert original == (60, 40)
    assert close(arr, RED)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (30, 20), c) for c in (RED, BLUE, GREEN)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    arr, original = decode_image(data, 16)
    assert original == (30, 20)
    assert close(arr, RED)


@pytest.mark.parametrize(("width", "size"), [(60, 32), (1200, 100)])  # the second one drafts
def test_exif_orientation_6_rotates_and_reports_rotated_size(width, size):
    exif = Image.Exif()
    exif[0x0112] = 6  # display needs a 90 degree clockwise turn: left edge becomes the top
    img = stripes(width, width // 2, [RED, BLUE])
    arr, original = decode_image(encode(img, "JPEG", exif=exif.tobytes()), size)
    assert_array(arr, size)
    assert original == (width // 2, width)
    assert close(arr[: size // 3], RED, 20)
    assert close(arr[-size // 3 :], BLUE, 20)


@pytest.mark.parametrize(
    ("img", "fmt", "expected"),
    [
        (Image.new("L", (20, 10), 100), "PNG", (100, 100, 100)),
        (Image.new("1", (20, 10), 1), "PNG", (255, 255, 255)),
        (Image.new("LA", (20, 10), (77, 0)), "PNG", (77, 77, 77)),
        (Image.new("RGBA", (20, 10), (10, 20, 30, 0)), "PNG", (10, 20, 30)),  # alpha dropped
        (Image.new("RGBA", (20, 10), (10, 20, 30, 128)), "WEBP", (10, 20, 30)),
        (Image.new("CMYK", (20, 10), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),
        (Image.new("CMYK", (20, 10), (0, 255, 255, 0)), "TIFF", (255, 0, 0)),
        (Image.fromarray(np.full((10, 20), 32768, np.uint16)), "PNG", (128, 128, 128)),
        (Image.fromarray(np.full((10, 20), 65535, np.uint16)), "PNG", (255, 255, 255)),
        (Image.frombytes("I;16B", (20, 10), (40000).to_bytes(2, "big") * 200), "TIFF", (156,) * 3),
        (Image.fromarray(np.full((10, 20), 32768, np.int32)), "TIFF", (128, 128, 128)),
    ],
    ids=["L", "1", "LA", "RGBA", "RGBA-webp", "CMYK-jpeg", "CMYK-tiff", "I16-mid", "I16-max", "I16B", "I32"],
)
def test_modes_convert_to_rgb(img, fmt, expected):
    arr, _ = decode_image(encode(img, fmt), 8)
    assert_array(arr, 8)
    assert close(arr, expected, 2 if fmt != "JPEG" else 8)


def test_palette_with_transparency():
    img = Image.new("P", (20, 10), 1)
    img.putpalette([*BLUE, *RED] + [0] * 762)
    arr, _ = decode_image(encode(img, "PNG", transparency=1), 8)
    assert close(arr, RED, 0)


@pytest.mark.parametrize("mode", ["squash", "crop"])
@pytest.mark.parametrize(("width", "height", "size"), [(1600, 1200, 224), (1200, 1700, 100)])
def test_draft_matches_full_decode(width, height, size, mode):
    data = encode(photo(width, height), "JPEG", quality=90)
    drafted, original = decode_image(data, size, mode)
    with Image.open(io.BytesIO(data)) as im:
        full = np.asarray(resize_image(im.convert("RGB"), size, mode))
    assert original == (width, height)
    assert np.abs(drafted.astype(int) - full.astype(int)).mean() < 3


def test_draft_never_goes_below_the_target(monkeypatch):
    seen = []
    original_resize = Image.Image.resize

    def spy(self, *args, **kwargs):
        seen.append(self.size)
        return original_resize(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    cases = [
        (1799, 449, 224),
        (449, 1799, 224),
        (1000, 1000, 125),
        (3000, 900, 112),
        (2500, 2600, 299),
        (900, 3000, 32),
    ]
    for width, height, size in cases:
        data = encode(Image.new("RGB", (width, height), GREEN), "JPEG")
        for mode in ("squash", "crop"):
            seen.clear()
            decode_image(data, size, mode, resize_filter="antialias")  # Pillow's resize sees the drafted size
            assert len(seen) == 1 and min(seen[0]) >= size, (width, height, size, mode, seen)
    assert seen == [(113, 375)]  # 900x3000 decoded at 1/8 (the largest factor libjpeg has)


@pytest.mark.parametrize("mode", ["squash", "crop"])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("dims", [(1, 1), (10, 300), (300, 10), (2000, 150), (150, 2000), (1023, 1025)])
def test_shape_for_any_aspect(dims, fmt, mode):
    arr, original = decode_image(encode(photo(*dims), fmt), 64, mode)
    assert_array(arr, 64)
    assert original == dims


def test_squash_keeps_everything_crop_keeps_the_middle():
    data = encode(stripes(300, 100, [RED, GREEN, BLUE]), "PNG")
    squash, _ = decode_image(data, 60, "squash")
    crop, _ = decode_image(data, 60, "crop")
    assert tuple(squash[30, 2]) == RED and tuple(squash[30, 30]) == GREEN
    assert tuple(squash[30, -3]) == BLUE
    assert close(crop[:, 3:-3], GREEN, 0)


def test_resize_image_modes_and_validation():
    img = stripes(90, 30, [RED, GREEN, BLUE])
    assert resize_image(img, 20).size == (20, 20)
    assert resize_image(img, 20, "crop").size == (20, 20)
    with pytest.raises(ValueError, match="unknown resize mode"):
        resize_image(img, 20, "pad")
    with pytest.raises(ValueError, match="unknown resize mode"):
        decode_image(encode(img, "PNG"), 20, "letterbox")
    with pytest.raises(ValueError, match="size"):
        decode_image(encode(img, "PNG"), 0)


def truncated_jpeg() -> bytes:
    data = encode(photo(200, 150), "JPEG")
    return data[: len(data) // 2]


def corrupt_png_crc() -> bytes:
    data = bytearray(encode(Image.new("RGB", (20, 10), RED), "PNG"))
    data[29] ^= 0xFF  # last byte of the IHDR checksum
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"name,label\ncat.jpg,cat\n", "not an image"),
        (truncated_jpeg(), "truncated image"),
        (encode(photo(200, 150), "PNG")[:3000], "truncated image"),
        (corrupt_png_crc(), "corrupt image header"),
        (
            encode(Image.new("RGB", (8, 8)), "EPS"),
            "unsupported format: EPS is not decoded: it would run Ghostscript on the file",
        ),
    ],
    ids=["empty", "text", "truncated-jpeg", "truncated-png", "png-crc", "eps"],
)
def test_bad_data_raises_image_error(data, reason):
    with pytest.raises(ImageError) as info:
        decode_image(data, 32)
    assert info.value.reason == reason
    assert str(info.value) == reason


def test_huge_header_refused_before_decoding():
    # Over twice Pillow's limit: Pillow itself refuses it while opening.
    with pytest.raises(ImageError, match="image too large"):
        decode_image(png_header(30000, 30000), 32)
    # Over our limit only: refused from the header; decoding this pixel-less file would have
    # failed differently (truncated), so the reason shows that no pixels were read.
    with pytest.warns(Image.DecompressionBombWarning):
        with pytest.raises(ImageError) as info:
            decode_image(png_header(10000, 10000), 32)
    assert info.value.reason == f"image too large: 10000x10000 exceeds {MAX_PIXELS} pixels"
    with pytest.raises(ImageError, match="image too large: 20x10 exceeds 199 pixels"):
        decode_image(encode(Image.new("RGB", (20, 10)), "PNG"), 8, max_pixels=199)


def test_load_image(tmp_path):
    path = tmp_path / "a.webp"
    Image.new("RGB", (50, 20), BLUE).save(path)
    arr, original = load_image(path, 24, "crop")
    assert_array(arr, 24)
    assert original == (50, 20)
    with pytest.raises(ImageError, match=r"cannot read: \[Errno 2\] No such file or directory"):
        load_image(tmp_path / "missing.jpg", 24)
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path, 24)


# -- issue 14, item 1: the pixels are the picture the user sees ------------------------------------------------

_INVERSE = {  # what a camera stores for each EXIF orientation, given the upright picture
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def _heif_saver() -> bool:
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def exif_containers() -> list[str]:
    """Every container Pillow (plus pillow-heif when installed) writes EXIF into."""
    from PIL import features

    formats = ["JPEG", "PNG", "WEBP", "TIFF", "MPO"]
    if features.check("avif"):
        formats.append("AVIF")
    if _heif_saver():
        formats.append("HEIF")
    return formats


def upright() -> Image.Image:
    """An asymmetric picture (a red corner top-left, ramps), so any wrong flip or rotation shows."""
    y, x = np.mgrid[0:48, 0:64]
    arr = np.stack([x * 4, y * 5, 128 + 0 * x], -1).astype(np.uint8)
    arr[:12, :12] = (255, 0, 0)
    return Image.fromarray(arr)


def oriented(fmt: str, orientation: int) -> bytes:
    """The upright picture stored as a camera would with this EXIF orientation."""
    stored = upright().transpose(_INVERSE[orientation]) if orientation > 1 else upright()
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(
        stored, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt in ("JPEG", "MPO", "WEBP", "AVIF", "HEIF") else {})
    )


@pytest.mark.parametrize("fmt", exif_containers())
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_exactly_once_in_every_container(fmt, orientation):
    # Pillow's TIFF decoder (and pillow-heif) apply the orientation themselves: applying the tag again
    # rotated TIFFs twice before.
    reference, _ = decode_image(encode(upright(), "PNG"), 32)
    arr, size = decode_image(oriented(fmt, orientation), 32)
    assert size == (64, 48)
    assert np.abs(arr.astype(int) - reference).mean() < 6, (fmt, orientation)


def _grey() -> np.ndarray:
    y, x = np.mgrid[0:48, 0:64]
    return (x * 3 + y).astype(np.uint8)


def _rgb() -> np.ndarray:
    return np.asarray(upright())


def mode_corpus() -> dict[str, tuple[bytes, np.ndarray]]:
    """Files in every non-8-bit-RGB mode Pillow produces, each with the 8-bit RGB picture it must decode to."""
    from PIL import ImageCms

    g, rgb = _grey(), _rgb()
    g3 = np.repeat(g[..., None], 3, -1)
    sixteen = g.astype(np.uint16) * 257
    lab = ImageCms.applyTransform(
        Image.fromarray(rgb),
        ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB"),
    )
    assert lab is not None  # None only when converting in place
    rgb16 = rgb.astype(np.uint16) * 257
    png16 = io.BytesIO()  # 16-bit RGB PNG, written by hand (Pillow writes none)
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png16.write(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 48, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    return {
        "I;16-png": (encode(Image.fromarray(sixteen), "PNG"), g3),
        "I;16-tiff": (encode(Image.fromarray(sixteen), "TIFF"), g3),
        "I;16B-tiff": (encode(Image.frombytes("I;16B", (64, 48), sixteen.astype(">u2").tobytes()), "TIFF"), g3),
        "I;16L-tiff": (encode(Image.frombytes("I;16L", (64, 48), sixteen.astype("<u2").tobytes()), "TIFF"), g3),
        "RGB48-png": (png16.getvalue(), rgb),
        "I-8bit-tiff": (encode(Image.fromarray(g.astype(np.int32)), "TIFF"), g3),
        # 16-bit PGM, opened as I: the container says 16 bits, so a dark picture stays dark
        "I-16bit-pgm": (b"P5\n64 48\n65535\n" + sixteen.astype(">u2").tobytes(), g3),
        "I-16bit-pgm-dark": (
            b"P5\n64 48\n65535\n" + (g.astype(np.uint16) // 64).astype(">u2").tobytes(),
            np.zeros_like(g3),
        ),
        "I-16bit-tiff": (encode(Image.fromarray(g.astype(np.int32) * 257), "TIFF"), g3),
        "F-0..1-tiff": (encode(Image.fromarray(g.astype(np.float32) / 255), "TIFF"), g3),
        "F-0..255-tiff": (encode(Image.fromarray(g.astype(np.float32)), "TIFF"), g3),
        "LA-png": (encode(Image.fromarray(g).convert("LA"), "PNG"), g3),
        "PA-tiff": (
            encode(Image.fromarray(rgb).convert("P").convert("PA"), "TIFF"),
            np.asarray(Image.fromarray(rgb).convert("P").convert("RGB")),
        ),
        "P-transparency-png": (
            encode(Image.fromarray(rgb).convert("P"), "PNG", transparency=0),
            np.asarray(Image.fromarray(rgb).convert("P").convert("RGB")),
        ),
        "CMYK-jpeg": (encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95), rgb),
        "CMYK-tiff": (encode(Image.fromarray(rgb).convert("CMYK"), "TIFF"), rgb),
        "YCbCr-tiff": (encode(Image.fromarray(rgb).convert("YCbCr"), "TIFF"), rgb),
        "LAB-tiff": (encode(lab, "TIFF"), rgb),
        "1-png": (
            encode(Image.fromarray(g).convert("1"), "PNG"),
            np.repeat(np.asarray(Image.fromarray(g).convert("1").convert("L"))[..., None], 3, -1),
        ),
        "RGBA-png": (encode(Image.fromarray(rgb).convert("RGBA"), "PNG"), rgb),
        "L-jpeg": (encode(Image.fromarray(g), "JPEG", quality=95), g3),
    }


@pytest.mark.parametrize("name", list(mode_corpus()))
def test_every_mode_decodes_to_its_picture(name):
    # Before: I and F images came out black (0..255 ints scaled by 1/257, 0..1 floats truncated) or saturated.
    data, expected = mode_corpus()[name]
    arr, size = decode_image(data, 32, resize_filter="antialias")  # the reference is Pillow's resize
    assert size == (64, 48)
    reference = np.asarray(Image.fromarray(expected).resize((32, 32), Image.Resampling.BILINEAR))
    assert np.abs(arr.astype(int) - reference).mean() < 4, name


def _float_rgb_tiff() -> bytes:
    """An uncompressed 3-channel 32-bit float TIFF (Pillow cannot open these)."""
    arr = np.random.default_rng(0).random((4, 5, 3)).astype("<f4")
    data, n = arr.tobytes(), 11
    extra_at = 8 + 2 + 12 * n + 4
    extra = struct.pack("<HHH", 32, 32, 32) + struct.pack("<HHH", 3, 3, 3)

    def entry(tag, kind, count, value):
        body = struct.pack("<HH", value, 0) if kind == 3 and count == 1 else struct.pack("<I", value)
        return struct.pack("<HHI", tag, kind, count) + body

    entries = [
        entry(256, 4, 1, 5),
        entry(257, 4, 1, 4),
        entry(258, 3, 3, extra_at),
        entry(259, 3, 1, 1),
        entry(262, 3, 1, 2),
        entry(273, 4, 1, extra_at + len(extra)),
        entry(277, 3, 1, 3),
        entry(278, 4, 1, 4),
        entry(279, 4, 1, len(data)),
        entry(284, 3, 1, 1),
        entry(339, 3, 3, extra_at + 6),
    ]
    return b"II*\x00" + struct.pack("<IH", 8, n) + b"".join(entries) + b"\0\0\0\0" + extra + data


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (encode(Image.fromarray(_grey().astype(np.int32) << 20), "TIFF"), "mode I (32-bit integer): values up to"),
        (encode(Image.fromarray(_grey().astype(np.float32) - 100), "TIFF"), "mode F (32-bit float): negative values"),
        (
            encode(Image.fromarray(np.full((4, 4), np.nan, np.float32)), "TIFF"),
            "mode F (32-bit float): values that are not finite",
        ),
        (encode(Image.fromarray(_grey().astype(np.float32) * 1000), "TIFF"), "mode F (32-bit float): values up to"),
        (_float_rgb_tiff(), "TIFF with 3 x 32-bit float samples per pixel"),
    ],
    ids=["I-full-range", "F-negative", "F-nan", "F-huge", "RGB-float"],
)
def test_modes_without_a_white_level_are_refused_naming_the_mode(data, reason):
    with pytest.raises(ImageError, match="unsupported pixel") as info:
        decode_image(data, 32)
    assert reason in info.value.reason


def content_corpus() -> dict[str, bytes]:
    """One file per format Pillow decodes (and writes), to be stored under misleading names."""
    from PIL import features

    img = upright()
    out = {
        fmt: encode(
            img
            if fmt not in ("GIF", "PCX", "XBM", "MSP")
            else img.convert("L" if fmt != "XBM" and fmt != "MSP" else "1"),
            fmt,
        )
        for fmt in (
            "JPEG",
            "PNG",
            "BMP",
            "GIF",
            "WEBP",
            "TIFF",
            "PPM",
            "QOI",
            "TGA",
            "SGI",
            "PCX",
            "ICO",
            "DDS",
            "IM",
            "JPEG2000",
            "XBM",
            "MSP",
        )
        if fmt != "JPEG2000" or features.check("jpg_2000")
    }
    if features.check("avif"):
        out["AVIF"] = encode(img, "AVIF", quality=95)
    if _heif_saver():
        out["HEIF"] = encode(img, "HEIF", quality=95)
    return out


@pytest.mark.parametrize("fmt", list(content_corpus()))
def test_formats_are_recognised_by_content_and_listed_whatever_the_name(tmp_path, fmt):
    # Before: only seven formats were decoded, and a folder listing kept only nine extensions (.jfif, .avif,
    # .heic, .qoi ... were skipped as "not an image file").
    from tlpipe.features.sources import discover

    data = content_corpus()[fmt]
    arr, size = decode_image(data, 32)
    assert size == (64, 48) if fmt not in ("ICO",) else True
    for name in ("photo.jfif", "photo.jpe", "photo.dat", "photo"):
        (tmp_path / "cls").mkdir(exist_ok=True)
        (tmp_path / "cls" / name).write_bytes(data)
    (tmp_path / "cls" / "notes.txt").write_text("not a picture\n")
    source = discover(tmp_path)
    assert sorted(r.relpath for r in source.records) == [
        "cls/photo",
        "cls/photo.dat",
        "cls/photo.jfif",
        "cls/photo.jpe",
    ]
    assert source.skipped == [("cls/notes.txt", "not an image file (.txt)")]


def test_heif_without_its_extra_names_the_extra(tmp_path):
    """In a process where pillow-heif cannot be imported, a HEIC file is refused naming the extra."""
    import subprocess
    import sys

    if not _heif_saver():
        pytest.skip("pillow-heif is not installed: no HEIC file can be written here")
    path = tmp_path / "phone.heic"
    path.write_bytes(encode(upright(), "HEIF"))
    code = (
        "import sys; sys.modules['pillow_heif'] = None\n"
        "from tlpipe.features.images import load_image, ImageError\n"
        f"try:\n    load_image({str(path)!r}, 32)\nexcept ImageError as e:\n    print(e.reason)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert (
        result.stdout.strip() == "HEIF/HEIC image: install the optional extra to decode it: pip install 'tlpipe[heif]'"
    )
    arr, size = load_image(path, 32)  # here the plugin is installed
    assert size == (64, 48)


def test_exif_orientation_in_a_png_exif_chunk_after_the_pixels():
    """PNG allows eXIf after IDAT: the tag is only known once the pixels are read, and must still apply once."""
    stored = upright().transpose(_INVERSE[6])
    data = encode(stored, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    payload = exif.tobytes()[6:] if exif.tobytes().startswith(b"Exif\x00\x00") else exif.tobytes()
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload + struct.pack(">I", zlib.crc32(b"eXIf" + payload))
    iend = data.rindex(b"IEND") - 4
    data = data[:iend] + chunk + data[iend:]
    reference, _ = decode_image(encode(upright(), "PNG"), 32)
    arr, size = decode_image(data, 32)
    assert size == (64, 48) and np.abs(arr.astype(int) - reference).mean() < 6


# -- issue 34, kind 5: damaged pixels are refused, never filled with grey -------------------------------------


def _first_scan(data: bytes) -> int:
    """Offset of the entropy-coded data after a JPEG's first SOS header."""
    i = 2
    while data[i + 1] != 0xDA:
        i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    return i + 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]


def _scan_starts(data: bytes) -> list[int]:
    """Offsets of every SOS marker of a (progressive) JPEG."""
    return [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xDA]


def damaged_jpegs() -> dict[str, bytes]:
    """JPEGs that still end in EOI (so Pillow finds nothing truncated) but lost or garbled part of their data."""
    out = {}
    for kind, options in {
        "baseline": {},
        "progressive": {"progressive": True},
        "restarts": {"restart_marker_blocks": 8},
    }.items():
        good = encode(photo(300, 200, seed=3), "JPEG", quality=90, **options)
        start = _first_scan(good)
        body = len(good) - start
        gap = start + body // 3
        out[f"{kind}-half-then-eoi"] = good[: start + body // 2] + b"\xff\xd9"
        out[f"{kind}-cut-out"] = good[:gap] + good[gap + body // 5 :]
        zeroed = bytearray(good)
        zeroed[gap : gap + body // 5] = bytes(body // 5)
        out[f"{kind}-zeroed-gap"] = bytes(zeroed)
    out["junk-before-eoi"] = encode(photo(300, 200), "JPEG")[:-2] + bytes(300) + b"\xff\xd9"
    progressive = encode(photo(300, 200, seed=4), "JPEG", quality=90, progressive=True)
    out["progressive-last-scans-missing"] = progressive[: _scan_starts(progressive)[4]] + b"\xff\xd9"
    grey = encode(photo(300, 200).convert("L"), "JPEG")  # not the fast path's: Pillow decodes it
    out["grey-half-then-eoi"] = grey[: _first_scan(grey) + (len(grey) - _first_scan(grey)) // 2] + b"\xff\xd9"
    cmyk = encode(photo(300, 200).convert("CMYK"), "JPEG")
    out["cmyk-zeroed-gap"] = cmyk[: len(cmyk) // 2] + bytes(2000) + cmyk[len(cmyk) // 2 + 2000 :]
    return out


@pytest.mark.parametrize("resize_filter", ["bilinear", "antialias"])  # the fast path, then Pillow's
@pytest.mark.parametrize("name", sorted(damaged_jpegs()))
def test_a_jpeg_with_missing_or_garbled_data_is_refused_on_both_paths(name, resize_filter):
    # Before: libjpeg's warnings (premature end of data segment, extraneous bytes...) were dropped by Pillow,
    # which filled what was missing with flat grey (or kept the garbage), and the image was embedded.
    data = damaged_jpegs()[name]
    with pytest.raises(ImageError) as info:
        decode_image(data, 64, resize_filter=resize_filter)
    assert info.value.reason.startswith("damaged image data: "), info.value.reason
    with pytest.raises(ImageError, match="damaged image data"):
        decode_image_sizes(data, (32, 64), resize_filter=resize_filter)


def test_the_damage_check_refuses_nothing_whole():
    """The intact originals of every damaged case decode (a progressive file with all its scans, restart markers,
    grey, CMYK, bytes after EOI)."""
    for options in ({}, {"progressive": True}, {"restart_marker_blocks": 8}):
        data = encode(photo(300, 200, seed=3), "JPEG", quality=90, **options)
        for resize_filter in ("bilinear", "antialias"):
            assert decode_image(data, 64, resize_filter=resize_filter)[1] == (300, 200)
        assert decode_image(data + b"trailing bytes after EOI, as some cameras write", 64)[1] == (300, 200)
    for mode in ("L", "CMYK"):
        assert decode_image(encode(photo(300, 200).convert(mode), "JPEG"), 64)[1] == (300, 200)


def test_truncation_is_refused_even_where_other_code_lets_pillow_load_truncated_images(monkeypatch, caplog):
    """``ImageFile.LOAD_TRUNCATED_IMAGES = True`` (set by other code in the process, as some notebooks and
    libraries do) makes Pillow fill what is missing with grey; tlpipe still refuses the file."""
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    for data in (truncated_jpeg(), encode(photo(200, 150), "PNG")[:3000]):
        with pytest.raises(ImageError, match="truncated image"):
            decode_image(data, 32, resize_filter="antialias")


# -- issue 34, kind 10: an embedded colour profile is rendered to sRGB ----------------------------------------

# Display P3's primaries adapted to the ICC's D50 white, as Apple's "Display P3" profile states them.
P3_COLORANTS = {
    b"rXYZ": (0.515102, 0.241196, -0.001053),
    b"gXYZ": (0.291965, 0.692245, 0.041882),
    b"bXYZ": (0.157153, 0.066561, 0.784267),
}


def display_p3_profile(gamma: float | None = None) -> bytes:
    """A Display P3 ICC profile (sRGB's tone curve, P3's wider primaries): LittleCMS's own sRGB profile with its
    three colorant tags set to P3's; with ``gamma``, a plain power-law tone curve instead of sRGB's. Its description
    still says "sRGB built-in": a profile is read by its content, never by its name."""
    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    (count,) = struct.unpack(">I", data[128:132])
    for i in range(count):
        entry = 132 + 12 * i
        tag, offset, _ = struct.unpack(">4sII", data[entry : entry + 12])
        if tag in P3_COLORANTS:
            data[offset + 8 : offset + 20] = b"".join(struct.pack(">i", round(v * 65536)) for v in P3_COLORANTS[tag])
        elif tag in (b"rTRC", b"gTRC", b"bTRC") and gamma is not None:  # the three share one curve
            curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256))
            data[offset : offset + len(curve)] = curve
            data[entry + 8 : entry + 12] = struct.pack(">I", len(curve))
    data[84:100] = bytes(16)  # profile ID (an MD5 of the content): "not computed"
    return bytes(data)


def srgb_rendering(data: bytes) -> Image.Image:
    """What a colour-managed viewer shows: ImageCms' own rendering of the file's pixels from its embedded profile to
    sRGB (perceptual intent, ImageCms' default)."""
    with Image.open(io.BytesIO(data)) as im:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(im.info["icc_profile"]))
        return ImageCms.profileToProfile(im.convert("RGB"), profile, ImageCms.createProfile("sRGB"), outputMode="RGB")


def srgb_reference(data: bytes, size: int, resize_filter: str) -> np.ndarray:
    """:func:`srgb_rendering`, resized as tlpipe resizes."""
    return np.asarray(resize_image(srgb_rendering(data), size, "squash", resize_filter))


def saturated_photo(width: int = 300, height: int = 200) -> Image.Image:
    """Gradients through saturated colours, where P3 and sRGB code values differ most."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([255 * x / width, 255 * (1 - y / height), 128 + 127 * np.sin((x + y) / 40)], axis=-1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("resize_filter", ["bilinear", "antialias"])
@pytest.mark.parametrize(
    ("fmt", "options"),
    [("JPEG", {"quality": 95}), ("PNG", {}), ("WEBP", {"lossless": True}), ("TIFF", {})],
    ids=["jpeg", "png", "webp", "tiff"],
)
def test_an_embedded_wide_gamut_profile_is_rendered_to_srgb(fmt, options, resize_filter):
    # Before: the profile was ignored and the raw P3 code values reached the model (here up to ~40 levels off).
    data = encode(saturated_photo(), fmt, icc_profile=display_p3_profile(), **options)
    pixels, original = decode_image(data, 128, resize_filter=resize_filter)
    reference = srgb_reference(data, 128, resize_filter)
    with Image.open(io.BytesIO(data)) as im:
        raw = np.asarray(resize_image(im.convert("RGB"), 128, "squash", resize_filter))
    assert original == (300, 200)
    assert np.abs(raw.astype(int) - reference).max() > 20  # the profile matters for this picture
    assert np.abs(pixels.astype(int) - reference).max() <= 2
    arrays, _ = decode_image_sizes(data, (64, 128), resize_filter=resize_filter)
    assert np.array_equal(arrays[1], pixels)


def test_an_srgb_profile_changes_nothing():
    """An embedded sRGB profile (most camera JPEGs carry one) renders to the same code values: no conversion."""
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for fmt in ("JPEG", "PNG"):
        plain = encode(saturated_photo(), fmt)
        tagged = encode(saturated_photo(), fmt, icc_profile=srgb)
        assert np.array_equal(decode_image(plain, 96)[0], decode_image(tagged, 96)[0])


def test_a_profile_that_cannot_be_read_is_refused_naming_it():
    data = encode(saturated_photo(), "JPEG", icc_profile=b"not an ICC profile at all" * 8)
    with pytest.raises(ImageError, match="colour profile"):
        decode_image(data, 64)


def test_a_grey_image_with_an_rgb_profile_is_rendered_as_grey_in_that_space():
    """A grey picture tagged with an RGB profile (some converters write one) has R = G = B in that space."""
    grey = saturated_photo().convert("L")
    profile = display_p3_profile(gamma=1.8)  # a tone curve unlike sRGB's: its greys are other greys
    data = encode(grey, "PNG", icc_profile=profile)
    pixels, _ = decode_image(data, 64, resize_filter="antialias")
    reference = srgb_reference(encode(grey.convert("RGB"), "PNG", icc_profile=profile), 64, "antialias")
    raw = np.asarray(resize_image(grey.convert("RGB"), 64, "squash", "antialias"))
    assert np.abs(raw.astype(int) - reference).max() > 10
    assert np.abs(pixels.astype(int) - reference).max() <= 2


# -- issue 34, kind 13: size and header are checked before a file is read whole --------------------------------


def _rchar() -> int:
    """Bytes this process has read through read() so far (Linux /proc/self/io)."""
    with open("/proc/self/io") as fh:
        return int(next(line for line in fh if line.startswith("rchar:")).split()[1])


def sparse(path, head: bytes, size: int):
    """A file of ``size`` bytes that costs no disk: ``head``, then a hole."""
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(size)
    return path


def tiff_header(width: int, height: int) -> bytes:
    """A little-endian TIFF whose first IFD declares ``width`` x ``height`` 8-bit RGB, one strip (not stored)."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (262, 3, 1, 2), (273, 4, 1, 4096),
               (277, 3, 1, 3), (278, 4, 1, height), (279, 4, 1, min(width * height * 3, 2**32 - 1))]  # fmt: skip
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        ifd += struct.pack("<HHI", tag, kind, count) + (
            struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        )
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)


MP4_HEADER = b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41" + b"\x00\x00\x00\x08free"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io to count bytes read")
def test_big_files_are_judged_by_size_and_header_before_being_read(tmp_path):
    from tlpipe.features.decoder import decode_record
    from tlpipe.features.images import MAX_FILE_BYTES
    from tlpipe.features.sources import ImageRecord

    cases = {
        "slide.tif": (tiff_header(150_000, 100_000), 3 << 30, "file too large"),  # a whole-slide scan
        "clip.jpg": (MP4_HEADER, MAX_FILE_BYTES + 1, "file too large"),  # a renamed video, just over
        "movie.png": (MP4_HEADER, 300 << 20, "not an image"),  # under the limit: its header says no
        "scan.tif": (tiff_header(10_000, 10_000), 300 << 20, "image too large: 10000x10000 exceeds"),
        "bomb.tif": (tiff_header(20_000, 20_000), 300 << 20, "image too large: Image size (400000000 pixels)"),
    }
    for name, (head, size, reason) in cases.items():
        path = sparse(tmp_path / name, head, size)
        before = _rchar()
        result = decode_record(ImageRecord(name, str(path), None, None), 32, "squash")
        assert result.pixels is None and str(result.error).startswith(reason), (name, result.error)
        with pytest.raises(ImageError, match=re.escape(reason)):
            load_image(path, 32)
        assert _rchar() - before < 4 << 20, f"{name}: read whole"
    assert MAX_FILE_BYTES == 1 << 30


def test_report_thumbnails_are_upright_srgb_renderings(tmp_path):
    """The galleries of compare's report show what the model saw: the sRGB rendering, upright, damage refused."""
    from tlpipe.features.images import load_thumbnail

    data = encode(saturated_photo(), "PNG", icc_profile=display_p3_profile())
    (tmp_path / "p3.png").write_bytes(data)
    thumb = load_thumbnail(tmp_path / "p3.png", 150)
    assert thumb.mode == "RGB" and thumb.size == (150, 100)
    reference = srgb_rendering(data).resize((150, 100), Image.Resampling.BICUBIC, reducing_gap=2.0)
    assert np.abs(np.asarray(thumb).astype(int) - np.asarray(reference)).max() <= 2
    assert load_thumbnail(tmp_path / "p3.png", 1000).size == (300, 200)  # never enlarged
    (tmp_path / "half.jpg").write_bytes(damaged_jpegs()["baseline-half-then-eoi"])
    with pytest.raises(ImageError, match="damaged image data"):
        load_thumbnail(tmp_path / "half.jpg", 150)


def test_a_truncated_file_of_any_container_says_truncated():
    """Before: a cut WebP said 'cannot decode: could not create decoder object', a cut LZW TIFF 'unsupported pixel
    format: TIFF with 1 x 1-bit ...', a cut AVIF 'not an image'."""
    from PIL import features

    cases = [
        ("WEBP", {"quality": 90}),
        ("WEBP", {"lossless": True}),
        ("TIFF", {"compression": "tiff_lzw"}),
        ("PNG", {}),
    ]
    if features.check("avif"):
        cases.append(("AVIF", {"quality": 80}))
    for fmt, options in cases:
        data = encode(photo(200, 150), fmt, **options)
        for cut in (0.7, 0.95):
            with pytest.raises(ImageError) as info:
                decode_image(data[: int(len(data) * cut)], 32)
            assert info.value.reason == "truncated image", (fmt, options, cut, info.value.reason)
