"""Augmented views for training: ``extract --augment N`` embeds N randomly augmented copies of every image.

Each view is made from the image's decoded, resized uint8 pixels (the model's input, as extraction makes it)
by one affine warp and a colour jitter, with OpenCV and NumPy:

- a random resized crop: a window of 60-100 % of the image's area, aspect ratio 3/4-4/3 (log-uniform),
  anywhere inside the image, scaled back to the full side (Szegedy et al., 2015: "Inception" cropping, the
  usual training augmentation, here milder because the embedding is frozen);
- a rotation by up to ±10 degrees about the window's centre (reflected borders, no black corners);
- a horizontal flip with probability 1/2;
- brightness, contrast and saturation each scaled by a factor in [0.8, 1.2] (in that order; contrast
  blends with the mean grey, saturation with the luma image), rounded back to uint8.

The random draws come from ``numpy.random.default_rng([seed, view, int(sha256, 16)])``: a view depends only
on the image's content hash, the view index and the seed, never on the order of the images, the batch or
the run, so an interrupted run resumes with the same views and two caches agree.

The views are stored beside their feature set (``/augmented/<key>`` in the cache, see
:mod:`tlpipe.features.cache`), never in it: they are extra **training** rows for ``compare`` and
``fit-head --use-augmented``, which add a view to a training set only when its image is in that training
set (:func:`tlpipe.pipeline.heads.estimators.add_views`); evaluation rows are always the original images.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tlpipe.backbones.store import StoreEntry
from tlpipe.errors import InputError

from .cache import CacheWriter
from .decoder import iter_decoded
from .fastdecode import DEFAULT_RESIZE_FILTER
from .sources import ImageRecord

__all__ = ["AUGMENT_RECIPE", "AugmentSummary", "augment_image", "augment_views", "extract_augmented"]
log = logging.getLogger(__name__)

# The recipe is recorded with the views (a change of any value is another set of views: bump "version").
AUGMENT_RECIPE: dict[str, Any] = {
    "version": 1,
    "crop_area": [0.6, 1.0],
    "crop_aspect": [0.75, 4 / 3],
    "rotation_degrees": 10.0,
    "flip_probability": 0.5,
    "brightness": [0.8, 1.2],
    "contrast": [0.8, 1.2],
    "saturation": [0.8, 1.2],
}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as Pillow's convert("L")


def view_rng(sha256: str, view: int, seed: int = 0) -> np.random.Generator:
    """The generator of one view: seeded by (seed, view index, the image's sha256 as an integer)."""
    return np.random.default_rng([int(seed), int(view), int(sha256, 16)])


def augment_image(pixels: np.ndarray, sha256: str, view: int, seed: int = 0) -> np.ndarray:
    """One augmented view of an image (:data:`AUGMENT_RECIPE`), deterministic in (sha256, view, seed).

    Parameters
    ----------
    pixels : numpy.ndarray
        (H, W, 3) uint8 RGB: the image as the model takes it (decoded and resized by extraction).
    sha256 : str
        Hex digest of the image file's bytes (its identity in the cache).
    view : int
        View index, 0 .. N-1.
    seed : int
        Seed of the whole set of views.

    Returns
    -------
    numpy.ndarray
        (H, W, 3) uint8 RGB, the same shape as ``pixels``.
    """
    import cv2

    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise InputError(f"expected (H, W, 3) uint8 pixels, got {pixels.dtype} {pixels.shape}")
    r = AUGMENT_RECIPE
    rng = view_rng(sha256, view, seed)
    h, w = pixels.shape[:2]
    area = rng.uniform(*r["crop_area"])
    aspect = np.exp(rng.uniform(np.log(r["crop_aspect"][0]), np.log(r["crop_aspect"][1])))
    cw, ch = min(1.0, np.sqrt(area * aspect)) * w, min(1.0, np.sqrt(area / aspect)) * h
    cx, cy = rng.uniform(cw / 2, w - cw / 2), rng.uniform(ch / 2, h - ch / 2)
    angle = np.deg2rad(rng.uniform(-r["rotation_degrees"], r["rotation_degrees"]))
    flip = rng.random() < r["flip_probability"]
    factors = [rng.uniform(*r[k]) for k in ("brightness", "contrast", "saturation")]
    # output pixel (u, v) <- source point centre + R(angle) . diag(sx, sy) . ((u, v) - output centre)
    sx, sy = cw / w * (-1.0 if flip else 1.0), ch / h
    cos, sin = np.cos(angle), np.sin(angle)
    a = np.array([[cos * sx, -sin * sy], [sin * sx, cos * sy]])
    centre_out = np.array([(w - 1) / 2, (h - 1) / 2])
    offset = np.array([cx - 0.5, cy - 0.5]) - a @ centre_out
    matrix = np.hstack([a, offset[:, None]]).astype(np.float64)
    warped = cv2.warpAffine(
        pixels, matrix, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT_101
    )
    x = warped.astype(np.float32) * factors[0]
    grey = x @ _LUMA
    x = (x - grey.mean()) * factors[1] + grey.mean()
    grey = (x @ _LUMA)[..., None]
    x = (x - grey) * factors[2] + grey
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def augment_views(pixels: np.ndarray, sha256: str, views: Sequence[int], seed: int = 0) -> np.ndarray:
    """Views ``views`` (indices) of one image: (len(views), H, W, 3) uint8 (see :func:`augment_image`)."""
    return np.stack([augment_image(pixels, sha256, v, seed) for v in views])


@dataclass
class AugmentSummary:
    """What an augmented extraction did: images and views embedded now, views already stored, seconds."""

    key: str
    views: int
    seed: int
    images: int = 0  # images whose missing views were embedded now
    embedded: int = 0  # views embedded now
    cached: int = 0  # images whose N views were all stored already
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def extract_augmented(
    records: Sequence[ImageRecord],
    out: str | os.PathLike,
    entry: StoreEntry,
    key: str,
    *,
    views: int,
    seed: int = 0,
    resize: str = "squash",
    resize_filter: str = DEFAULT_RESIZE_FILTER,
    batch_size: int = 32,
    dtype: str = "float32",
    device: str = "auto",
    threads: int | None = None,
    workers: int | None = None,
) -> AugmentSummary:
    """Embed ``views`` augmented views of every image of feature set ``key`` into the cache's augmented rows.

    Parameters
    ----------
    records : sequence of ImageRecord
        The images (as listed for the extract that filled ``key``); contents the feature set does not hold
        (failed images) are passed over.
    out : path
        The cache.
    entry : StoreEntry
        The model of feature set ``key`` (the views go through the same graph, TTA included).
    key : str
        The feature set (its original rows must be extracted first).
    views : int
        Views per image (N >= 1); views already stored are kept, so N can grow between runs.
    seed : int
        Seed of the views (:func:`augment_image`); a cache keeps one seed and recipe per feature set.
    resize, resize_filter
        As the feature set was extracted (its identity): the views start from the same pixels.
    batch_size : int
        Views per model call and per commit.
    dtype, device, threads, workers
        Storage dtype; ONNX Runtime device and threads; decode threads.

    Returns
    -------
    AugmentSummary

    Raises
    ------
    tlpipe.features.cache.CacheError
        The feature set is missing, or its stored views were made with another seed or recipe.
    """
    from tlpipe.backbones.runtime import OnnxEmbedder

    if views < 1:
        raise InputError(f"--augment takes a number of views >= 1, not {views}")
    started = time.perf_counter()
    summary = AugmentSummary(key, views, seed)
    embedder = OnnxEmbedder(entry.model_path, device=device, threads=threads)
    with CacheWriter(out) as writer:
        writer.ensure_augmented(key, views, seed, AUGMENT_RECIPE, dtype)
        have = writer.augmented_views(key)  # image row -> view indices stored
        rows = writer.rows_with(key)
        index = writer.index
        wanted = set(range(views))

        def done(sha: str) -> bool:
            row = index.get(sha)
            return row is None or row not in rows or wanted <= have.get(row, set())

        batch_rows: list[int] = []
        batch_views: list[int] = []
        batch_pixels: list[np.ndarray] = []

        def flush() -> None:
            if batch_pixels:
                embeddings = embedder(np.stack(batch_pixels))
                writer.add_augmented(key, batch_rows, batch_views, embeddings)
                summary.embedded += len(batch_pixels)
                batch_rows.clear()
                batch_views.clear()
                batch_pixels.clear()

        seen: set[str] = set()
        for decoded in iter_decoded(
            records, entry.input_size, resize, done, workers=workers, resize_filter=resize_filter
        ):
            if decoded.known and decoded.sha256 and decoded.sha256 not in seen and decoded.sha256 in index:
                summary.cached += index[decoded.sha256] in rows
            if decoded.pixels is None or decoded.sha256 in seen:
                continue
            # one input size asked of iter_decoded: one array per image, never a tuple
            assert isinstance(decoded.pixels, np.ndarray)
            seen.add(decoded.sha256)
            row = index[decoded.sha256]
            missing = sorted(wanted - have.get(row, set()))
            for view, pixels in zip(missing, augment_views(decoded.pixels, decoded.sha256, missing, seed)):
                batch_rows.append(row)
                batch_views.append(view)
                batch_pixels.append(pixels)
                if len(batch_pixels) >= batch_size:
                    flush()
            summary.images += 1
        flush()
    summary.seconds = time.perf_counter() - started
    log.info(
        "augmented views of %s: %d images, %d views embedded (%s)",
        key,
        summary.images,
        summary.embedded,
        json.dumps({"views": views, "seed": seed}),
    )
    return summary
