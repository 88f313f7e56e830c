"""The fast decode path: plain JPEGs through libjpeg-turbo (``simplejpeg``), resize through OpenCV.

:func:`features.images.decode_image` calls :func:`decode_jpeg` first (``bilinear`` filter); whatever it
declines (returns ``None``) goes through the Pillow path unchanged, so this module never decides what an image *is* — it
only takes the common case that it can decode to exactly the pixels the Pillow path gives:

- baseline or progressive JPEG (not MPO), 3-component YCbCr, no ICC profile, within ``max_pixels``;
- the EXIF orientation (read by Pillow, as the Pillow path reads it) applied here on the array;
- DCT-domain downscaling by 1/2, 1/4 or 1/8 chosen by Pillow's own ``draft`` rule (the largest factor that
  keeps both sides >= the target), so both paths decode at the same scale with the same libjpeg-turbo IDCT.

Importing OpenCV here sets its own thread pool to one thread (``cv2.setNumThreads(1)``, process-wide):
tlpipe already decodes in parallel threads, one image each.

Anything else — PNG, WebP, TIFF, GIF, BMP, MPO, grey, CMYK/YCCK, an ICC profile, unreadable EXIF, a
file libjpeg-turbo reports damaged — returns ``None`` and takes the Pillow path.

The resize filters (:data:`RESIZE_FILTERS`) are part of a feature set's identity:

``bilinear``
    Keras' resize, after a reduction by the largest integer factor that keeps both sides >= the target
    (for JPEG the DCT-domain 1/2, 1/4, 1/8 Pillow's ``draft`` also picks, then a box filter for any factor
    left, an area average): OpenCV's bilinear interpolation (``INTER_LINEAR``, half-pixel centres, no antialiasing), the
    filter TensorFlow's ``image_dataset_from_directory`` uses. For photos less than twice the target on
    their short side no reduction happens, and the pixels are Keras' (within a grey level of rounding).
    ``crop`` takes the centre square at integer offsets first.
``antialias``
    Pillow's bilinear filter, antialiased (its footprint widens with the downscale factor). tlpipe's
    resize before the filter was explicit: feature sets made then hold this.
"""

from __future__ import annotations

import importlib
import io
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import ExifTags, Image

from tlpipe.errors import InputError

__all__ = [
    "DEFAULT_RESIZE_FILTER",
    "LEGACY_RESIZE_FILTER",
    "RESIZE_FILTERS",
    "_LIBS",
    "available",
    "check_resize_filter",
    "dct_scale",
    "decode_jpeg",
    "decode_jpeg_sizes",
    "disabled",
    "orient",
    "recorded_resize_filter",
    "resize_bilinear",
]

RESIZE_FILTERS = ("bilinear", "antialias")
DEFAULT_RESIZE_FILTER = "bilinear"
LEGACY_RESIZE_FILTER = "antialias"  # what feature sets without a recorded filter were made with
_JPEG_MAGIC = b"\xff\xd8\xff"


def _lib(name: str):
    """The module ``simplejpeg`` or ``cv2``, or None when it is not installed (imported once)."""
    if name not in _LIBS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            module = None
        if name == "cv2" and module is not None:
            # tlpipe decodes images in parallel threads; OpenCV's own pool on top of them only adds
            # hand-offs (measured: ms.core per image 1.17-1.30 vs 0.95-1.07 with 2 decode threads).
            module.setNumThreads(1)
        _LIBS[name] = module
    return _LIBS[name]


_LIBS: dict[str, object] = {}


@contextmanager
def disabled() -> Iterator[None]:
    """Inside, every image takes the Pillow path (and the ``bilinear`` filter its numpy form), as without
    the libraries installed: for benchmarks and checks that compare the two paths. Not thread-safe."""
    saved = dict(_LIBS)
    _LIBS.update(simplejpeg=None, cv2=None)
    try:
        yield
    finally:
        _LIBS.clear()
        _LIBS.update(saved)


def available() -> bool:
    """Whether the whole fast path is installed (``simplejpeg`` and ``opencv-python-headless``); each one
    alone still serves its half (libjpeg-turbo decoding, or OpenCV's resize)."""
    return _lib("simplejpeg") is not None and _lib("cv2") is not None


def check_resize_filter(resize_filter: str) -> None:
    """Raise ``ValueError`` unless ``resize_filter`` is one of :data:`RESIZE_FILTERS`."""
    if resize_filter not in RESIZE_FILTERS:
        raise InputError(f"unknown resize filter {resize_filter!r}; expected one of {RESIZE_FILTERS}")


