"""extract --augment N: seeded views per image (content hash + view index), stored beside the feature set in
the cache, used as extra training rows only, grouped by image so that no view of an evaluation image is
ever trained on."""

import h5py
import numpy as np
import pytest

from tlpipe.features.augment import augment_image
from tlpipe.features.cache import CacheError, FeatureSet, read_feature_set, read_views
from tlpipe.pipeline.heads.estimators import add_views, cross_validate, cv_folds, fit_head, select_split, views_within

SHA_A, SHA_B = "a" * 64, "0123456789abcdef" * 4


def photo(size: int = 64) -> np.ndarray:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    return np.asarray(Image.fromarray(load_sample_images().images[1]).resize((size, size)))


def test_views_are_deterministic_in_content_view_and_seed():
    pixels = photo()
    view = augment_image(pixels, SHA_A, 0)
    assert view.shape == pixels.shape and view.dtype == np.uint8
    np.testing.assert_array_equal(view, augment_image(pixels.copy(), SHA_A, 0))  # no hidden state, no order
    others = [augment_image(pixels, SHA_A, 1), augment_image(pixels, SHA_B, 0), augment_image(pixels, SHA_A, 0, seed=1)]
    for other in others:
        assert np.abs(other.astype(int) - view).mean() > 2  # another view, another image, another seed
    assert np.abs(view.astype(int) - pixels).mean() > 2  # it is augmented
    with pytest.raises(ValueError, match="uint8"):
        augment_image(pixels.astype(np.float32), SHA_A, 0)


def test_add_views_takes_only_views_of_training_images():
    X = np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    y = np.array([0, 1] * 5)
    owner = np.repeat(np.arange(10), 2)  # two views per image; a view's value is 100 + its image
    views = (100 + X[owner], owner)
    train = np.array([0, 3, 4, 7])
    X_fit, y_fit, groups = add_views(X, y, train, views)
    assert len(X_fit) == 4 + 8 and sorted(set(groups.tolist())) == [0, 3, 4, 7]
    np.testing.assert_array_equal(X_fit[:4], X[train])  # originals first
    np.testing.assert_array_equal(np.sort(X_fit[4:, 0] - 100), np.repeat(train, 2))
    np.testing.assert_array_equal(y_fit[4:], y[owner[np.isin(owner, train)]])  # a view carries its image's label
    # re-indexed to a subset of rows: only views of images in the subset, owners as positions in it
    X_sub, owner_sub = views_within(views, np.array([7, 2, 5]))
    assert len(X_sub) == 6 and sorted(owner_sub.tolist()) == [0, 0, 1, 1, 2, 2]
    np.testing.assert_array_equal(X_sub[:, 0] - 100, np.array([7, 2, 5])[owner_sub])


def noise_set(n: int = 60, dim: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)).astype(np.float32), rng.integers(0, 2, n)


def test_no_view_of_an_evaluation_image_is_trained_on():
    """Labels are random, so nothing generalises; the views are copies of their images, so a head that had
    trained on the views of its test images would recall their labels (C=1 memorises 200-d noise)."""
    X, y = noise_set()
    owner = np.repeat(np.arange(len(X)), 3)
    views = (X[owner] + 1e-3, owner)
    points = cross_validate(X, y, ["logreg"], cv=3, seed=0, search=True, n_jobs=1, views=views)
    memorising = [p for p in points if p.params["C"] == 1.0]
    assert len(memorising) == 3 and max(p.accuracy for p in memorising) < 0.8
    # the same folds, but with the views of *every* image in training (what a leak would be), recall them
    leak = [
        np.mean(
            fit_head(np.vstack([X[tr], views[0]]), np.concatenate([y[tr], y[owner]]), "logreg", params={"C": 1.0})[
                0
            ].predict(X[te])
            == y[te]
        )
        for tr, te in cv_folds(y, 3, 0)
    ]
    assert min(leak) > 0.95
    # a hold-out: views re-indexed to the training rows; the hold-out images' views are left out
    train, test = np.arange(40), np.arange(40, 60)
    head, info = fit_head(X[train], y[train], "logreg", params={"C": 1.0}, views=views_within(views, train))
    assert info["augmented_views"] == 3 * 40
    assert np.mean(head.predict(X[test]) == y[test]) < 0.8


def test_compare_with_views_scores_originals_and_trains_on_training_views_only():
    from tlpipe.pipeline.heads.selection import compare_heads

    X, y = noise_set(80)
    n = len(X)
    fs = FeatureSet(
        key="k",
        X=X,
        y=y.astype(np.int32),
        split=np.array(["train"] * 60 + ["test"] * 20),
        paths=np.array([f"{i}.jpg" for i in range(n)]),
        sha256=np.array([f"{i:064x}" for i in range(n)]),
        class_names=["a", "b"],
    )
    owner = np.repeat(np.arange(n), 2)
    from tlpipe.features.cache import Views

    views = Views(X=X[owner] + 1e-3, owner=owner, view=np.tile([0, 1], n), views=2)
    result = compare_heads(fs, ["logreg"], cv=3, n_jobs=1, views=views, learning_curve=False)
    assert "plus 120 augmented views" in result.setup  # 2 views x 60 training images, none of the 20 held out
    assert result.holdout["rows"] == 20 and result.holdout["accuracy"] < 0.85


