"""Image decoding and the one resize path shared by extraction, scoring and fine-tuning.

Everything here is thread-friendly: Pillow releases the GIL while decoding and resizing,
and no global Pillow state is changed (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left False so
truncated files fail instead of decoding to grey) except that the optional pillow-heif opener is
registered the first time a HEIF file arrives.

What is refused rather than decoded to something else (each an :class:`ImageError` with its reason):

- damaged data: a truncated file; a JPEG whose data libjpeg-turbo reports damaged or incomplete although it
  still ends in EOI (:func:`tlpipe.features.fastdecode.jpeg_damage`: Pillow would fill the gap with grey); a
  file Pillow's decoder rejects. Where other code in the process set ``LOAD_TRUNCATED_IMAGES`` (Pillow then
  decodes truncated files without a word), JPEG and PNG files are still checked whole, and the other formats
  are named once in the log as not checked;
- a file over :data:`MAX_FILE_BYTES`, from its size, before it is read; a file over
  :data:`HEADER_CHECK_BYTES` whose header (read through Pillow, without the rest) says it is not an image or
  holds more than ``max_pixels``; a decompression bomb, from its header (Pillow's own
  ``Image.MAX_IMAGE_PIXELS`` check is never switched off, and tlpipe's ``max_pixels`` is no larger);
- an embedded colour profile that cannot be applied. A profile that can is: the pixels are its sRGB rendering
  (:mod:`tlpipe.features.colour`).
"""

from __future__ import annotations

import io
import logging
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import ExifTags, Image, ImageFile, TiffImagePlugin

from tlpipe.errors import InputError, TlpipeError

from . import colour, fastdecode
from .fastdecode import DEFAULT_RESIZE_FILTER, RESIZE_FILTERS, check_resize_filter  # noqa: F401

__all__ = [
    "HEIF_EXTENSIONS",
    "HEIF_EXTRA_MESSAGE",
    "IMAGE_EXTENSIONS",
    "ImageError",
    "MAX_PIXELS",
    "REFUSED_FORMATS",
    "RESIZE_MODES",
    "decode_image",
    "decode_image_sizes",
    "load_image",
    "resize_image",
    "sniff_image",
]

