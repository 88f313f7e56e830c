"""The fast decode path: plain JPEGs through libjpeg-turbo (``simplejpeg``), resize through OpenCV.

:func:`features.images.decode_image` calls :func:`decode_jpeg` first (``bilinear`` filter); whatever it
declines (returns ``None``) goes through the Pillow path unchanged, so this module never decides what an image *is* — it
only takes the common case that it can decode to exactly the pixels the Pillow path gives:

- baseline or progressive JPEG (not MPO), 3-component YCbCr, within ``max_pixels``, whose data libjpeg-turbo
  decodes without a warning (``strict``) and, when progressive, carries all its scans;
- the EXIF orientation (read by Pillow, as the Pillow path reads it) applied here on the array;
- an embedded ICC profile rendered to sRGB on the array (:mod:`tlpipe.features.colour`; nothing is done for a
  profile that renders as sRGB, nor for a file without one), as the Pillow path renders it;
- DCT-domain downscaling by 1/2, 1/4 or 1/8 chosen by Pillow's own ``draft`` rule (the largest factor that
  keeps both sides >= the target), so both paths decode at the same scale with the same libjpeg-turbo IDCT.

Importing OpenCV here sets its own thread pool to one thread (``cv2.setNumThreads(1)``, process-wide):
tlpipe already decodes in parallel threads, one image each.

Anything else — PNG, WebP, TIFF, GIF, BMP, MPO, grey, CMYK/YCCK, a colour profile that cannot be applied,
unreadable EXIF, a file libjpeg-turbo reports damaged — returns ``None`` and takes the Pillow path (which
refuses a damaged JPEG through :func:`jpeg_damage`, with libjpeg-turbo's own words).

:func:`jpeg_damage` is the check of JPEG data both paths share: Pillow drops libjpeg's warnings ("Corrupt JPEG
data: premature end of data segment", "... extraneous bytes before marker ...") and fills what is missing with
grey, so a JPEG that lost part of its data but still ends in EOI would decode as a good picture. It needs
``simplejpeg`` (the ``decode`` extra, pulled in by every extra that runs a model); without it, decoding goes on
and says once, by name, that JPEG data is not checked.

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
import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import ExifTags, Image

from tlpipe.errors import InputError

__all__ = [
    "DEFAULT_RESIZE_FILTER",
    "LEGACY_RESIZE_FILTER",
    "RESIZE_FILTERS",
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

from . import colour

log = logging.getLogger(__name__)
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
    the libraries installed: for benchmarks and checks that compare the two paths. Not thread-safe. The damage
    check of JPEG data (:func:`jpeg_damage`) stays on: it is not part of the fast path."""
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


# libjpeg's warnings that mean the entropy-coded data is damaged or incomplete (jerror.h: JWRN_HIT_MARKER,
# JWRN_EXTRANEOUS_DATA, JWRN_HUFF_BAD_CODE, JWRN_MUST_RESYNC, JWRN_ARITH_BAD_CODE, JWRN_BOGUS_PROGRESSION,
# JWRN_NOT_SEQUENTIAL). "Premature end of JPEG file" (JWRN_JPEG_EOF) is a truncated file. Other warnings
# (an unknown JFIF revision, an unknown Adobe transform code) say nothing about the pixels.
_DAMAGE_WARNINGS = ("Corrupt JPEG data", "Inconsistent progression sequence", "Invalid SOS parameters")
_TRUNCATED_WARNING = "Premature end of JPEG file"
_CHECK_COLORSPACES = {"Gray": "GRAY", "CMYK": "CMYK", "YCCK": "CMYK"}  # what libjpeg-turbo decodes each to
# After a scan's entropy-coded data: the next marker (0xFF then neither a stuffed 0x00, a fill 0xFF nor RSTn).
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_checker_state: list[object] = []
_unchecked_warned = threading.Event()


def _checker():
    """``simplejpeg`` for the damage check, or None when it cannot be imported (not switched off by
    :func:`disabled`: the check is not part of the fast path)."""
    if not _checker_state:
        try:
            _checker_state.append(importlib.import_module("simplejpeg"))
        except ImportError:
            _checker_state.append(None)
    return _checker_state[0]


