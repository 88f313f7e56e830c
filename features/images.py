"""Image decoding and the one resize path shared by extraction, scoring and fine-tuning.

Everything here is thread-friendly: Pillow releases the GIL while decoding and resizing,
and no global Pillow state is changed (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left False so
truncated files fail instead of decoding to grey).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "MPO"})
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)
# Pillow's default Image.MAX_IMAGE_PIXELS. Pillow itself still refuses images over twice its own
# limit (and warns above it) while opening, so a larger max_pixels cannot lift that cap.
MAX_PIXELS = 89_478_485
RESIZE_MODES = ("squash", "crop")

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")


class ImageError(Exception):
    """An image that cannot be used; ``reason`` is a short human explanation."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def resize_image(img: Image.Image, size: int, mode: str = "squash") -> Image.Image:
    """Resize ``img`` to ``size`` x ``size`` with Pillow's bilinear filter.

    ``"squash"`` resizes straight to the square, ignoring the aspect ratio, as Keras'
    ``image_dataset_from_directory`` does. ``"crop"`` scales the short side to ``size`` and keeps
    the centre square (done in one pass through ``resize(box=...)``). Pillow's bilinear filter is
    antialiased: when downscaling it averages over the whole footprint, unlike TensorFlow's
    non-antialiased bilinear, which samples 4 pixels and aliases. Palette and 1-bit images
    are resized with nearest neighbour by Pillow, so convert them to RGB first.
    """
    _check_resize_args(size, mode)
    if mode == "squash":
        return img.resize((size, size), Image.Resampling.BILINEAR)
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    box = (left, top, left + side, top + side)
    return img.resize((size, size), Image.Resampling.BILINEAR, box=box)


def decode_image(
    data: bytes, size: int, mode: str = "squash", *, max_pixels: int = MAX_PIXELS
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode image bytes to a ``(size, size, 3)`` uint8 RGB array.

    Returns the array and the original ``(width, height)`` after EXIF orientation. Multi-frame
    files (animated GIF/WebP, multi-page TIFF, MPO) give their first frame; alpha is dropped
    as TensorFlow's ``decode_image(channels=3)`` does. Raises :class:`ImageError` for anything
    that is not a usable image, and ``ValueError`` for a bad ``size`` or ``mode``.
    """
    arrays, original = decode_image_sizes(data, (size,), mode, max_pixels=max_pixels)
    return arrays[0], original


def _draft_scale(width: int, height: int, size: int) -> int:
    """The JPEG DCT scaling factor Pillow's ``draft`` picks for a square request of ``size`` (1, 2, 4 or 8)."""
    scale = min(width // size, height // size)
    return next((s for s in (8, 4, 2) if scale >= s), 1)


def decode_image_sizes(
    data: bytes, sizes: tuple[int, ...] | list[int], mode: str = "squash", *, max_pixels: int = MAX_PIXELS
) -> tuple[list[np.ndarray], tuple[int, int]]:
    """:func:`decode_image` at several sizes from one read of ``data``: one ``(s, s, 3)`` array per size.

    Each array is exactly what ``decode_image(data, s)`` returns. Sizes whose JPEG DCT scaling factor
    agrees (every size when the photo is under twice the largest size) share one decode; others get their
    own, so a size's pixels never depend on which other sizes were decoded with it.
    """
    for size in sizes:
        _check_resize_args(size, mode)
    if not data:
        raise ImageError("empty file")
    out: dict[int, np.ndarray] = {}
    try:
        with Image.open(io.BytesIO(data)) as probe:
            if probe.format not in SUPPORTED_FORMATS:
                raise ImageError(f"unsupported format: {probe.format}")
            width, height = probe.size
            jpeg = probe.format in ("JPEG", "MPO")
        if width * height > max_pixels:
            raise ImageError(f"image too large: {width}x{height} exceeds {max_pixels} pixels")
        groups: dict[int, list[int]] = {}
        for size in sizes:
            groups.setdefault(_draft_scale(width, height, size) if jpeg else 1, []).append(size)
        for group in groups.values():
            # Image.open parses the header only and leaves multi-frame files on frame 0.
            with Image.open(io.BytesIO(data)) as im:
                orientation = _orientation(im)
                if jpeg:
                    # Let libjpeg scale by 1/2, 1/4 or 1/8 while decoding. Pillow picks the largest
                    # factor that keeps both sides >= the request, and both modes need exactly that:
                    # squash needs each side >= size, crop needs the short side >= size. The request
                    # is square, so the EXIF rotation applied afterwards does not change it. Every
                    # size of the group has the same factor (by construction), so one decode serves all.
                    im.draft("RGB", (max(group), max(group)))
                im.load()
                rgb = _to_rgb(im)
                if orientation in _TRANSPOSE:
                    rgb = rgb.transpose(_TRANSPOSE[orientation])
                for size in group:
                    out[size] = np.array(resize_image(rgb, size, mode), dtype=np.uint8)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image too large: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        known = data.startswith(_MAGIC) or data[8:12] == b"WEBP"
        raise ImageError("corrupt image header" if known else "not an image") from exc
    except MemoryError:
        raise
    except Exception as exc:  # Pillow plugins raise many types for bad data
        message = str(exc) or type(exc).__name__
        if "truncated" in message.lower():
            raise ImageError("truncated image") from exc
        raise ImageError(f"cannot decode: {message}") from exc
    if orientation in _SWAPS_AXES:
        width, height = height, width
    return [out[size] for size in sizes], (width, height)


def load_image(
    path: str | os.PathLike[str],
    size: int,
    mode: str = "squash",
    *,
    max_pixels: int = MAX_PIXELS,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Read ``path`` and :func:`decode_image` it; unreadable files raise :class:`ImageError`."""
    _check_resize_args(size, mode)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        detail = f"[Errno {exc.errno}] {exc.strerror}" if exc.errno else str(exc)
        raise ImageError(f"cannot read: {detail}") from exc
    return decode_image(data, size, mode, max_pixels=max_pixels)


def _check_resize_args(size: int, mode: str) -> None:
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation tag; 1 when absent or unreadable (bad EXIF must not lose the image)."""
    try:
        return int(im.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:
        return 1


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; 16-bit data is scaled by 1/257, not clipped."""
    if im.mode == "RGB":
        return im
    if im.mode == "I" or im.mode.startswith("I;16"):
        wide = np.clip(np.asarray(im), 0, 65535).astype(np.uint32)
        return Image.fromarray(((wide + 128) // 257).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")