# Formats Pillow identifies by content but tlpipe does not decode: EPS/PS would run Ghostscript on the file,
# and the others are not pictures Pillow can load (stubs, or vector formats that need Windows).
REFUSED_FORMATS = {
    "EPS": "EPS is not decoded: it would run Ghostscript on the file",
    "PDF": "PDF is not an image Pillow can decode",
    "MPEG": "MPEG video is not decoded",
    "WMF": "WMF/EMF vector images are not decoded",
    "BUFR": "BUFR is not decoded",
    "GRIB": "GRIB is not decoded",
    "HDF5": "HDF5 is not an image",
}
# Extensions taken as images when listing a folder without reading the file. Any other file is sniffed by its
# content (:func:`sniff_image`), so a JPEG named .dat is still found: the extension never decides alone.
_NOT_IMAGE_EXTENSIONS = frozenset(
    {".h5", ".hdf", ".bufr", ".grib", ".pdf", ".ps", ".eps", ".mpeg", ".mpg", ".wmf", ".emf"}
)
HEIF_EXTENSIONS = frozenset({".heic", ".heif", ".hif", ".heics", ".heifs", ".avci"})
IMAGE_EXTENSIONS = frozenset(
    {ext for ext in Image.registered_extensions() if ext not in _NOT_IMAGE_EXTENSIONS}
    | {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".avif"}
    | HEIF_EXTENSIONS
)
# ISO base media (HEIF) brands that need the pillow-heif plugin (AVIF brands are Pillow's own).
_HEIF_BRANDS = frozenset(
    {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1", b"mif2", b"avci"}
)
HEIF_EXTRA_MESSAGE = "HEIF/HEIC image: install the optional extra to decode it: pip install 'tlpipe[heif]'"
# Pillow's default Image.MAX_IMAGE_PIXELS. Pillow itself still refuses images over twice its own
# limit (and warns above it) while opening, so a larger max_pixels cannot lift that cap.
MAX_PIXELS = 89_478_485
# Files larger than this are refused from their size, before any byte is read: it is above the largest
# uncompressed picture within MAX_PIXELS (16-bit RGBA, 8 bytes a pixel: 716 MB), so no image tlpipe would
# decode is refused by it, while a whole-slide scan or a renamed video is. Decode threads each hold at most
# one file, so the bytes held at once stay under (decode threads) x MAX_FILE_BYTES.
MAX_FILE_BYTES = 1 << 30
# Files larger than this have their header read first (Pillow opens it without reading the rest): one that is
# not an image, or holds more than max_pixels, is refused before it is read whole.
HEADER_CHECK_BYTES = 16 << 20
RESIZE_MODES = ("squash", "crop")
log = logging.getLogger(__name__)

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


class ImageError(TlpipeError):
    """An image that cannot be used; ``reason`` is a short human explanation."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def resize_image(
    img: Image.Image, size: int, mode: str = "squash", resize_filter: str = DEFAULT_RESIZE_FILTER
) -> Image.Image:
    """Resize ``img`` to ``size`` x ``size`` with ``resize_filter`` (:data:`RESIZE_FILTERS`).

    ``"bilinear"`` is :func:`features.fastdecode.resize_bilinear` (Keras' non-antialiased bilinear, after
    an area-average reduction by ``min(width, height) // size`` when that is >= 2; ``crop`` at integer
    offsets). ``"antialias"`` is Pillow's bilinear filter, as described next.

    ``"squash"`` resizes straight to the square, ignoring the aspect ratio, as Keras'
    ``image_dataset_from_directory`` does. ``"crop"`` scales the short side to ``size`` and keeps
    the centre square (done in one pass through ``resize(box=...)``). Pillow's bilinear filter is
    antialiased: when downscaling it averages over the whole footprint, unlike TensorFlow's
    non-antialiased bilinear, which samples 4 pixels and aliases. Palette and 1-bit images
    are resized with nearest neighbour by Pillow, so convert them to RGB first.
    """
    _check_resize_args(size, mode, resize_filter)
    if resize_filter == "bilinear":
        return Image.fromarray(fastdecode.resize_bilinear(np.asarray(img.convert("RGB")), size, mode))
    if mode == "squash":
        return img.resize((size, size), Image.Resampling.BILINEAR)
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    box = (left, top, left + side, top + side)
    return img.resize((size, size), Image.Resampling.BILINEAR, box=box)


def decode_image(
    data: bytes,
    size: int,
    mode: str = "squash",
    *,
    resize_filter: str = DEFAULT_RESIZE_FILTER,
    max_pixels: int = MAX_PIXELS,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode image bytes to a ``(size, size, 3)`` uint8 RGB array: the picture as a viewer shows it, resized
    with ``resize_filter``.

    With the ``bilinear`` filter, plain JPEGs go through :func:`features.fastdecode.decode_jpeg`
    (libjpeg-turbo, the same pixels as Pillow's decode); every other file, any JPEG it declines, and the
    ``antialias`` filter go through Pillow here.

    Parameters
    ----------
    data : bytes
        The file's bytes. The format is recognised by content (any format Pillow decodes, HEIF/HEIC
        through the optional ``pillow-heif`` plugin); the file name plays no part.
    size : int
        Side of the square output, pixels.
    mode : str
        Resize mode, one of :data:`RESIZE_MODES` (see :func:`resize_image`).
    resize_filter : str
        ``bilinear`` (default; Keras' non-antialiased bilinear, fast path) or ``antialias`` (Pillow's bilinear
        filter), :data:`RESIZE_FILTERS`. Part of a feature set's identity (:func:`features.cache.feature_set_key`).
    max_pixels : int
        Images whose header declares more pixels are refused before decoding.

    Returns
    -------
    pixels : numpy.ndarray
        ``(size, size, 3)`` uint8 RGB.
    original_size : tuple of int
        ``(width, height)`` of the full picture after EXIF orientation.

    Raises
    ------
    ImageError
        Anything that is not a usable image, with a reason: empty, truncated, not an image, too large, a pixel
        mode whose white level cannot be told (the reason names the mode), HEIF without its extra, ...
    ValueError
        A bad ``size``, ``mode`` or ``resize_filter``.

    Notes
    -----
    EXIF orientation is applied exactly once whatever the container: the tag is read *after* Pillow loads
    the pixels, because some decoders apply it themselves and then drop the tag (Pillow's TIFF, pillow-heif).
    Multi-frame files (animated GIF/WebP, multi-page TIFF, MPO) give their first frame; alpha is dropped as
    TensorFlow's ``decode_image(channels=3)`` does. Non-8-bit modes are scaled to 8 bits by their white
    level (:func:`_to_rgb`), never clipped or truncated.
    """
    _check_resize_args(size, mode, resize_filter)
    if not data:
        raise ImageError("empty file")
    # antialias keeps Pillow's decode too: its resize needs a Pillow image, and the array round trip costs
    # more than libjpeg-turbo saves (measured 1.99 vs 1.43 ms.core per image).
    fast = fastdecode.decode_jpeg(data, size, max_pixels) if resize_filter == "bilinear" else None
    if fast is not None:
        return fastdecode.resize_bilinear(fast[0], size, mode), fast[1]
    with _decode_errors(data):
        if _is_heif(data):
            _register_heif()
        # Image.open parses the header only and leaves multi-frame files on frame 0.
        with Image.open(io.BytesIO(data)) as im:
            # Let libjpeg scale by 1/2, 1/4 or 1/8 while decoding. Pillow picks the largest factor that keeps
            # both sides >= the request, and both modes need exactly that: squash needs each side >= size, crop
            # needs the short side >= size. The request is square, so the EXIF rotation does not change it.
            rgb, original = _upright_srgb(im, data, (size, size), max_pixels)
            array = _resize_array(rgb, size, mode, resize_filter)
    return array, original


@contextmanager
def _decode_errors(data: bytes) -> Iterator[None]:
    """Turn what Pillow and its plugins raise for ``data`` into :class:`ImageError` with a reason."""
    try:
        yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image too large: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        if _is_heif(data) and not _heif_available():
            raise ImageError(HEIF_EXTRA_MESSAGE) from exc
        if _cut_short(data):
            raise ImageError("truncated image") from exc
        unsupported = _describe_tiff(data)
        if unsupported:
            raise ImageError(f"unsupported pixel format: {unsupported}") from exc
        known = data.startswith(_MAGIC) or data[8:12] == b"WEBP"
        raise ImageError("corrupt image header" if known else "not an image") from exc
    except MemoryError:
        raise
    except Exception as exc:  # Pillow plugins raise many types for bad data
        message = str(exc) or type(exc).__name__
        if "truncated" in message.lower() or _cut_short(data):
            raise ImageError("truncated image") from exc
        raise ImageError(f"cannot decode: {message}") from exc


def _upright_srgb(
    im: Image.Image, data: bytes, draft: tuple[int, int] | None, max_pixels: int
) -> tuple[Image.Image, tuple[int, int]]:
    """The opened ``im`` (of ``data``) loaded, checked, in sRGB and upright, and its ``(width, height)`` after
    orientation. JPEG/MPO are decoded at the DCT scale Pillow's ``draft`` picks for ``draft``. Raises
    :class:`ImageError` for what is refused; Pillow's own errors pass through (see :func:`_decode_errors`)."""
    if im.format in REFUSED_FORMATS:
        raise ImageError(f"unsupported format: {REFUSED_FORMATS[im.format]}")
    width, height = im.size
    if width * height > max_pixels:
        raise ImageError(f"image too large: {width}x{height} exceeds {max_pixels} pixels")
    if im.format in ("JPEG", "MPO"):
        damage = fastdecode.jpeg_damage(data)  # Pillow drops libjpeg's warnings and fills a gap with grey
        if damage:
            raise ImageError(damage)
        if draft:
            im.draft("RGB", draft)
    elif ImageFile.LOAD_TRUNCATED_IMAGES:
        _refuse_truncated(im, data)
    im.load()
    # After load: a decoder that applied the orientation itself has removed the tag by now.
    orientation = _orientation(im)
    rgb = _srgb(im)
    if orientation in _TRANSPOSE:
        rgb = rgb.transpose(_TRANSPOSE[orientation])
    if orientation in _SWAPS_AXES:
        width, height = height, width
    return rgb, (width, height)


_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})
_unchecked_formats: set[str] = set()
_unchecked_lock = threading.Lock()


