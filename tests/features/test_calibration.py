"""Calibration samples from the user's photos, and extraction at int8 / fp16 (its own feature set, reused)."""

import numpy as np
import pytest

from tests.conftest import shared_path, write_photo_folder
from tlpipe.features.cache import list_feature_sets, read_feature_set
from tlpipe.features.calibration import MIN_IMAGES, sample_images
from tlpipe.features.extract import extract
from tlpipe.features.sources import discover


def test_sample_is_seeded_disjoint_and_at_the_model_size(tmp_path):
    records = discover(write_photo_folder(tmp_path / "p", per_class=15)).records
    a, b = sample_images(records, 48), sample_images(records, 48)
    assert a.identity == b.identity and np.array_equal(a.calibration, b.calibration)
    assert len(a.calibration) == 20 and len(a.held) == 10  # 2:1 when fewer than asked for
    assert a.calibration.shape[1:] == (48, 48, 3) and a.calibration.dtype == np.uint8
    calibration = {x.tobytes() for x in a.calibration}
    assert not calibration.intersection(x.tobytes() for x in a.held)
    assert sample_images(records, 48, seed=1).identity != a.identity


def test_sample_is_decoded_with_the_runs_resize_filter(tmp_path):
    """An int8 variant calibrated for an antialiased feature set sees antialiased pixels, as extraction does."""
    from tlpipe.features.decoder import decode_record

    records = discover(write_photo_folder(tmp_path / "p", per_class=15)).records
    bilinear = sample_images(records, 48)
    antialias = sample_images(records, 48, resize_filter="antialias")
    assert bilinear.identity == antialias.identity  # the same photos...
    assert not np.array_equal(bilinear.calibration, antialias.calibration)  # ...decoded differently
    by_pixels = {decode_record(r, 48, "squash", resize_filter="antialias").pixels.tobytes() for r in records}
    assert all(x.tobytes() in by_pixels for x in antialias.calibration)


def test_too_few_images_is_a_clear_error(tmp_path):
    records = discover(write_photo_folder(tmp_path / "p", per_class=3)).records
    with pytest.raises(ValueError, match=f"at least {MIN_IMAGES}"):
        sample_images(records, 48)


def test_int8_extract_is_its_own_feature_set_and_is_reused_when_appending(tmp_path, tiny_entry, model_store):
    photos = write_photo_folder(tmp_path / "p", per_class=12)
    out = tmp_path / "cache.h5"
    fp32 = extract(photos, out, model=str(tiny_entry.directory), store=model_store)
    int8 = extract(photos, out, model=str(tiny_entry.directory), store=model_store, precision="int8")
    assert int8.key != fp32.key and "int8" in int8.key and int8.embedded == 24
    assert sorted(list_feature_sets(out)) == sorted([fp32.key, int8.key])
    a, b = read_feature_set(out, fp32.key), read_feature_set(out, int8.key)
    order = np.argsort(b.sha256)[np.searchsorted(b.sha256[np.argsort(b.sha256)], a.sha256)]
    cos = np.sum(a.X * b.X[order], 1) / np.linalg.norm(a.X, axis=1) / np.linalg.norm(b.X[order], axis=1)
    assert cos.mean() >= 0.99
    assert b.metadata["precision"] == "int8" and b.metadata["base_key"] == tiny_entry.key
    more = write_photo_folder(tmp_path / "more", per_class=2, seed=5)  # another source: the same int8 model
    again = extract(more, out, model=str(tiny_entry.directory), store=model_store, precision="int8")
    assert again.key == int8.key and again.embedded == 4


def test_unknown_precision_is_refused_before_the_cache_is_touched(tmp_path, tiny_entry, photo_folder):
    out = tmp_path / "cache.h5"
    with pytest.raises(ValueError, match="precision"):
        extract(photo_folder, out, model=str(tiny_entry.directory), precision="int4")
    assert not out.exists()


@pytest.mark.shared
@pytest.mark.slow
def test_int8_features_train_as_good_a_head_as_fp32(tmp_path, cats_dogs_cache, model_store):
    """cats_vs_dogs with the real MobileNetV2: int8 (calibrated on the photos themselves) stays at mean cosine
    >= 0.99 to fp32, and a logistic-regression probe on int8 features is within 1 point of fp32's accuracy."""
    import shutil

    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    manifest = shared_path("datasets", "cats_vs_dogs", "manifest.csv")
    weights = shared_path("weights", "mobilenet_v2_1.0_224_no_top.h5")
    cache = shutil.copy(cats_dogs_cache, tmp_path / "cache.h5")  # the session's cache keeps one feature set
    summary = extract(
        manifest, cache, backbone="mobilenet_v2", weights=weights, store=model_store, device="cpu", precision="int8"
    )
    fp32_key = next(k for k in list_feature_sets(cache) if "int8" not in k)
    a, b = read_feature_set(cache, fp32_key), read_feature_set(cache, summary.key)
    assert list(a.sha256) == list(b.sha256)  # same image rows, in the same order
    cos = np.sum(a.X * b.X, 1) / np.linalg.norm(a.X, axis=1) / np.linalg.norm(b.X, axis=1)
    assert cos.mean() >= 0.99, (cos.mean(), cos.min())
    scores = {}
    for name, fs in (("fp32", a), ("int8", b)):
        train, test = fs.split == "train", fs.split == "test"
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        scores[name] = probe.fit(fs.X[train], fs.y[train]).score(fs.X[test], fs.y[test])
    assert scores["fp32"] > 0.9 and abs(scores["int8"] - scores["fp32"]) <= 0.01, scores
