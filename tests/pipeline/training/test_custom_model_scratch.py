"""`tlpipe custom-model --backbone none`: the guides' from-scratch CNN baseline, on real Keras and generated
photos at 32 px (a few steps): parameter counts of the guides' architecture as Keras counts them, the seeded
random initialisation, the [0, 1] pixel contract inside the model, the refusals, training with resume,
augmentation and class weights, summary.json / history.csv with the fields of a transfer run, and the
classifier.onnx scored by `tlpipe score --classifier`; plus ../shared cats_vs_dogs."""

import csv
import json

import numpy as np
import pytest

from tests.conftest import shared_path, write_photo_folder
from tests.pipeline.cli.test_commands import tlpipe
from tlpipe.backbones.export import INPUT_NAME
from tlpipe.features.images import load_image
from tlpipe.features.sources import discover
from tlpipe.pipeline.training.custom_model import (
    SUMMARY_FILE,
    build_scratch_models,
    fit_custom_model,
    parameter_counts,
    parse_new_layers,
    prepare_custom_model,
)
from tlpipe.pipeline.training.finetune import HISTORY_FIELDS, TrainingOptions, read_history

pytestmark = pytest.mark.slow

GUIDES = "conv:32,pool,conv:64,pool,conv:128,pool,conv:128,pool,flatten,dense:512,dropout:0.3,dense:512"
SCRATCH = {"backbone": "none", "size": 32}
SPEC = "conv:4,pool,conv:8,pool,flatten,dense:8,dropout:0.3"
FAST = {"batch_size": 4, "progress": False, "learning_rate": 1e-2}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("scratch") / "photos"
    write_photo_folder(root / "train", per_class=10, seed=0)
    write_photo_folder(root / "test", per_class=3, seed=1)
    return root


@pytest.fixture(scope="module")
def scratch(photos):
    """Two calls on one folder: 1 epoch, then 2 (a resume)."""
    out = photos.parent / "scratch"
    first = fit_custom_model(photos, out, **SCRATCH, new_layers=SPEC, epochs=1, **FAST)
    rows_first = read_history(first.history_path)
    second = fit_custom_model(photos, out, **SCRATCH, new_layers=SPEC, epochs=2, **FAST)
    return first, rows_first, second


def conv(k: int, c_in: int, c_out: int) -> int:
    return k * k * c_in * c_out + c_out


def dense(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


@pytest.mark.parametrize("size, classes", [(150, 2), (128, 7)])
def test_guides_architecture_parameter_counts(size, classes):
    """The guides' four conv + max-pool blocks, flatten, dense 512, dropout 0.3, dense 512 and a softmax, with
    'same' padding: every parameter trainable, as Keras' count_params() reports, and as the arithmetic says."""
    models = build_scratch_models(size, parse_new_layers(GUIDES), classes)
    side = size // 16  # four 2x2 max-pools (floor)
    expected = (
        conv(3, 3, 32)
        + conv(3, 32, 64)
        + conv(3, 64, 128)
        + conv(3, 128, 128)
        + dense(side * side * 128, 512)
        + dense(512, 512)
        + dense(512, classes)
    )
    counts = parameter_counts(models)
    assert counts == {"frozen": 0, "trainable": expected, "non_trainable_new": 0}
    assert models.classifier.count_params() == models.train.count_params() == expected
    assert not models.classifier.non_trainable_weights and not models.base.weights
    flatten = models.top.get_layer("new_9_flatten")
    assert flatten.output.shape[1:] == (side * side * 128,)


def test_seeded_initialisation_and_unit_pixels():
    layers = parse_new_layers(SPEC)
    a, b = build_scratch_models(32, layers, 2, seed=3), build_scratch_models(32, layers, 2, seed=3)
    c = build_scratch_models(32, layers, 2, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a.top.get_weights(), b.top.get_weights()))
    assert not all(np.array_equal(x, y) for x, y in zip(a.top.get_weights(), c.top.get_weights()))
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(np.asarray(a.frozen(pixels)), pixels / 255.0, rtol=1e-6)
    tf_mode = build_scratch_models(32, layers, 2, preprocessing="tf")
    np.testing.assert_allclose(np.asarray(tf_mode.frozen(pixels)), pixels / 127.5 - 1, rtol=1e-5, atol=1e-6)