def _srgb(im: Image.Image) -> Image.Image:
    """:func:`_to_rgb` of a loaded image, rendered to sRGB from its embedded ICC profile when it has one that
    is not sRGB's (:func:`tlpipe.features.colour.srgb_transform`)."""
    icc = im.info.get("icc_profile")
    if not icc or im.mode == "LAB":  # CIELAB is device-independent: _to_rgb renders it to sRGB
        return _to_rgb(im)
    family = "CMYK" if im.mode == "CMYK" else "L" if im.mode in _GREY_MODES or im.mode.startswith("I;16") else "RGB"
    try:
        transform = colour.srgb_transform(icc, family)
    except colour.ProfileError as exc:
        raise ImageError(exc.reason) from exc
    if transform is None:
        return _to_rgb(im)
    source = im if transform.input_mode == "CMYK" else _to_rgb(im)
    return colour.render(source.convert("L") if transform.input_mode == "L" else source, transform)


def _refuse_truncated(im: Image.Image, data: bytes) -> None:
    """With ``ImageFile.LOAD_TRUNCATED_IMAGES`` set by other code, Pillow decodes a truncated file without a word:
    refuse a PNG without its end chunk; name the other formats, once, as not checked."""
    if im.format == "PNG":
        if data.rfind(b"IEND") < 0:
            raise ImageError("truncated image")
        return
    with _unchecked_lock:
        if im.format in _unchecked_formats:
            return
        _unchecked_formats.add(str(im.format))
    log.warning(
        "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process (set by other code): Pillow then decodes a "
        "truncated %s file with the missing part grey, and tlpipe cannot tell; JPEG and PNG files are still checked",
        im.format,
    )


