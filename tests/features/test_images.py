import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tlpipe.features.images import (
    MAX_PIXELS,
    ImageError,
    decode_image,
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
    ids=["L", "1", "LA", "RGBA", "RGBA-webp", "CMYK-jpeg", "CMYK-tiff", "I16-mid", "I16-max",
         "I16B", "I32"],
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
    cases = [(1799, 449, 224), (449, 1799, 224), (1000, 1000, 125), (3000, 900, 112),
             (2500, 2600, 299), (900, 3000, 32)]
    for width, height, size in cases:
        data = encode(Image.new("RGB", (width, height), GREEN), "JPEG")
        for mode in ("squash", "crop"):
            seen.clear()
            decode_image(data, size, mode, resize_filter="antialias")  # Pillow's resize sees the drafted size
            assert len(seen) == 1 and min(seen[0]) >= size, (width, height, size, mode, seen)
    assert seen == [(113, 375)]  # 900x3000 decoded at 1/8 (the largest factor libjpeg has)


@pytest.mark.parametrize("mode", ["squash", "crop"])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize(
    "dims", [(1, 1), (10, 300), (300, 10), (2000, 150), (150, 2000), (1023, 1025)]
)
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
        (encode(Image.new("RGB", (8, 8)), "PPM"), "unsupported format: PPM"),
    ],
    ids=["empty", "text", "truncated-jpeg", "truncated-png", "png-crc", "ppm"],
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