def test_refusals(photos, tmp_path):
    def refused(message, **kwargs):
        settings = {**SCRATCH, "new_layers": SPEC, **kwargs}
        options = settings.pop("options", None)
        with pytest.raises(ValueError, match=message):
            prepare_custom_model(photos, tmp_path / "out", options=options, **settings)

    refused(r"backbone 'none' has no layer to cut at \(got layer 'block_2_add'\)", layer="block_2_add")
    refused(r"backbone 'none' needs a size", size=None)
    refused(r"backbone 'none' loads no weights \(got weights '/x.h5'\)", weights="/x.h5")
    refused(
        r"backbone 'none' has nothing frozen", options=TrainingOptions(learning_rate=1e-3, backbone_learning_rate=0.1)
    )
    refused(r"backbone 'none' has nothing frozen", options=TrainingOptions(learning_rate=1e-3, unfreeze_last=1))
    refused(r"size 8 is too small for 4 pool layers .*: at least 16 px", size=8, new_layers=GUIDES)
    refused(
        r"unknown preprocessing 'builtin' for backbone 'none'; one of: tf, caffe, torch, unit", preprocessing="builtin"
    )
    with pytest.raises(ValueError, match=r"mobilenet_v2_0.35 takes its own preprocessing 'tf', not 'unit'"):
        prepare_custom_model(
            photos,
            tmp_path / "out",
            backbone="mobilenet_v2_0.35",
            weights="none",
            size=64,
            layer="block_2_add",
            new_layers="gap",
            preprocessing="unit",
        )
    with pytest.raises(ValueError, match=r"needs a registry backbone and the layer to cut it at \(or backbone 'none'"):
        prepare_custom_model(photos, tmp_path / "out", backbone="mobilenet_v2_0.35", weights="none", new_layers="gap")
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_cut_point_with_no_backbone(photos, tmp_path):
    proc = tlpipe(
        "custom-model", photos, "--backbone", "none", "--size", "32", "--layer", "block1_pool",
        "--new-layers", SPEC, "--out", tmp_path / "out",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "error: backbone 'none' has no layer to cut at (got layer 'block1_pool')" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_scratch_training_resume_export_and_score(photos, scratch, tmp_path):
    first, rows_first, second = scratch
    assert [r["epoch"] for r in rows_first] == [0, 1] and first.resumed_from == 0
    rows = read_history(second.history_path)
    assert [r["epoch"] for r in rows] == [0, 1, 2] and rows[:2] == rows_first and second.resumed_from == 1
    assert {r["phase"] for r in rows} == {"new-layers"} and all(r["loss"] is not None for r in rows[1:])
    best = min(rows, key=lambda r: r["val_loss"])
    assert (second.best_epoch, second.best_val_loss) == (best["epoch"], best["val_loss"])
    assert second.curves_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not second.feature_maps_cached and second.feature_map_seconds is None
    assert (second.backbone, second.layer, second.preprocessing, second.size) == ("none", None, "unit", 32)
    # 32 -> 16 -> 8 px after two pools: flatten 8 * 8 * 8
    trainable = conv(3, 3, 4) + conv(3, 4, 8) + dense(8 * 8 * 8, 8) + dense(8, 2)
    assert second.params == {"frozen": 0, "trainable": trainable, "non_trainable_new": 0, "unfrozen_backbone": 0}

    test = [r for r in discover(photos).records if r.split == "test"]
    images = np.stack([load_image(r.abspath, 32)[0] for r in test])
    y = np.array([second.class_names.index(r.label) for r in test])
    import onnxruntime as ort

    session = ort.InferenceSession(str(second.classifier_path), providers=["CPUExecutionProvider"])
    proba, label = session.run(None, {INPUT_NAME: images})
    assert second.test.images == 6 and second.test.accuracy == pytest.approx(float(np.mean(label == y)))
    record = json.loads(session.get_modelmeta().custom_metadata_map["tlpipe"])
    assert record["made_by"] == "custom-model" and record["backbone"] == "none" and record["layer"] is None
    assert record["preprocessing"] == "unit" and record["weights"] == "random init, seed 0"
    assert record["verification"]["images"] == 4 and record["params"] == second.params

    out = tmp_path / "scored.csv"
    proc = tlpipe("score", photos / "test", "--classifier", second.classifier_path, "--out", out, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    with open(out, newline="") as fh:
        scored = {row["path"]: row["label"] for row in csv.DictReader(fh)}
    assert len(scored) == 6
    for r, predicted in zip(test, label):
        assert scored[r.relpath.split("/", 1)[1]] == second.class_names[predicted]

    summary = json.loads((second.out_dir / SUMMARY_FILE).read_text())
    assert summary == json.loads(json.dumps(second.to_dict()))


def test_same_fields_as_a_transfer_run(photos, scratch):
    """summary.json and history.csv of a from-scratch run carry the fields of a transfer run's."""
    _, _, second = scratch
    transfer = fit_custom_model(
        photos,
        photos.parent / "transfer",
        backbone="mobilenet_v2_0.35",
        weights="none",
        size=64,
        layer="block_2_add",
        new_layers="gap",
        epochs=1,
        **FAST,
    )
    ours = json.loads((second.out_dir / SUMMARY_FILE).read_text())
    theirs = json.loads((transfer.out_dir / SUMMARY_FILE).read_text())
    assert list(ours) == list(theirs) and list(ours["params"]) == list(theirs["params"])
    assert list(ours["test"]) == list(theirs["test"])
    assert (
        theirs["backbone"] == "mobilenet_v2_0.35" and theirs["preprocessing"] == "tf" and theirs["params"]["frozen"] > 0
    )
    for result in (second, transfer):
        with open(result.history_path, newline="") as fh:
            assert tuple(next(csv.reader(fh))) == HISTORY_FIELDS


def test_scratch_with_augmentation_and_class_weights(photos, tmp_path):
    result = fit_custom_model(
        photos, tmp_path / "aug", **SCRATCH, new_layers=SPEC, epochs=1, augment=True, class_weight="balanced", **FAST
    )
    rows = read_history(result.history_path)
    assert [r["epoch"] for r in rows] == [0, 1] and rows[1]["accuracy"] is not None
    assert result.classifier_path.is_file() and result.test.images == 6


def test_cli_from_scratch(photos, tmp_path):
    proc = tlpipe(
        "custom-model", photos, "--backbone", "none", "--size", "32", "--new-layers", SPEC, "--epochs", "1",
        "--batch-size", "4", "--quiet", "--out", tmp_path / "cli",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "from scratch on 32 px images (unit pixels)" in proc.stdout
    trainable = conv(3, 3, 4) + conv(3, 4, 8) + dense(8 * 8 * 8, 8) + dense(8, 2)
    assert f"parameters: {trainable:,} trainable (random init, seed 0)" in proc.stdout
    assert json.loads((tmp_path / "cli" / SUMMARY_FILE).read_text())["params"]["trainable"] == trainable


@pytest.mark.shared
def test_cats_vs_dogs_from_scratch(tmp_path):
    """The guides' small CNN at 64 px, 2 epochs on the 400 training photos: a real run that exports and scores
    the 500 test photos (no accuracy bar beyond 'not below chance by much': from scratch on 400 photos)."""
    manifest = shared_path("datasets", "cats_vs_dogs", "manifest.csv")
    result = fit_custom_model(
        manifest,
        tmp_path / "run",
        backbone="none",
        size=64,
        new_layers="conv:16,pool,conv:32,pool,conv:64,pool,flatten,dense:64,dropout:0.3",
        epochs=2,
        progress=False,
    )
    print(f"\ncats_vs_dogs from scratch: test accuracy {result.test.accuracy:.4f}, epochs {result.epoch_seconds} s")
    assert result.test.images == 500 and result.test.accuracy > 0.45 and result.classifier_path.is_file()