def dct_scale(width: int, height: int, size: int) -> int:
    """The DCT-domain scale denominator (1, 2, 4 or 8) for a ``width`` x ``height`` JPEG resized to ``size``.

    Pillow's ``JpegImageFile.draft`` rule: the largest power of two <= ``min(width // size, height // size)``,
    so both decoded sides stay >= ``size`` (what ``squash`` needs, and ``crop`` needs for the short side).
    """
    scale = min(width // size, height // size)
    return next((s for s in (8, 4, 2) if scale >= s), 1)


def orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF ``orientation`` (1-8) to an ``(H, W, C)`` array as Pillow's ``Image.transpose`` would.

    Returns a C-contiguous array; orientation 1 returns ``pixels`` itself.
    """
    ops = {
        2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
        3: lambda a: a[::-1, ::-1],  # ROTATE_180
        4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
        5: lambda a: a.transpose(1, 0, 2),  # TRANSPOSE
        6: lambda a: a.transpose(1, 0, 2)[:, ::-1],  # ROTATE_270 (90 degrees clockwise)
        7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # TRANSVERSE
        8: lambda a: a.transpose(1, 0, 2)[::-1],  # ROTATE_90 (90 degrees counter-clockwise)
    }
    if orientation not in ops:
        return pixels
    return np.ascontiguousarray(ops[orientation](pixels))


def decode_jpeg(data: bytes, size: int, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]] | None:
    """:func:`decode_jpeg_sizes` for one size."""
    found = decode_jpeg_sizes(data, (size,), max_pixels)
    return None if found is None else (found[0][0], found[1])


def decode_jpeg_sizes(
    data: bytes, sizes: tuple[int, ...] | list[int], max_pixels: int
) -> tuple[list[np.ndarray], tuple[int, int]] | None:
    """Decode a plain JPEG through libjpeg-turbo, upright and DCT-downscaled for each of ``sizes``: the
    header is parsed once and the image decoded once per distinct scale (sizes that share a scale share the
    decode, e.g. 224 and 288 px from a ~480 x 375 photo).

    Parameters
    ----------
    data : bytes
        The file's bytes.
    sizes : sequence of int
        The target sides in pixels; each sets its DCT-domain scale (:func:`dct_scale`).
    max_pixels : int
        Larger images are declined (the Pillow path refuses them with its reason).

    Returns
    -------
    ([pixels, ...], (width, height)) or None
        One ``pixels`` per size: ``(H, W, 3)`` uint8 RGB, EXIF orientation applied, at 1/1, 1/2, 1/4 or 1/8
        of the full size (the same array for sizes of the same scale); ``(width, height)``: the full size
        after orientation. ``None`` when the fast path does not handle this file (see the module docstring)
        or is not installed.
    """
    simplejpeg = _lib("simplejpeg")
    if simplejpeg is None or not data.startswith(_JPEG_MAGIC):
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:  # markers only: format, mode, EXIF, ICC
            if im.format != "JPEG" or im.mode != "RGB" or im.info.get("icc_profile"):
                return None
            width, height = im.size
            orientation = int(im.getexif().get(ExifTags.Base.Orientation, 1))
        if orientation not in range(1, 9) or width * height > max_pixels:
            return None
        if simplejpeg.decode_jpeg_header(data)[2] != "YCbCr":
            return None
        by_scale: dict[int, np.ndarray] = {}
        for scale in sorted({dct_scale(width, height, size) for size in sizes}):
            # simplejpeg picks the smallest M/8 factor keeping both sides >= the minimum; ceil(side / scale)
            # is exactly libjpeg's output size at 1/scale, and no smaller factor reaches it.
            pixels = simplejpeg.decode_jpeg(
                data, colorspace="RGB", min_width=-(-width // scale), min_height=-(-height // scale), strict=True
            )
            if pixels.shape[:2] != (-(-height // scale), -(-width // scale)):
                return None
            by_scale[scale] = orient(pixels, orientation)
    except Exception:  # damaged, unusual or unsupported: the Pillow path decides and gives the reason
        return None
    arrays = [by_scale[dct_scale(width, height, size)] for size in sizes]
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return arrays, (width, height)


def resize_bilinear(pixels: np.ndarray, size: int, mode: str = "squash") -> np.ndarray:
    """The ``bilinear`` filter: ``(H, W, 3)`` uint8 -> ``(size, size, 3)`` uint8.

    ``crop`` first keeps the centre square (integer offsets, as Keras' ``crop_to_aspect_ratio``). An image
    whose both sides are still >= 2x ``size`` is area-averaged down by ``min(width, height) // size`` (OpenCV
    ``INTER_AREA``; both sides stay >= ``size``), then OpenCV's ``INTER_LINEAR`` (half-pixel centres, not
    antialiased) resizes to ``size``. Without OpenCV installed, Pillow's ``reduce`` and a non-antialiased
    bilinear through numpy give the same picture (within a grey level).
    """
    height, width = pixels.shape[:2]
    if mode == "crop":
        side = min(width, height)
        top, left = (height - side) // 2, (width - side) // 2
        pixels = pixels[top : top + side, left : left + side]
        height = width = side
    factor = max(1, min(width, height) // size)
    cv2 = _lib("cv2")
    if cv2 is None:
        return _resize_bilinear_numpy(pixels, size, factor)
    pixels = np.ascontiguousarray(pixels)
    if factor > 1:  # area averaging over boxes of ~factor pixels (fractional at the edges: nothing cut off)
        target = (round(width / factor), round(height / factor))
        pixels = cv2.resize(pixels, target, interpolation=cv2.INTER_AREA)
    if pixels.shape[:2] == (size, size):
        return pixels
    return cv2.resize(pixels, (size, size), interpolation=cv2.INTER_LINEAR)


def _resize_bilinear_numpy(pixels: np.ndarray, size: int, factor: int) -> np.ndarray:
    """The same filter without OpenCV (slow; used only when ``opencv-python-headless`` is missing)."""
    if factor > 1:  # Pillow's BOX filter is the same area average as OpenCV's INTER_AREA
        image = Image.fromarray(np.ascontiguousarray(pixels))
        target = (round(image.width / factor), round(image.height / factor))
        pixels = np.asarray(image.resize(target, Image.Resampling.BOX))
    src = pixels.astype(np.float32)
    height, width = src.shape[:2]

    def taps(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, n_in - 1)
        lo = np.floor(x).astype(np.int64)
        return lo, np.minimum(lo + 1, n_in - 1), (x - lo).astype(np.float32)

    y0, y1, wy = taps(height)
    x0, x1, wx = taps(width)
    rows = src[y0] * (1 - wy)[:, None, None] + src[y1] * wy[:, None, None]
    out = rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def recorded_resize_filter(metadata: dict) -> str:
    """The resize filter a feature set's, head's or fused model's ``metadata`` records (``antialias`` when
    absent: it was made before the filter was recorded)."""
    return str(metadata.get("resize_filter") or LEGACY_RESIZE_FILTER)