def jpeg_damage(data: bytes) -> str | None:
    """Why a JPEG's data is damaged or incomplete, or None when libjpeg-turbo decodes it without a warning.

    The file is decoded once at 1/8 scale (every entropy-coded bit is read; almost no IDCT) with
    ``simplejpeg``'s ``strict`` flag, which turns libjpeg's warnings into errors; a progressive file must also
    carry every scan it needs (:func:`missing_scans`).

    Parameters
    ----------
    data : bytes
        A JPEG (or MPO: its first picture) file's bytes.

    Returns
    -------
    str or None
        ``"truncated image"`` (the file ends before its EOI marker), ``"damaged image data: <libjpeg's
        warning>"`` (e.g. ``Corrupt JPEG data: premature end of data segment``: a gap that still ends in EOI),
        ``"damaged image data: the progressive JPEG ends before its last scans"``; None when whole, when
        libjpeg-turbo cannot read the header (the decoder gives the reason), or when ``simplejpeg`` is not
        installed (said once, by name, in the log).
    """
    checker = _checker()
    if checker is None:
        if not _unchecked_warned.is_set():
            _unchecked_warned.set()
            log.warning(
                "JPEG data is not checked for damage: simplejpeg is not installed, and Pillow decodes a JPEG "
                "with missing data as grey without a word; install it: pip install 'tlpipe[decode]'"
            )
        return None
    try:
        colorspace = _CHECK_COLORSPACES.get(checker.decode_jpeg_header(data)[2], "RGB")
    except Exception:
        return None
    try:
        checker.decode_jpeg(data, colorspace=colorspace, min_factor=8, strict=True)
    except Exception as exc:
        message = str(exc)
        if message.startswith(_TRUNCATED_WARNING):
            return "truncated image"
        return f"damaged image data: {message}" if message.startswith(_DAMAGE_WARNINGS) else None
    return missing_scans(data)


def missing_scans(data: bytes) -> str | None:
    """For a progressive JPEG that stops (at EOI) before its last scans — libjpeg decodes it without a warning,
    a blurred picture — the reason; None for a complete or a sequential file.

    Walks the markers (skipping each scan's entropy-coded data) and notes, per component and coefficient, the
    finest bit sent (the scans' Ss..Se and Al); complete means every coefficient of every component down to
    bit 0.
    """
    i, end = 2, len(data)
    components: list[int] = []
    finest: dict[int, list[int]] = {}
    while i + 4 <= end:
        if data[i] != 0xFF:
            return None  # not at a marker: libjpeg's check judges such a file
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:  # EOI
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        segment = data[i + 4 : i + 2 + length]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header (SOFn)
            if marker not in _PROGRESSIVE_SOF or len(segment) < 6:
                return None
            components = [segment[6 + 3 * k] for k in range(segment[5]) if 6 + 3 * k < len(segment)]
            finest = {c: [16] * 64 for c in components}
        elif marker == 0xDA:  # SOS: which components, coefficients Ss..Se, down to bit Al
            if not components or not segment:
                return None
            count = segment[0]
            if len(segment) < 4 + 2 * count:
                return None
            first, last, al = segment[1 + 2 * count], segment[2 + 2 * count], segment[3 + 2 * count] & 0x0F
            for c in (segment[1 + 2 * k] for k in range(count)):
                bits = finest.get(c, [])
                for k in range(first, min(last, 63) + 1) if bits else ():
                    bits[k] = min(bits[k], al)
            found = _NEXT_MARKER.search(data, i + 2 + length)
            if found is None:
                break
            i = found.start()
            continue
        i += 2 + length
    if not components or all(bit == 0 for bits in finest.values() for bit in bits):
        return None
    return "damaged image data: the progressive JPEG ends before its last scans (coefficients never sent)"


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
            if im.format != "JPEG" or im.mode != "RGB":
                return None
            width, height = im.size
            orientation = int(im.getexif().get(ExifTags.Base.Orientation, 1))
            icc, progressive = im.info.get("icc_profile"), bool(im.info.get("progressive"))
        if orientation not in range(1, 9) or width * height > max_pixels:
            return None
        if progressive and missing_scans(data):
            return None
        transform = colour.srgb_transform(icc, "RGB") if icc else None  # None also for an sRGB profile
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
            if transform is not None:
                pixels = colour.render_array(pixels, transform)
            by_scale[scale] = orient(pixels, orientation)
    except Exception:  # damaged, unusual, unsupported, a bad profile: the Pillow path decides and gives the reason
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
