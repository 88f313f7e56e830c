"""Several feature sets in one extract pass (sizes x layers, TTA), each identical to a one-at-a-time extract;
decoding several sizes from one read; the sweep of every head on every feature set."""

import io
import json

import h5py
import numpy as np
import pytest
from PIL import Image

from tlpipe.features.images import decode_image, decode_image_sizes


@pytest.mark.parametrize("shape", [(1000, 800), (480, 375), (90, 60)])
def test_decode_sizes_equals_decode_per_size(shape):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (*shape[::-1], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG")
    data = buffer.getvalue()
    sizes = (100, 224, 300)  # DCT scales 8, 2 (or 1) and 2 (or 1) on 1000x800: two decodes, three sizes
    arrays, original = decode_image_sizes(data, sizes)
    assert original == shape
    for size, array in zip(sizes, arrays):
        expected, _ = decode_image(data, size)
        np.testing.assert_array_equal(array, expected)


@pytest.mark.slow
def test_one_pass_fills_one_feature_set_per_size_and_layer(
    tmp_path, photo_folder, model_store, tiny_entry, monkeypatch
):
    from tlpipe.backbones.export import plan_export
    from tlpipe.features import decoder, fastdecode
    from tlpipe.features.cache import feature_set_key, read_feature_set
    from tlpipe.features.extract import extract

    reads, decodes = [], []  # every file read, and every libjpeg-turbo decode, during the extract
    read_file, decode_jpeg_sizes = decoder.read_file, fastdecode.decode_jpeg_sizes
    monkeypatch.setattr(decoder, "read_file", lambda path: reads.append(path) or read_file(path))
    monkeypatch.setattr(
        fastdecode,
        "decode_jpeg_sizes",
        lambda data, sizes, mp: decodes.append(sizes) or decode_jpeg_sizes(data, sizes, mp),
    )
    cache = tmp_path / "cache.h5"
    summary = extract(
        photo_folder,
        cache,
        backbone="mobilenet_v2_0.35",
        weights="none",
        sizes=[64, 72],
        layers=["block_12_add", None],
        tta="flip",
        store=model_store,
        batch_size=5,
    )
    monkeypatch.undo()
    # one pass: each of the 12 photos read once and decoded once for both sizes and both layers
    assert len(reads) == len(set(reads)) == 12
    assert len(decodes) == 12 and all(tuple(sizes) == (64, 72) for sizes in decodes)
    expected = [
        feature_set_key(plan_export("mobilenet_v2_0.35", "none", size, layer, tta="flip").key)
        for size in (64, 72)
        for layer in ("block_12_add", None)
    ]
    assert summary.keys == expected and summary.embedded == 12
    with h5py.File(cache, "r") as f:
        assert sorted(f["features"]) == sorted(expected)
        speed = json.loads(f["features"][expected[0]].attrs["extraction"])
        assert speed["images"] == 12 and speed["images_per_second"] > 0
        assert speed["feature_sets_in_pass"] == 4  # the sweep's cost column shares the pass among them
    # a one-layer, one-size extract of the same (size, layer, TTA) is the same feature set: nothing to embed
    again = extract(
        photo_folder, cache, backbone="mobilenet_v2_0.35", weights="none", size=72, tta="flip", store=model_store
    )
    assert again.key == expected[3] and again.cached == 12 and again.embedded == 0
    # and its embeddings equal what that one-output model gives on its own, in a fresh cache
    alone = tmp_path / "alone.h5"
    extract(
        photo_folder,
        alone,
        backbone="mobilenet_v2_0.35",
        weights="none",
        size=72,
        layer="block_12_add",
        tta="flip",
        store=model_store,
    )
    a, b = read_feature_set(cache, expected[2]), read_feature_set(alone, expected[2])
    order = np.argsort(a.sha256), np.argsort(b.sha256)
    np.testing.assert_allclose(a.X[order[0]], b.X[order[1]], rtol=1e-4, atol=1e-6 * np.abs(b.X).max())
    # the TTA feature sets differ from the plain one at the same size
    plain = tmp_path / "plain.h5"
    extract(photo_folder, plain, model=str(tiny_entry.directory))
    p = read_feature_set(plain)
    flip = read_feature_set(cache, expected[1])
    assert np.abs(p.X[np.argsort(p.sha256)] - flip.X[np.argsort(flip.sha256)]).max() > 0.01 * np.abs(p.X).max()

    # the sweep: every head on every feature set, pairs ranked, extraction cost attached
    from tlpipe.pipeline.heads.selection import extraction_records, is_sweep, matching_feature_sets, sweep
    from tlpipe.pipeline.reports.compare import write_sweep_report

    assert is_sweep("all") and is_sweep("mobilenet*") and not is_sweep(expected[0])
    assert matching_feature_sets(cache, "*-72-*") == sorted(expected[2:])
    result = sweep(cache, "all", ["logreg", "svm"], cv=3, n_jobs=1, holdout=False)
    assert len(result.rows) == 8 and result.images == 12
    accuracies = [r.accuracy for r in result.rows]
    assert accuracies == sorted(accuracies, reverse=True)
    # the pair to use: within one standard error of the top, the cheapest extraction (choose_pair)
    se = result.rows[0].accuracy_std / np.sqrt(3)
    close = [r for r in result.rows if r.accuracy >= result.rows[0].accuracy - se - 1e-12]
    assert result.best in close and result.best.extraction_ms == min(r.extraction_ms for r in close)
    assert result.why
    speeds = extraction_records(cache)
    for r in result.rows:
        head = result.results[r.feature_key].head(r.head)
        assert r.accuracy == head.accuracy
        assert r.extraction_ms == pytest.approx(1000 / speeds[r.feature_key]["images_per_second"])
    paths = write_sweep_report(result, tmp_path / "report")
    assert json.loads(paths["sweep.json"].read_text())["best"]["feature_key"] == result.best.feature_key


def test_several_sizes_refuse_a_stored_model_and_int8(tmp_path, photo_folder, tiny_entry):
    from tlpipe.features.extract import extract

    with pytest.raises(ValueError, match="need --backbone"):
        extract(photo_folder, tmp_path / "c.h5", model=str(tiny_entry.directory), sizes=[64, 96])
    with pytest.raises(ValueError, match="fp32 only"):
        extract(
            photo_folder,
            tmp_path / "c.h5",
            backbone="mobilenet_v2_0.35",
            weights="none",
            layers=["a", "b"],
            precision="int8",
        )
