"""Calibration and held-out images for reduced-precision backbones, taken from the user's own photos.

int8 is calibrated on a deterministic sample of the images being extracted (or of ``--images``), decoded
through the same resize path as extraction; a disjoint sample checks the result against fp32.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from tlpipe.backbones.choice import ModelChoice
from tlpipe.backbones.quantize import check_precision, find_variant, make_variant
from tlpipe.backbones.store import ModelStore, StoreEntry
from tlpipe.errors import InputError

from .decoder import iter_decoded
from .fastdecode import DEFAULT_RESIZE_FILTER
from .sources import ImageRecord

__all__ = [
    "CALIBRATION_IMAGES",
    "CalibrationSample",
    "HELD_IMAGES",
    "MIN_IMAGES",
    "resolve_entry",
    "sample_images",
    "variant_for",
]

CALIBRATION_IMAGES = 64
HELD_IMAGES = 64
MIN_IMAGES = 16


class CalibrationSample:
    """Decoded calibration and held-out images, and an id naming the calibration content."""

    def __init__(self, calibration: np.ndarray, held: np.ndarray, identity: str):
        self.calibration, self.held, self.identity = calibration, held, identity


def sample_images(
    records: Sequence[ImageRecord],
    size: int,
    resize: str = "squash",
    *,
    calibration: int = CALIBRATION_IMAGES,
    held: int = HELD_IMAGES,
    seed: int = 0,
    resize_filter: str = DEFAULT_RESIZE_FILTER,
) -> CalibrationSample:
    """A seeded random sample of ``records``, split into calibration and held-out images (2:1 when there are
    fewer than asked for), decoded as the run decodes (``resize``, ``resize_filter``): (N, size, size, 3) uint8.
    Unreadable images are passed over. Raises ValueError below :data:`MIN_IMAGES`."""
    order = np.random.default_rng(seed).permutation(len(records))
    wanted = calibration + held
    decoded: list[tuple[str, np.ndarray]] = []
    seen: set[str] = set()
    for start in range(0, len(order), wanted):
        chunk = [records[i] for i in order[start : start + wanted]]
        for loaded in iter_decoded(chunk, size, resize, resize_filter=resize_filter):
            if isinstance(loaded.pixels, np.ndarray) and loaded.sha256 not in seen:
                seen.add(loaded.sha256)
                decoded.append((loaded.sha256, loaded.pixels))
        if len(decoded) >= wanted:
            break
    decoded = decoded[:wanted]
    if len(decoded) < MIN_IMAGES:
        raise InputError(
            f"calibrating a reduced-precision model needs at least {MIN_IMAGES} distinct readable images; "
            f"found {len(decoded)}"
        )
    cut = calibration if len(decoded) == wanted else (2 * len(decoded)) // 3
    calib, hold = decoded[:cut], decoded[cut:]
    identity = hashlib.sha256("\n".join(sorted(sha for sha, _ in calib)).encode()).hexdigest()[:16]
    return CalibrationSample(np.stack([p for _, p in calib]), np.stack([p for _, p in hold]), identity)


def variant_for(
    base: StoreEntry,
    precision: str,
    store: ModelStore,
    records: Sequence[ImageRecord] | None,
    resize: str = "squash",
    recalibrate: bool = False,
    resize_filter: str = DEFAULT_RESIZE_FILTER,
) -> StoreEntry:
    """The ``precision`` variant of ``base``: the stored one when there is one (so a cache keeps one feature set
    across runs), else made now, calibrated and verified on a sample of ``records`` decoded with ``resize`` and
    ``resize_filter`` (as the run decodes). fp16 needs no calibration: without ``records`` it is checked on the
    photos bundled with scikit-learn."""
    check_precision(precision)
    if precision == "fp32":
        return base
    if not recalibrate and (found := find_variant(store, base, precision)) is not None:
        found.verify()
        return found
    if not records:
        if precision == "int8":
            raise InputError("int8 is calibrated on your own photos: give a folder or manifest of them (--images)")
        from tlpipe.backbones.export import verification_images

        return make_variant(base, precision, store, held=verification_images(base.input_size, 16))
    sample = sample_images(records, base.input_size, resize, resize_filter=resize_filter)
    return make_variant(
        base, precision, store, held=sample.held, calibration=sample.calibration, calibration_id=sample.identity
    )


def resolve_entry(
    choice: ModelChoice,
    records: Sequence[ImageRecord] | None = None,
    resize: str = "squash",
    recalibrate: bool = False,
    resize_filter: str = DEFAULT_RESIZE_FILTER,
) -> StoreEntry:
    """The model-store entry a run uses: ``choice``'s fp32 export, or its int8 / fp16 variant.

    Parameters
    ----------
    choice : ModelChoice
        Which model, at which precision.
    records : sequence of ImageRecord, optional
        The user's photos: int8 is calibrated (and a variant checked) on a sample of them.
    resize : str
        "squash" | "crop", as the run decodes.
    recalibrate : bool
        Make the variant again even when the store holds one.
    resize_filter : str
        "bilinear" | "antialias", as the run decodes (the calibration sample is decoded the same way).

    Returns
    -------
    StoreEntry

    Raises
    ------
    ValueError
        Unknown precision; int8 without ``records``; fewer than :data:`MIN_IMAGES` readable photos.
    tlpipe.backbones.export.VerificationError
        The variant does not match fp32 closely enough.
    """
    check_precision(choice.precision)
    entry = choice.obtain()
    if choice.precision == "fp32":
        return entry
    return variant_for(entry, choice.precision, choice.model_store, records, resize, recalibrate, resize_filter)
