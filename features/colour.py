"""Colour management: a picture with an embedded ICC profile reaches the model as its sRGB rendering.

Cameras, phones and editors embed a profile (Display P3, Adobe RGB, ProPhoto, a CMYK press profile, a grey
gamma) saying what the code values mean; a viewer converts them to the screen's colours, and a model trained on
sRGB photos expects sRGB. Both decode paths (:mod:`tlpipe.features.fastdecode` and
:func:`tlpipe.features.images.decode_image`) call :func:`srgb_transform` on the profile and apply the transform
to the decoded pixels, before the resize:

- a profile is read by its content (LittleCMS, through Pillow's ``ImageCms``), never by its name;
- a profile that renders as sRGB (every code value within one grey level of itself: the sRGB profiles most
  cameras embed, in any of their variants) needs nothing, and nothing is done;
- the others are converted with ImageCms' default rendering intent (perceptual; matrix-shaper profiles such
  as Display P3 or Adobe RGB render colorimetrically whatever the intent);
- a grey picture with an RGB profile is R = G = B in that space; a profile for another colour space than the
  pixels' (a CMYK profile on RGB pixels), or one LittleCMS cannot read, is refused with its reason
  (:class:`ProfileError`).

Each distinct profile is parsed and its transform built once per process (a small cache keyed by the profile's
bytes); files without a profile cost nothing.

The conversion is part of a feature set's identity: its metadata records ``colour`` = :data:`COLOUR`
(``srgb-icc``). Feature sets made before hold ``none`` (absent: code values as stored);
:func:`tlpipe.features.extract.extract_into` warns by name when it appends to one, and records ``mixed``.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

import numpy as np
from PIL import Image

from tlpipe.errors import TlpipeError

__all__ = [
    "COLOUR",
    "LEGACY_COLOUR",
    "MIXED_COLOUR",
    "ProfileError",
    "recorded_colour",
    "render",
    "render_array",
    "srgb_transform",
]

COLOUR = "srgb-icc"  # what feature sets made now record: embedded ICC profiles rendered to sRGB
LEGACY_COLOUR = "none"  # what a feature set without the record holds: code values as stored
MIXED_COLOUR = "mixed"  # rows of both kinds: colour-managed rows appended to a feature set made before
_CACHE_SIZE = 32
_IDENTITY_TOLERANCE = 1  # grey levels: a profile within this of sRGB everywhere is sRGB


class ProfileError(TlpipeError):
    """An embedded colour profile that cannot be applied; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_lock = threading.Lock()
_transforms: OrderedDict[tuple[bytes, str], object] = OrderedDict()


def recorded_colour(metadata: dict) -> str:
    """The colour handling a feature set's (head's, fused model's) ``metadata`` records: :data:`COLOUR`, or
    :data:`LEGACY_COLOUR` when absent (made before profiles were applied), or :data:`MIXED_COLOUR`."""
    return str(metadata.get("colour") or LEGACY_COLOUR)


def srgb_transform(icc: bytes, mode: str):
    """The transform that renders pixels of ``mode`` described by the profile ``icc`` to sRGB, or None when the
    profile renders as sRGB already.

    Parameters
    ----------
    icc : bytes
        The embedded ICC profile.
    mode : str
        The pixels' Pillow mode family: ``"RGB"``, ``"L"`` (grey) or ``"CMYK"``.

    Returns
    -------
    PIL.ImageCms.ImageCmsTransform or None
        Input ``"RGB"`` / ``"L"`` / ``"CMYK"`` (``"RGB"`` for grey pixels under an RGB profile: they are made RGB
        first), output ``"RGB"``; built once per profile and mode and cached. Thread-safe to apply.

    Raises
    ------
    ProfileError
        LittleCMS cannot read the profile or build the transform, or the profile is for another colour space.
    """
    key = (bytes(icc), mode)
    with _lock:
        if key in _transforms:
            _transforms.move_to_end(key)
            return _transforms[key]
    transform = _build(icc, mode)  # outside the lock: a race builds one twice, harmlessly
    with _lock:
        _transforms[key] = transform
        while len(_transforms) > _CACHE_SIZE:
            _transforms.popitem(last=False)
    return transform


def _build(icc: bytes, mode: str):
    try:
        from PIL import ImageCms
    except ImportError as exc:  # Pillow built without LittleCMS
        raise ProfileError(f"embedded colour profile cannot be applied: {exc}") from exc
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = profile.profile.xcolor_space.strip()
    except (OSError, ImageCms.PyCMSError, ValueError, TypeError) as exc:
        raise ProfileError(f"unreadable ICC colour profile: {exc}") from exc
    wanted = {"RGB": "RGB", "L": "GRAY", "CMYK": "CMYK"}[mode]
    if space == "RGB" and mode == "L":
        mode = "RGB"  # grey pixels in an RGB space: R = G = B there (the caller makes them RGB)
    elif space != wanted:
        raise ProfileError(f"the embedded ICC colour profile is for {space} but the pixels are {wanted}")
    try:
        transform = ImageCms.buildTransform(
            profile, ImageCms.createProfile("sRGB"), mode, "RGB", flags=ImageCms.Flags.NOCACHE
        )
    except (OSError, ImageCms.PyCMSError, ValueError) as exc:
        raise ProfileError(f"embedded ICC colour profile cannot be applied: {exc}") from exc
    return None if mode != "CMYK" and _renders_as_srgb(transform, mode) else transform


def _renders_as_srgb(transform, mode: str) -> bool:
    """Whether ``transform`` keeps every code value (a 16-level grid of RGB, every grey) within tolerance."""
    from PIL import ImageCms

    levels = np.arange(0, 256, 17, dtype=np.uint8)  # 0, 17, ..., 255
    if mode == "RGB":
        grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(64, 64, 3)
    else:
        grid = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    rendered = np.asarray(ImageCms.applyTransform(Image.fromarray(grid[..., 0] if mode == "L" else grid), transform))
    return bool(np.abs(rendered.astype(np.int16) - grid).max() <= _IDENTITY_TOLERANCE)


def render(image: Image.Image, transform) -> Image.Image:
    """``image`` (the transform's input mode) rendered to sRGB: an ``RGB`` image."""
    from PIL import ImageCms

    rendered = ImageCms.applyTransform(image, transform)
    if rendered is None:  # only with inPlace=True
        raise ProfileError("the colour transform returned no image")
    return rendered


def render_array(pixels: np.ndarray, transform) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB pixels rendered to sRGB by an RGB ``transform``; the same shape and dtype."""
    return np.asarray(render(Image.fromarray(np.ascontiguousarray(pixels)), transform))