@pytest.mark.slow
def test_extract_augment_stores_seeded_views_beside_the_feature_set(tmp_path, model_store, tiny_entry):
    import onnxruntime as ort

    from tests.conftest import write_photo_folder
    from tlpipe.features.extract import extract
    from tlpipe.features.images import load_image
    from tlpipe.pipeline.heads.fit import train_head

    photos = write_photo_folder(tmp_path / "photos", per_class=5)
    cache = tmp_path / "cache.h5"
    extract(photos, cache, model=str(tiny_entry.directory))  # a cache made before any augmentation
    plain = read_feature_set(cache)
    assert read_views(cache, plain) is None
    summary = extract(photos, cache, model=str(tiny_entry.directory), augment=2)
    assert summary.cached == 10 and summary.augmented[0].embedded == 20
    fs = read_feature_set(cache)
    views = read_views(cache, fs)
    assert len(views) == 20 and views.views == 2 and views.seed == 0
    assert sorted(np.bincount(views.owner).tolist()) == [2] * 10 and set(views.view.tolist()) == {0, 1}
    # a stored view is the model on augment_image(decoded image, its sha256, view index)
    i = 3
    path = photos / fs.paths[views.owner[i]]
    pixels = load_image(path, 64)[0]
    session = ort.InferenceSession(str(tiny_entry.model_path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"images": augment_image(pixels, fs.sha256[views.owner[i]], int(views.view[i]))[None]})
    np.testing.assert_allclose(views.X[i], expected[0][0], rtol=1e-4, atol=1e-6 * np.abs(expected[0]).max())
    # more views later: only the missing ones are embedded, the stored ones are kept
    again = extract(photos, cache, model=str(tiny_entry.directory), augment=3)
    assert again.augmented[0].embedded == 10 and again.augmented[0].cached == 0
    grown = read_views(cache, fs)
    np.testing.assert_array_equal(grown.X[:20], views.X)
    assert len(grown) == 30 and grown.views == 3
    # another seed would mix two sets of views: refused with a reason
    with pytest.raises(CacheError, match="seed 0"):
        extract(photos, cache, model=str(tiny_entry.directory), augment=3, augment_seed=7)
    with h5py.File(cache, "r") as f:  # the originals are untouched and the views live outside /features
        assert list(f["augmented"]) == [fs.key] and int(f["features"][fs.key].attrs["count"]) == 10
    # fit-head --use-augmented: the training images' views only
    result = train_head(cache, "logreg", tmp_path / "head.joblib", use_augmented=True)
    train, _, _ = select_split(fs, seed=0)
    assert result.info["augmented_views"] == 3 * len(train) and "augmented views" in result.setup


def test_augmented_rows_past_the_committed_count_are_cut_on_open(tmp_path):
    """A writer killed between appending views and advancing the count leaves a tail: not part of the cache."""
    from tlpipe.features.augment import AUGMENT_RECIPE
    from tlpipe.features.cache import CacheWriter, ImageRow, describe

    cache = tmp_path / "cache.h5"
    rows = [ImageRow(f"{i}.jpg", f"{i:064x}", "a" if i % 2 else "b", "train", 8, 8) for i in range(4)]
    with CacheWriter(cache) as writer:
        writer.ensure_feature_set("k", 3)
        writer.add("k", rows, np.arange(12, dtype=np.float32).reshape(4, 3))
        writer.ensure_augmented("k", 2, 0, AUGMENT_RECIPE)
        writer.add_augmented("k", [0, 0, 1], [0, 1, 0], np.ones((3, 3), np.float32))
    with h5py.File(cache, "r+") as f:  # the tail of an append whose count was never advanced
        group = f["augmented/k"]
        for name in ("embeddings", "image_row", "view"):
            group[name].resize(5, axis=0)
        group["image_row"][3:] = [2, 3]
    fs = read_feature_set(cache)
    assert len(read_views(cache, fs)) == 3  # readers stop at the committed count
    with CacheWriter(cache) as writer:  # a writer cuts the tail back
        assert writer.augmented_views("k") == {0: {0, 1}, 1: {0}}
    with h5py.File(cache, "r") as f:
        assert f["augmented/k/view"].shape == (3,)
    assert describe(cache)["feature_sets"]["k"]["augmented"] == {"rows": 3, "views": 2, "seed": 0}
