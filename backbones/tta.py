"""Test-time augmentation (TTA) computed inside the exported model: which views, and at what decode size.

A TTA mode names the views of each image that the backbone embeds; the exported ONNX model takes the
decoded image, makes the views in its own graph, runs the backbone on all of them as one batch and
returns the mean embedding. So the mode is part of the model-store key, hence of the feature set's
identity, and every consumer of the model (extract, score, the fused classifier) applies the same views.

- ``none``: the image as decoded, ``size`` x ``size``.
- ``flip``: the image and its mirror (reversed along the width): 2 views.
- ``flip+crops``: the ten-crop protocol (Krizhevsky et al., 2012; the usual ImageNet evaluation of
  "resize 256, crop 224"): the model takes a larger decode of ``round(size / 0.875)`` pixels (256 for
  224) and takes five ``size`` x ``size`` crops (the centre and the four corners) and their mirrors:
  10 views. The crops are slices of a larger decode rather than smaller crops resized back to ``size``
  inside the graph: slicing is exact (the ONNX graph matches Keras to float rounding, with no resampling
  convention to disagree on), and each crop keeps the full pixel density the backbone was trained on
  instead of being upsampled by 1/0.875. The price is a decode at 256 instead of 224 (about 1.3x the
  resize work) on top of 10x the backbone work.
"""

from __future__ import annotations

import numpy as np

from tlpipe.errors import InputError

__all__ = ["CROP_FRACTION", "TTA_MODES", "check_tta", "crop_offsets", "decode_size", "make_views", "slug", "view_count"]

TTA_MODES = ("none", "flip", "flip+crops")
CROP_FRACTION = 0.875  # crop side / decode side for flip+crops (224 / 256)
_VIEWS = {"none": 1, "flip": 2, "flip+crops": 10}


def check_tta(mode: str) -> str:
    """``mode`` if it is a TTA mode, else ValueError naming the choices."""
    if mode not in TTA_MODES:
        raise InputError(f"unknown TTA mode {mode!r}; choose one of {', '.join(TTA_MODES)}")
    return mode


def view_count(mode: str) -> int:
    """Views per image the backbone runs for ``mode`` (its inference cost relative to ``none``)."""
    return _VIEWS[check_tta(mode)]


def decode_size(size: int, mode: str) -> int:
    """The side of the square image the model takes: ``size``, or ``round(size / 0.875)`` for flip+crops."""
    check_tta(mode)
    return int(round(size / CROP_FRACTION)) if mode == "flip+crops" else size


def crop_offsets(size: int, mode: str) -> list[tuple[int, int]]:
    """(top, left) of each crop in the decoded image, centre first then the four corners."""
    full = decode_size(size, mode)
    if full == size:
        return [(0, 0)]
    centre = (full - size) // 2
    far = full - size
    return [(centre, centre), (0, 0), (0, far), (far, 0), (far, far)]


def slug(mode: str) -> str:
    """The mode as it appears in a model-store key (no ``+``)."""
    return check_tta(mode).replace("+", "_")


def make_views(images: np.ndarray, size: int, mode: str) -> np.ndarray:
    """NumPy reference of the views the exported graph makes: (N, R, R, C) -> (V, N, size, size, C).

    Views are the crops of :func:`crop_offsets` in order, then (flip modes) their mirrors in the same order.
    """
    full = decode_size(size, mode)
    if images.shape[1:3] != (full, full):
        raise InputError(f"TTA {mode!r} at {size} px takes {full} x {full} images, not {images.shape[1:3]}")
    crops = [images[:, top : top + size, left : left + size] for top, left in crop_offsets(size, mode)]
    if mode != "none":
        crops += [c[:, :, ::-1] for c in crops]
    return np.stack(crops)