def _cut_short(data: bytes) -> bool:
    """Whether a container's own sizes say the file ends early: a RIFF (WebP) size, a TIFF's first IFD, or an
    ISO base media (HEIF, AVIF) box past the end."""
    end = len(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return int.from_bytes(data[4:8], "little") + 8 > end
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return int.from_bytes(data[4:8], "little" if data[:2] == b"II" else "big") + 2 > end
    if data[4:8] == b"ftyp":
        i = 0
        while i + 8 <= end:
            size = int.from_bytes(data[i : i + 4], "big")
            if size == 1 and i + 16 <= end:
                size = int.from_bytes(data[i + 8 : i + 16], "big")
            if size == 0:  # to the end of the file
                return False
            if size < 8 or i + size > end:
                return size >= 8
            i += size
    return False


def sniff_image(path: str | os.PathLike[str], limit: int = 1 << 16) -> bool:
    """Whether the file's first ``limit`` bytes are recognised as an image (by content, not by name).

    Used when listing folders for files whose extension is not an image extension. A file that cannot be
    read counts as an image here, so that the decoder reports why it cannot be read.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(limit)
    except OSError:
        return True
    if not head:
        return False
    if _is_heif(head):
        return True
    try:
        with Image.open(io.BytesIO(head)) as im:
            return im.format not in REFUSED_FORMATS
    except Image.UnidentifiedImageError:
        return False
    except Exception:  # identified, but the header is cut at ``limit`` or damaged: the decoder will say
        return True


def read_image_file(
    path: str | os.PathLike[str], *, max_bytes: int = MAX_FILE_BYTES, max_pixels: int = MAX_PIXELS
) -> bytes:
    """The bytes of a regular file, once its size and header allow them to be read whole.

    Parameters
    ----------
    path : path
        File to read.
    max_bytes : int
        Larger files are refused from their size (``fstat``), before any byte is read.
    max_pixels : int
        Files over :data:`HEADER_CHECK_BYTES` are opened by Pillow first (the header only): more pixels than
        this, a refused format, or not an image at all, and the rest is never read.

    Returns
    -------
    bytes
        The whole file.

    Raises
    ------
    OSError
        It cannot be opened or read, or is a folder, a FIFO or a device (e.g. /dev/zero, which would never end).
    ImageError
        ``file too large: N bytes, over the limit of M bytes``, or what its header says (``not an image``,
        ``image too large: WxH exceeds P pixels``, ``unsupported format: ...``).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"not a regular file ({'a FIFO' if stat.S_ISFIFO(info.st_mode) else 'a device or socket'})")
        if info.st_size > max_bytes:
            raise ImageError(_too_large(info.st_size, max_bytes))
        if info.st_size > HEADER_CHECK_BYTES:
            _check_header(fh, max_pixels)
            fh.seek(0)
        data = fh.read(info.st_size + 1)  # one byte more: to see whether it grew since fstat
        if len(data) > info.st_size:  # still being written: read on in pieces, up to the limit
            parts = [data]
            while (part := fh.read(1 << 20)) and sum(map(len, parts)) <= max_bytes:
                parts.append(part)
            data = b"".join(parts)
    if len(data) > max_bytes:
        raise ImageError(_too_large(len(data), max_bytes))
    return data


