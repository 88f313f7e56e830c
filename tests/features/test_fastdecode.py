"""The fast decode path (libjpeg-turbo + OpenCV) against the Pillow path, its fallbacks, the two resize
filters, and the filter as part of a feature set's identity (real files, real ONNX sessions, real caches).

Tolerances: the fast path's decoded JPEG pixels are asserted within 1 grey level of Pillow's (measured: 0,
both are libjpeg-turbo's accurate integer IDCT at the same DCT scale); the bilinear filter within 1 grey
level of TensorFlow's non-antialiased ``tf.image.resize`` (uint8 rounding)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageCms

from tests.conftest import write_photo_folder
from tlpipe.features import fastdecode
from tlpipe.features.cache import CacheWriter, read_feature_set
from tlpipe.features.extract import extract
from tlpipe.features.images import _TRANSPOSE, MAX_PIXELS, ImageError, decode_image, resize_image

from .test_images import (
    GREEN,
    RED,
    close,
    damaged_jpegs,
    display_p3_profile,
    encode,
    photo,
    saturated_photo,
    srgb_reference,
)

pytestmark = pytest.mark.skipif(not fastdecode.available(), reason="simplejpeg / opencv-python-headless missing")


def pillow_reference(data: bytes, size: int, mode: str, resize_filter: str) -> np.ndarray:
    """What the Pillow path computes: open, draft, load, EXIF transpose, then the filter."""
    with Image.open(io.BytesIO(data)) as im:
        orientation = int(im.getexif().get(274, 1))
        im.draft("RGB", (size, size))
        rgb = im.convert("RGB")
    if orientation in _TRANSPOSE:
        rgb = rgb.transpose(_TRANSPOSE[orientation])
    return np.asarray(resize_image(rgb, size, mode, resize_filter))


@pytest.mark.parametrize(
    ("width", "height", "size", "scale"),
    [(480, 375, 224, 1), (900, 700, 224, 2), (1000, 1800, 224, 4), (1900, 1800, 224, 8), (2600, 900, 100, 8)],
)
@pytest.mark.parametrize("options", [{"subsampling": 2}, {"subsampling": 0}, {"subsampling": 1, "progressive": True}])
def test_fast_path_decodes_the_pillow_pixels(width, height, size, scale, options):
    data = encode(photo(width, height), "JPEG", quality=88, **options)
    assert fastdecode.dct_scale(width, height, size) == scale
    fast = fastdecode.decode_jpeg(data, size, MAX_PIXELS)
    assert fast is not None, "a plain JPEG must take the fast path"
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (size, size))  # Pillow's own DCT-domain scaling
        reference = np.asarray(im.convert("RGB"))
    assert fast[0].shape == reference.shape == (-(-height // scale), -(-width // scale), 3)
    assert np.abs(fast[0].astype(int) - reference).max() <= 1
    assert fast[1] == (width, height)
    for mode in ("squash", "crop"):
        for resize_filter in fastdecode.RESIZE_FILTERS:
            pixels, original = decode_image(data, size, mode, resize_filter=resize_filter)
            expected = pillow_reference(data, size, mode, resize_filter)
            assert pixels.shape == (size, size, 3) and pixels.dtype == np.uint8 and original == (width, height)
            assert np.abs(pixels.astype(int) - expected).max() <= 1, (mode, resize_filter)


INVERSE = {1: None, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_fast_path_applies_exif_orientation(orientation):
    upright = photo(120, 80, seed=orientation)
    upright.paste((255, 0, 0), (0, 0, 30, 20))  # a red top-left corner: any wrong flip or turn moves it
    stored = upright if INVERSE[orientation] is None else upright.transpose(_TRANSPOSE[INVERSE[orientation]])
    exif = Image.Exif()
    exif[274] = orientation
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    assert fastdecode.decode_jpeg(data, 40, MAX_PIXELS) is not None
    pixels, original = decode_image(data, 40)
    expected, _ = decode_image(encode(upright, "JPEG", quality=95), 40)
    assert original == (120, 80)
    assert np.abs(pixels.astype(int) - expected).mean() < 3
    assert tuple(pixels[2, 2]) > (200, -1, -1) and pixels[2, 2, 1] < 60  # red corner at the top left
    assert np.abs(pixels.astype(int) - pillow_reference(data, 40, "squash", "bilinear")).max() <= 1


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG")


def mpo() -> bytes:
    first, second = Image.new("RGB", (64, 48), RED), Image.new("RGB", (64, 48), GREEN)
    return encode(first, "MPO", save_all=True, append_images=[second])


def bad_orientation_jpeg() -> bytes:
    exif = Image.Exif()
    exif[274] = 9
    return encode(Image.new("RGB", (64, 48), RED), "JPEG", exif=exif.tobytes())


FALLBACKS = {
    "png": (lambda: encode(Image.new("RGB", (64, 48), RED), "PNG"), RED),
    "webp": (lambda: encode(Image.new("RGB", (64, 48), RED), "WEBP", lossless=True), RED),
    "tiff": (lambda: encode(Image.new("RGB", (64, 48), RED), "TIFF"), RED),
    "gif": (lambda: encode(Image.new("RGB", (64, 48), RED).convert("P"), "GIF"), RED),
    "cmyk-jpeg": (cmyk_jpeg, (255, 0, 0)),
    "grey-jpeg": (lambda: encode(Image.new("L", (64, 48), 90), "JPEG"), (90, 90, 90)),
    "mpo-first-frame": (mpo, RED),
    "orientation-9": (bad_orientation_jpeg, RED),
}


@pytest.mark.parametrize("case", sorted(FALLBACKS))
def test_unhandled_cases_take_the_pillow_path(case):
    make, colour = FALLBACKS[case]
    data = make()
    assert fastdecode.decode_jpeg(data, 32, MAX_PIXELS) is None
    for resize_filter in fastdecode.RESIZE_FILTERS:
        pixels, original = decode_image(data, 32, resize_filter=resize_filter)
        assert original == (64, 48) and close(pixels, colour, 14), (case, pixels.reshape(-1, 3).mean(0))


def test_jpegs_with_a_colour_profile_take_the_fast_path_rendered_to_srgb():
    # Before: any JPEG with an ICC profile left the fast path, and the Pillow path ignored the profile.
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    plain = encode(saturated_photo(), "JPEG", quality=95)
    tagged = encode(saturated_photo(), "JPEG", quality=95, icc_profile=srgb)
    fast = fastdecode.decode_jpeg(tagged, 128, MAX_PIXELS)
    assert fast is not None and np.array_equal(fast[0], fastdecode.decode_jpeg(plain, 128, MAX_PIXELS)[0])
    wide = encode(saturated_photo(), "JPEG", quality=95, icc_profile=display_p3_profile())
    assert fastdecode.decode_jpeg(wide, 128, MAX_PIXELS) is not None
    for size in (128, 40):  # no DCT scaling, then 1/4
        pixels, _ = decode_image(wide, size)
        with fastdecode.disabled():
            pillow, _ = decode_image(wide, size)
        assert np.abs(pixels.astype(int) - pillow).max() <= 1
    assert np.abs(decode_image(wide, 128)[0].astype(int) - srgb_reference(wide, 128, "bilinear")).max() <= 2


def test_the_fast_path_never_hands_out_damaged_pixels():
    for name, data in damaged_jpegs().items():
        assert fastdecode.decode_jpeg(data, 64, MAX_PIXELS) is None, name
        with fastdecode.disabled(), pytest.raises(ImageError, match="damaged image data"):
            decode_image(data, 64)  # the check is libjpeg-turbo's, not the fast path's: it stays on


def test_without_simplejpeg_the_missing_damage_check_is_named(tmp_path):
    """In a process where simplejpeg cannot be imported, JPEG data cannot be checked for damage (Pillow drops
    libjpeg's warnings): decoding says so by name, once."""
    import subprocess
    import sys

    path = tmp_path / "half.jpg"
    path.write_bytes(damaged_jpegs()["baseline-half-then-eoi"])
    code = (
        "import sys, logging; sys.modules['simplejpeg'] = None; logging.basicConfig()\n"
        "from tlpipe.features.images import load_image\n"
        f"for _ in range(3):\n    load_image({str(path)!r}, 32)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = [line for line in result.stderr.splitlines() if "simplejpeg" in line]
    assert len(lines) == 1 and "damage" in lines[0] and "tlpipe[decode]" in lines[0], result.stderr


def test_damaged_and_oversized_jpegs_keep_the_pillow_reasons():
    good = encode(photo(300, 200), "JPEG")
    truncated = good[: len(good) // 2]
    assert fastdecode.decode_jpeg(truncated, 32, MAX_PIXELS) is None
    with pytest.raises(ImageError, match="truncated"):
        decode_image(truncated, 32)
    assert fastdecode.decode_jpeg(good, 32, 300 * 200 - 1) is None
    with pytest.raises(ImageError, match="too large"):
        decode_image(good, 32, max_pixels=300 * 200 - 1)


def test_without_the_libraries_the_same_picture_comes_from_pillow_and_numpy():
    data = encode(photo(700, 500), "JPEG", quality=90)
    fast = [decode_image(data, size, mode)[0] for size in (96, 300) for mode in ("squash", "crop")]
    with fastdecode.disabled():  # as if simplejpeg and OpenCV were not installed
        assert not fastdecode.available() and fastdecode.decode_jpeg(data, 96, MAX_PIXELS) is None
        slow = [decode_image(data, size, mode)[0] for size in (96, 300) for mode in ("squash", "crop")]
    assert fastdecode.available()
    for ours, theirs in zip(fast, slow):
        assert np.abs(ours.astype(int) - theirs).max() <= 1


def test_bilinear_is_tensorflows_resize_without_antialiasing():
    tf = pytest.importorskip("tensorflow")
    pixels = np.asarray(photo(437, 311, seed=3))
    for size in (224, 250):  # downscale factors below 2: no box reduction, plain bilinear
        ours = fastdecode.resize_bilinear(pixels, size)
        theirs = tf.image.resize(pixels[None].astype(np.float32), (size, size), "bilinear", antialias=False)[0]
        assert np.abs(ours.astype(float) - np.round(theirs.numpy())).max() <= 1
    antialiased = np.asarray(resize_image(Image.fromarray(pixels), 150, resize_filter="antialias"))
    assert np.abs(antialiased.astype(int) - fastdecode.resize_bilinear(pixels, 150)).mean() > 0.5  # two filters


def test_bilinear_box_reduces_large_images_so_they_do_not_alias():
    stripes = np.zeros((1800, 1800, 3), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: plain bilinear at 1/8 would sample them into bands
    pixels, _ = decode_image(encode(Image.fromarray(stripes), "PNG"), 224)
    assert np.abs(pixels.astype(float) - 127.5).max() < 3


def test_unknown_filter_is_refused():
    with pytest.raises(ValueError, match="resize filter"):
        decode_image(encode(Image.new("RGB", (8, 8)), "PNG"), 8, resize_filter="bicubic")
    with pytest.raises(ValueError, match="resize.filter"):
        extract("/nonexistent", "/nonexistent/cache.h5", resize_filter="Bilinear")


# -- identity -----------------------------------------------------------------------------------------------
def test_filter_is_part_of_the_feature_set_identity(tmp_path, tiny_entry, model_store):
    photos = write_photo_folder(tmp_path / "photos", per_class=3)
    cache = tmp_path / "cache.h5"
    run = dict(model=str(tiny_entry.directory), store=model_store, device="cpu", batch_size=4)
    # A cache as tlpipe wrote it before the filter was recorded: antialiased pixels under the bare model key,
    # no resize_filter in the feature set's metadata.
    old = extract(photos, cache, resize_filter="antialias", **run)
    assert old.key == tiny_entry.key and old.embedded == 6
    with CacheWriter(cache) as writer:
        group = writer.file["features"][tiny_entry.key]
        meta = json.loads(group.attrs["metadata"])
        del meta["resize_filter"]
        group.attrs["metadata"] = json.dumps(meta)
    legacy = read_feature_set(cache, tiny_entry.key)
    assert fastdecode.recorded_resize_filter(legacy.metadata) == "antialias"

    new = extract(photos, cache, **run)  # the default filter: a new feature set, every image embedded again
    assert new.key == f"{tiny_entry.key}-filter-bilinear" and new.embedded == 6 and new.cached == 0
    fresh = read_feature_set(cache, new.key)
    assert fresh.metadata["resize_filter"] == "bilinear" and fresh.metadata["key"] == tiny_entry.key
    again = read_feature_set(cache, tiny_entry.key)
    assert len(again.X) == 6 and np.array_equal(again.X, legacy.X)  # the old rows untouched, none added
    order = [list(legacy.sha256).index(s) for s in fresh.sha256]
    gap = np.abs(fresh.X - legacy.X[order]).max() / np.abs(legacy.X).max()
    assert gap > 1e-3  # the two filters really give other embeddings

    assert extract(photos, cache, resize_filter="antialias", **run).cached == 6  # old identity still found
    assert extract(photos, cache, **run).cached == 6


def test_score_and_fused_model_use_the_heads_filter_and_refuse_another(tmp_path, tiny_entry, model_store):
    from tlpipe.pipeline.heads.estimators import make_head
    from tlpipe.pipeline.heads.persistence import save_head
    from tlpipe.pipeline.scoring.fuse import export_model
    from tlpipe.pipeline.scoring.score import ScoreError, fused_predictor, score

    photos = write_photo_folder(tmp_path / "photos", per_class=3)
    for resize_filter in fastdecode.RESIZE_FILTERS:
        cache = tmp_path / f"{resize_filter}.h5"
        extract(
            photos,
            cache,
            model=str(tiny_entry.directory),
            store=model_store,
            device="cpu",
            resize_filter=resize_filter,
        )
        fs = read_feature_set(cache)
        head = tmp_path / f"{resize_filter}.joblib"
        estimator = make_head("logreg").fit(fs.X, fs.y)
        save_head(estimator, head, feature_set=fs, metrics={}, params={})
        other = next(f for f in fastdecode.RESIZE_FILTERS if f != resize_filter)
        with pytest.raises(ScoreError, match="resize-filter"):
            score(
                photos,
                tmp_path / f"refused-{resize_filter}.csv",
                head=head,
                store=model_store,
                device="cpu",
                resize_filter=other,
            )
        out = tmp_path / f"{resize_filter}.jsonl"
        score(photos, out, head=head, store=model_store, device="cpu")  # decodes with the head's filter
        rows = {r["sha256"]: r for r in map(json.loads, out.read_text().splitlines())}
        proba = estimator.predict_proba(fs.X)
        for sha, p in zip(fs.sha256, proba):
            assert abs(rows[sha]["probability"] - p.max()) < 1e-4, resize_filter
        # the fused model carries the filter too, and scoring with it resizes the same way
        fused = tmp_path / f"{resize_filter}.onnx"
        assert export_model(head, fused, store=model_store)["resize_filter"] == resize_filter
        assert fused_predictor(fused).resize_filter == resize_filter
        with pytest.raises(ScoreError, match="resize-filter"):
            score(
                photos,
                tmp_path / f"refused-{resize_filter}-fused.csv",
                model=fused,
                device="cpu",
                resize_filter=other,
            )
        out = tmp_path / f"{resize_filter}-fused.jsonl"
        score(photos, out, model=fused, device="cpu")
        fused_rows = {r["sha256"]: r for r in map(json.loads, out.read_text().splitlines())}
        for sha, p in zip(fs.sha256, proba):
            assert abs(fused_rows[sha]["probability"] - p.max()) < 1e-4, resize_filter


def test_feature_set_key_grammar_composes_resize_mode_and_filter():
    from tlpipe.features.cache import feature_set_key

    # <model key>[-resize-<mode>][-filter-<filter>]: the settings caches were made with before (squash,
    # antialias) add nothing, so those keys keep their meaning
    assert feature_set_key("m", "squash", "antialias") == "m"
    assert feature_set_key("m", "crop", "antialias") == "m-resize-crop"
    assert feature_set_key("m") == feature_set_key("m", "squash", "bilinear") == "m-filter-bilinear"
    assert feature_set_key("m", "crop", "bilinear") == "m-resize-crop-filter-bilinear"
    with pytest.raises(ValueError, match="resize filter"):
        feature_set_key("m", "squash", "bicubic")