def _too_large(size: int, limit: int) -> str:
    return f"file too large: {size} bytes, over the limit of {limit} bytes (MAX_FILE_BYTES); it was not read"


def _check_header(fh, max_pixels: int) -> None:
    """Refuse the open file ``fh`` from its header (read by Pillow without the rest), or return."""
    head = fh.read(64)
    fh.seek(0)
    if _is_heif(head):
        _register_heif()
    try:
        with Image.open(fh) as im:
            if im.format in REFUSED_FORMATS:
                raise ImageError(f"unsupported format: {REFUSED_FORMATS[im.format]}")
            width, height = im.size
    except Image.UnidentifiedImageError as exc:
        if not (head.startswith(_MAGIC) or head[8:12] == b"WEBP" or _is_heif(head)):
            raise ImageError("not an image") from exc
        return  # an image by its magic whose header Pillow cannot read this way: the decoder judges it whole
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image too large: {exc}") from exc
    except ImageError:
        raise
    except Exception:  # a damaged header: the decoder gives the reason
        return
    if width * height > max_pixels:
        raise ImageError(f"image too large: {width}x{height} exceeds {max_pixels} pixels")


def load_image(
    path: str | os.PathLike[str],
    size: int,
    mode: str = "squash",
    *,
    resize_filter: str = DEFAULT_RESIZE_FILTER,
    max_pixels: int = MAX_PIXELS,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Read ``path`` (:func:`read_image_file`) and :func:`decode_image` it; unreadable files raise
    :class:`ImageError`."""
    _check_resize_args(size, mode, resize_filter)
    data = _read(path, max_pixels)
    return decode_image(data, size, mode, resize_filter=resize_filter, max_pixels=max_pixels)


def _read(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS) -> bytes:
    try:
        return read_image_file(path, max_pixels=max_pixels)
    except (OSError, ValueError) as exc:  # ValueError: a path with a NUL byte
        errno, strerror = getattr(exc, "errno", None), getattr(exc, "strerror", None)
        detail = f"[Errno {errno}] {strerror}" if errno else str(exc)
        raise ImageError(f"cannot read: {detail}") from exc


def load_thumbnail(path: str | os.PathLike[str], side: int, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The picture at ``path`` as a viewer shows it — upright, in sRGB, refused when damaged, as
    :func:`load_image` sees it — scaled down to fit ``side`` x ``side`` with its aspect ratio (never enlarged),
    for the reports' galleries.

    Returns
    -------
    PIL.Image.Image
        An ``RGB`` image, both sides <= ``side``.

    Raises
    ------
    ImageError
        As :func:`load_image`.
    """
    data = _read(path, max_pixels)
    if not data:
        raise ImageError("empty file")
    with _decode_errors(data):
        if _is_heif(data):
            _register_heif()
        with Image.open(io.BytesIO(data)) as im:
            rgb, _ = _upright_srgb(im, data, (side, side), max_pixels)
            scale = min(1.0, side / max(rgb.size))
            target = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
            return rgb.resize(target, Image.Resampling.BICUBIC, reducing_gap=2.0)


def _resize_array(rgb: Image.Image | np.ndarray, size: int, mode: str, resize_filter: str) -> np.ndarray:
    """``rgb`` (an RGB image or ``(H, W, 3)`` uint8 array) resized with ``resize_filter``, as an array."""
    if resize_filter == "bilinear":
        return fastdecode.resize_bilinear(np.asarray(rgb), size, mode)
    img = rgb if isinstance(rgb, Image.Image) else Image.fromarray(rgb)
    return np.array(resize_image(img, size, mode, resize_filter), dtype=np.uint8)


def _check_resize_args(size: int, mode: str, resize_filter: str = DEFAULT_RESIZE_FILTER) -> None:
    check_resize_filter(resize_filter)
    if mode not in RESIZE_MODES:
        raise InputError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")
    if size < 1:
        raise InputError(f"size must be a positive number of pixels, got {size}")


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation tag; 1 when absent or unreadable (bad EXIF must not lose the image)."""
    try:
        value = int(im.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:
        return 1
    return value if value in _TRANSPOSE else 1


def _is_heif(data: bytes) -> bool:
    """An ISO base media file whose brand is HEIF's (HEIC, HEIF image/sequence)."""
    return data[4:8] == b"ftyp" and (
        data[8:12] in _HEIF_BRANDS
        or any(data[i : i + 4] in _HEIF_BRANDS - {b"mif1", b"msf1"} for i in range(16, min(len(data), 64), 4))
    )


_heif_state: list[bool] = []


def _heif_available() -> bool:
    return bool(_heif_state and _heif_state[0])


def _register_heif() -> None:
    """Register pillow-heif's opener once (the optional ``heif`` extra); nothing when it is not installed."""
    if _heif_state:
        return
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        _heif_state.append(False)
        return
    register_heif_opener()
    _heif_state.append(True)


_TIFF_SAMPLE_FORMATS = {
    1: "unsigned integer",
    2: "signed integer",
    3: "float",
    4: "undefined",
    5: "complex integer",
    6: "complex float",
}


def _describe_tiff(data: bytes) -> str | None:
    """For a TIFF Pillow cannot open: its samples in words (e.g. '3 x 32-bit float samples per pixel'), else None."""
    if data[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    try:
        from PIL import TiffImagePlugin

        ifd = TiffImagePlugin.ImageFileDirectory_v2(data[:8])
        stream = io.BytesIO(data)
        stream.seek(int.from_bytes(data[4:8], "little" if data[:2] == b"II" else "big"))
        ifd.load(stream)
        bits = ifd.get(258, (1,))
        bits = bits if isinstance(bits, tuple) else (bits,)
        samples = int(ifd.get(277, len(bits)))
        kind = ifd.get(339, (1,))
        kind = kind[0] if isinstance(kind, tuple) else kind
        return f"TIFF with {samples} x {bits[0]}-bit {_TIFF_SAMPLE_FORMATS.get(int(kind), 'unknown')} samples per pixel"
    except Exception:
        return None


def _declared_bits(im: Image.Image) -> int | None:
    """Bits per sample the container declares for a mode I image, when it says: PNG and PGM store at most 16
    (Pillow widens them to I), TIFF says in BitsPerSample. None when unknown (then the values' range decides)."""
    if im.format in ("PNG", "PPM"):
        return 16
    if im.format == "TIFF" and isinstance(im, TiffImagePlugin.TiffImageFile):
        try:
            bits = im.tag_v2.get(258)
            bits = bits[0] if isinstance(bits, tuple) else bits
            return int(bits) if bits else None
        except Exception:
            return None
    return None


def _white_level(mode: str, values: np.ndarray, bits: int | None = None) -> float:
    """The value that means white for a single-channel non-8-bit image, or raise ImageError naming the mode.

    16-bit modes (I;16, I;16B, I;16L, I;16N), and I from a container that declares 16 bits (PNG, PGM, a 16-bit
    TIFF): 65535. 32-bit integer (I) and 32-bit float (F) carry no white level,
    so it is inferred from the range the values use: floats within 0..1 are 0..1 images, values within 0..255
    8-bit data widened, within 0..65535 16-bit data. Negative, non-finite or larger values are refused: any
    scaling would be a guess that could give a black or saturated picture.
    """
    if mode.startswith("I;16") or (mode == "I" and bits == 16):
        return 65535.0
    if mode == "I" and bits == 8:
        return 255.0
    kind = "32-bit float" if mode == "F" else "32-bit integer"
    if not values.size:
        return 255.0
    if mode == "F" and not np.all(np.isfinite(values)):
        raise ImageError(f"unsupported pixel mode {mode} ({kind}): values that are not finite (NaN or infinity)")
    low, high = float(values.min()), float(values.max())
    if low < 0:
        raise ImageError(
            f"unsupported pixel mode {mode} ({kind}): negative values ({low:g}); "
            "the white level cannot be told: save as 8- or 16-bit"
        )
    if mode == "F" and high <= 1.0:
        return 1.0
    if high <= 255:
        return 255.0
    if high <= 65535:
        return 65535.0
    raise ImageError(
        f"unsupported pixel mode {mode} ({kind}): values up to {high:g}; "
        "the white level cannot be told: save as 8- or 16-bit"
    )


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, scaled by the mode's white level (never clipped or truncated).

    Raises :class:`ImageError` naming the mode when that cannot be done right.
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I", "F") or mode.startswith("I;16"):
        values = np.asarray(im)
        if values.ndim != 2:
            raise ImageError(f"unsupported pixel mode {mode}")
        values = values.astype(np.float64)
        scaled = values * (255.0 / _white_level(mode, values, _declared_bits(im) if mode == "I" else None))
        grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in ("RGBa", "La"):  # premultiplied alpha: undo it before dropping alpha
        im = im.convert(mode.upper())
        mode = im.mode
    if mode == "LAB":
        from PIL import ImageCms

        transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        converted = ImageCms.applyTransform(im, transform)
        assert converted is not None  # None only when asked to convert in place
        return converted
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"unsupported pixel mode {mode}: {exc}") from exc


def decode_image_sizes(
    data: bytes,
    sizes: tuple[int, ...] | list[int],
    mode: str = "squash",
    *,
    resize_filter: str = DEFAULT_RESIZE_FILTER,
    max_pixels: int = MAX_PIXELS,
) -> tuple[list[np.ndarray], tuple[int, int]]:
    """:func:`decode_image` of one file's bytes at several sizes: one ``(s, s, 3)`` array per size.

    Each array is exactly what :func:`decode_image` gives for its size (a JPEG's DCT downscaling factor
    depends on the size asked for). On the fast path (``bilinear``, plain JPEG) the file is decoded once
    per distinct DCT scale and resized per size; other files are decoded once per size. Returns the
    arrays in ``sizes`` order and the original ``(width, height)``; raises as :func:`decode_image` does.
    """
    for size in sizes:
        _check_resize_args(size, mode, resize_filter)
    if data and resize_filter == "bilinear":
        fast = fastdecode.decode_jpeg_sizes(data, sizes, max_pixels)
        if fast is not None:
            return [fastdecode.resize_bilinear(p, size, mode) for p, size in zip(fast[0], sizes)], fast[1]
    arrays, original = [], (0, 0)
    for size in sizes:
        array, original = decode_image(data, size, mode, resize_filter=resize_filter, max_pixels=max_pixels)
        arrays.append(array)
    return arrays, original
