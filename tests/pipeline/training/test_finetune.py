"""Fine-tuning on real Keras (MobileNetV2 alpha 0.35 at 64 px, seeded random init, 24 generated photos):
the frozen/unfrozen split, the warm start reproducing a logreg head, history and curves, resuming, the
re-exported backbone, classifier.onnx scored by `tlpipe score`, the warm start kept when training makes it
worse, the test split, the lower backbone learning rate; plus the ../shared cats_vs_dogs check."""

import json
import time

import numpy as np
import pytest

from tests.conftest import shared_path, write_photo_folder
from tlpipe.backbones.export import INPUT_NAME, plan_export, verification_images
from tlpipe.backbones.weights import sha256_file
from tlpipe.features.cache import read_feature_set
from tlpipe.features.extract import extract
from tlpipe.features.images import load_image
from tlpipe.features.sources import discover
from tlpipe.pipeline.heads.fit import train_head
from tlpipe.pipeline.heads.persistence import head_labels, load_head
from tlpipe.pipeline.training.finetune import (
    LABEL_NAME,
    OUTPUT_NAME,
    TrainingOptions,
    build_models,
    compile_model,
    finetune,
    fold_head,
    read_history,
    resolve_unfreeze,
    split_records,
)

pytestmark = pytest.mark.slow

TINY = {"backbone": "mobilenet_v2_0.35", "weights": "none", "size": 64}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, model_store, tiny_entry):
    """24 photos, their embeddings from the ONNX export of the same (seeded) weights, and a logreg head on them."""
    root = tmp_path_factory.mktemp("finetune")
    photos = write_photo_folder(root / "photos", per_class=12)
    cache = root / "cache.h5"
    extract(photos, cache, model=tiny_entry.key, store=model_store, device="cpu")
    head = root / "logreg.joblib"
    train_head(cache, "logreg", head)
    return {"root": root, "photos": photos, "cache": cache, "head": head}


@pytest.fixture(scope="module")
def tuned(tiny, model_store):
    """A warm-started run of 1 epoch, then the same command with epochs=2 on the same folder (a resume)."""
    args = dict(**TINY, head=tiny["head"], unfreeze_from="block_15", batch_size=8, store=model_store, progress=False)
    out = tiny["root"] / "run"
    first = finetune(tiny["photos"], out, epochs=1, **args)
    rows_first = read_history(first.history_path)
    second = finetune(tiny["photos"], out, epochs=2, **args)
    return first, rows_first, second


def onnx_run(path, images):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session, session.run(None, {INPUT_NAME: images})[0]


def log_loss(y, proba):
    return float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], 1e-15, 1))))


def test_frozen_and_unfrozen_layers():
    import keras

    plan = plan_export(**TINY)
    models = build_models(plan, 2, unfreeze_from="block_15")
    names = [layer.name for layer in models.base.layers]
    start = names.index("block_15_expand")
    assert models.unfreeze_from == "block_15_expand"
    for i, layer in enumerate(models.base.layers):
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        assert layer.trainable == (i >= start and not is_bn), layer.name
    trainable = {v.path.split("/")[0] for v in models.train.trainable_variables}
    assert trainable == {
        "block_15_expand",
        "block_15_depthwise",
        "block_15_project",
        "block_16_expand",
        "block_16_depthwise",
        "block_16_project",
        "Conv_1",
        "classifier",
    }
    base, spec = models.base, plan.spec
    assert names[resolve_unfreeze(base, spec, "block_15_add")] == "block_15_add"  # a cut point
    assert names[resolve_unfreeze(base, spec, "block_1")] == "block_1_expand"  # a prefix, not block_10...
    assert names[resolve_unfreeze(base, spec, unfreeze_last=1)] == "block_16_expand"
    assert names[resolve_unfreeze(base, spec, unfreeze_last=2)] == "block_15_expand"
    assert names[resolve_unfreeze(base, spec)] == "block_16_expand"
    refused = ({"unfreeze_from": "block_99"}, {"unfreeze_last": 11}, {"unfreeze_from": "Conv_1", "unfreeze_last": 1})
    for kwargs in refused:
        with pytest.raises(ValueError):
            resolve_unfreeze(base, spec, **kwargs)
    # augmentation and dropout act in training only: at inference the training model is the classifier
    images = verification_images(64, count=4)
    inference = np.asarray(models.train(images, training=False))
    np.testing.assert_allclose(inference, np.asarray(models.classifier(images)), atol=1e-6)
    augmentation = models.train.get_layer("augmentation")
    pixels = images.astype("float32")
    np.testing.assert_array_equal(np.asarray(augmentation(pixels, training=False)), pixels)
    augmented = np.asarray(augmentation(pixels, training=True))
    assert not np.allclose(augmented, pixels) and augmented.min() >= 0 and augmented.max() <= 255


def test_warm_start_reproduces_the_head(tiny, tuned):
    """Epoch 0 (before training) scores the validation images exactly as the head does on their ONNX embeddings."""
    first, rows, _ = tuned
    fs = read_feature_set(tiny["cache"])
    split = split_records(discover(tiny["photos"]).records, 0.2, 0)
    row_of = {path: i for i, path in enumerate(fs.paths)}
    estimator, metadata = load_head(tiny["head"])
    labels = head_labels(estimator, metadata)  # fit-head's heads know their class names (older: via the sidecar)
    y = np.array([labels.index(r.label) for r in split.val])
    proba = estimator.predict_proba(fs.X[[row_of[r.relpath] for r in split.val]])
    accuracy = float(np.mean(proba.argmax(axis=1) == y))
    assert rows[0]["epoch"] == 0 and rows[0]["loss"] is None
    assert rows[0]["val_accuracy"] == pytest.approx(accuracy) == first.warm_start_val_accuracy
    assert rows[0]["val_loss"] == pytest.approx(log_loss(y, proba), rel=1e-3, abs=1e-5)


def test_history_curves_and_resume(tuned):
    first, rows_first, second = tuned
    assert [r["epoch"] for r in rows_first] == [0, 1] and first.epochs_run == 1 and first.resumed_from == 0
    rows = read_history(second.history_path)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[:2] == rows_first  # the second call trained epoch 2 only
    assert second.resumed_from == 1 and second.epochs_run == 2 and len(second.epoch_seconds) == 2
    assert all(r[k] is not None for r in rows[1:] for k in ("loss", "accuracy", "val_loss", "val_accuracy", "seconds"))
    best = min(rows, key=lambda r: r["val_loss"])  # selection by validation loss, epoch 0 included
    assert (second.best_epoch, second.best_val_loss, second.best_val_accuracy) == (
        best["epoch"],
        best["val_loss"],
        best["val_accuracy"],
    )
    assert {r["phase"] for r in rows} == {"finetune"}
    assert second.curves_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((second.out_dir / "checkpoints").glob("*.weights.h5"))) <= 2


def test_only_the_unfrozen_part_changes(tuned):
    import keras

    from tlpipe.backbones import keras_build
    from tlpipe.backbones.weights import ResolvedWeights, resolve_weights

    _, _, second = tuned
    plan = plan_export(**TINY)
    before = keras_build.build_base(plan.spec, 64, ResolvedWeights("none"))
    after = keras_build.build_base(plan.spec, 64, resolve_weights(plan.spec, second.out_dir / "backbone.weights.h5"))
    changed = set()
    for old, new in zip(before.layers, after.layers):
        if not all(np.array_equal(a, b) for a, b in zip(old.get_weights(), new.get_weights())):
            changed.add(old.name)
            assert not isinstance(old, keras.layers.BatchNormalization), old.name
    assert changed == {
        "block_15_expand",
        "block_15_depthwise",
        "block_15_project",
        "block_16_expand",
        "block_16_depthwise",
        "block_16_project",
        "Conv_1",
    }


def test_reexported_backbone_extracts(tiny, tuned, model_store, tiny_entry):
    _, _, second = tuned
    entry = second.backbone_entry
    weights = second.out_dir / "backbone.weights.h5"
    assert entry.key != tiny_entry.key and entry.metadata["finetuned_from"]["key"] == tiny_entry.key
    assert entry.metadata["unfreeze_from"] == "block_15_expand"
    assert entry.metadata["weights"]["sha256"] == sha256_file(weights)
    assert plan_export(**{**TINY, "weights": weights}).key == entry.key  # what `tlpipe export --weights` would key
    summary = extract(
        tiny["photos"], tiny["root"] / "tuned.h5", model=str(second.out_dir), store=model_store, device="cpu"
    )
    assert summary.key == f"{entry.key}-filter-bilinear" and summary.embedded == 24 and not summary.failures
    assert read_feature_set(tiny["root"] / "tuned.h5").metadata["finetuned_from"]["key"] == tiny_entry.key


def test_classifier_onnx_matches_keras(tiny, tuned):
    """classifier.onnx on the validation images scores what Keras recorded for the best epoch, and
    `tlpipe score --model` takes it like a fused classifier."""
    from tlpipe.pipeline.scoring.score import score

    _, _, second = tuned
    split = split_records(discover(tiny["photos"]).records, 0.2, 0)
    images = np.stack([load_image(r.abspath, 64)[0] for r in split.val])
    y = np.array([second.class_names.index(r.label) for r in split.val])
    session, proba = onnx_run(second.classifier_path, images)
    assert [o.name for o in session.get_outputs()] == [OUTPUT_NAME, LABEL_NAME] and proba.shape == (len(y), 2)
    np.testing.assert_array_equal(session.run([LABEL_NAME], {INPUT_NAME: images})[0], proba.argmax(axis=1))
    np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-5)
    best = next(r for r in read_history(second.history_path) if r["epoch"] == second.best_epoch)
    assert float(np.mean(proba.argmax(axis=1) == y)) == pytest.approx(best["val_accuracy"])
    assert log_loss(y, proba) == pytest.approx(best["val_loss"], rel=1e-3, abs=1e-5)
    props = session.get_modelmeta().custom_metadata_map
    assert json.loads(props["tlpipe.class_names"]) == ["china", "flower"]
    record = json.loads(props["tlpipe"])
    assert record["backbone_key"] == second.backbone_entry.key
    assert record["kind"] == props["tlpipe.kind"] == "classifier"
    assert record["verification"]["images"] == len(y) and record["test"] is None  # no test split in this folder

    out = tiny["root"] / "scored.csv"
    summary = score(tiny["photos"], out, model=second.classifier_path, device="cpu")
    assert summary.scored == 24 and not summary.failures
    import csv

    with open(out, newline="") as fh:
        predicted = {row["path"]: row["label"] for row in csv.DictReader(fh)}
    for record, label in zip(split.val, proba.argmax(axis=1)):
        assert predicted[record.relpath] == second.class_names[label]


def test_balanced_class_weights_without_head(tiny, model_store):
    """No head, no augmentation, class weights, the default unfreeze point (the last block)."""
    result = finetune(
        tiny["photos"],
        tiny["root"] / "plain",
        **TINY,
        epochs=1,
        batch_size=8,
        augment=False,
        class_weight="balanced",
        store=model_store,
        progress=False,
    )
    rows = read_history(result.history_path)
    assert result.warm_start_val_accuracy is None and [r["epoch"] for r in rows] == [0, 1]
    assert result.unfreeze_from == result.backbone_entry.metadata["unfreeze_from"] == "block_16_expand"
    assert (result.out_dir / "backbone" / "model.onnx").is_file() and result.classifier_path.is_file()


def test_warm_start_kept_when_training_makes_it_worse(tiny, model_store, tiny_entry):
    """A learning rate far too high ruins epoch 1: the warm start (epoch 0) stays the best weights, so
    classifier.onnx is the head; the source's test split is scored with them and never picks weights."""
    from tlpipe.backbones.runtime import OnnxEmbedder

    root = tiny["root"] / "splits"
    write_photo_folder(root / "train", per_class=6, seed=1)
    write_photo_folder(root / "test", per_class=3, seed=2)
    result = finetune(
        root,
        tiny["root"] / "too-fast",
        **TINY,
        head=tiny["head"],
        epochs=1,
        batch_size=4,
        learning_rate=0.5,
        augment=False,
        store=model_store,
        progress=False,
    )
    rows = read_history(result.history_path)
    assert [r["epoch"] for r in rows] == [0, 1] and rows[1]["val_loss"] > rows[0]["val_loss"]
    assert result.best_epoch == 0 and result.best_val_loss == rows[0]["val_loss"]
    assert "hold-out of the training images" in result.setup and "'test' split (6 images)" in result.setup
    test = discover(root).records
    test = [r for r in test if r.split == "test"]
    images = np.stack([load_image(r.abspath, 64)[0] for r in test])
    y = np.array([result.class_names.index(r.label) for r in test])
    estimator, metadata = load_head(tiny["head"])
    labels = head_labels(estimator, metadata)  # fit-head's heads know their class names (older: via the sidecar)
    expected = estimator.predict_proba(OnnxEmbedder(tiny_entry.model_path, device="cpu")(images))
    expected = expected[:, [labels.index(c) for c in result.class_names]]
    _, proba = onnx_run(result.classifier_path, images)
    np.testing.assert_allclose(proba, expected, atol=2e-3)
    assert result.test.images == 6
    assert result.test.accuracy == pytest.approx(float(np.mean(expected.argmax(axis=1) == y)))
    assert result.test.loss == pytest.approx(log_loss(y, expected), rel=1e-2, abs=1e-4)


def test_backbone_learning_rate_scales_the_backbone_steps():
    """Adam's first step moves a weight by about its learning rate (|gradient| >> epsilon): 1e-2 for the
    fast layer, 1e-5 for the slow one; compile_model hands the unfrozen backbone's variables to the slow rate."""
    import keras

    from tlpipe.pipeline.training.finetune import adam

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(0, 1, (16, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    slow, fast = (
        keras.layers.Dense(8, activation="relu", name="slow"),
        keras.layers.Dense(2, activation="softmax", name="fast"),
    )
    inputs = keras.Input((4,))
    model = keras.Model(inputs, fast(slow(inputs)))
    model.compile(optimizer=adam(1e-2, slow.trainable_variables, 1e-5), loss="sparse_categorical_crossentropy")
    before = [np.array(v) for v in model.trainable_variables]
    model.train_on_batch(x, y)
    moved = {v.path: np.abs(np.array(v) - b) for v, b in zip(model.trainable_variables, before)}
    for path, rate in (("slow/kernel", 1e-5), ("fast/kernel", 1e-2), ("fast/bias", 1e-2)):
        step = moved[path][moved[path] > 0]
        assert step.size and np.allclose(step, rate, rtol=0.05), (path, step.min(), step.max())

    models = build_models(plan_export(**TINY), 2, unfreeze_from="block_16", augment=False)
    compile_model(models.train, TrainingOptions(learning_rate=1e-3, backbone_learning_rate=1e-5), models.base)
    optimizer = models.train.optimizer
    assert optimizer.ratio == pytest.approx(1e-2)
    assert optimizer.slow_paths == {v.path for v in models.base.trainable_variables}
    assert {p.split("/")[0] for p in optimizer.slow_paths} == {
        "block_16_expand",
        "block_16_depthwise",
        "block_16_project",
        "Conv_1",
    }


def test_split_records():
    from tlpipe.features.sources import ImageRecord

    def records(split, n=4):
        return [
            ImageRecord(f"{split}/{c}{i}.jpg", f"/x/{split}/{c}{i}.jpg", c, split if split != "none" else None)
            for c in "ab"
            for i in range(n)
        ]

    both = split_records(records("train") + records("val") + records("test"))
    assert {r.split for r in both.train} == {"train"} and {r.split for r in both.val} == {"val"}
    assert {r.split for r in both.test} == {"test"}
    only_test = split_records(records("train", 10) + records("test"), val_fraction=0.2)
    assert {r.split for r in only_test.val} == {"train"} and len(only_test.val) == 4 and len(only_test.train) == 16
    assert {r.split for r in only_test.test} == {"test"} and "'test' split (8 images)" in only_test.description
    held_out = split_records(records("none", 10), val_fraction=0.2, seed=0)
    assert len(held_out.val) == 4 and not held_out.test
    assert sorted(r.label for r in held_out.val) == ["a", "a", "b", "b"]
    assert not {r.relpath for r in held_out.val} & {r.relpath for r in held_out.train}
    with pytest.raises(ValueError, match="two classes"):
        split_records([r for r in records("train") if r.label == "a"] + records("val"))


def test_unfoldable_or_foreign_heads_are_refused(tiny, model_store):
    root = tiny["root"]
    train_head(tiny["cache"], "logreg", root / "pca.joblib", pca=4)
    train_head(tiny["cache"], "svm", root / "svm.joblib")
    args = dict(**TINY, epochs=1, store=model_store, progress=False)
    with pytest.raises(ValueError, match=r"pca\.joblib has a PCA step .* cannot be folded"):
        finetune(tiny["photos"], root / "refused", head=root / "pca.joblib", **args)
    with pytest.raises(ValueError, match=r"svm\.joblib ends in a CalibratedClassifierCV, not a LogisticRegression"):
        finetune(tiny["photos"], root / "refused", head=root / "svm.joblib", **args)
    with pytest.raises(ValueError, match="fitted on embeddings"):  # other weights (seed 1): other embeddings
        finetune(tiny["photos"], root / "refused", head=tiny["head"], **{**args, "seed": 1})
    assert not (root / "refused").exists()


def test_fold_head_handles_multiclass_and_class_order():
    """Three classes, head class order differing from the images': columns follow the images' class names."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    X, y = rng.normal(2, 3, (90, 5)), np.repeat([0, 1, 2], 30)
    X[y == 1, 0] += 4
    head = Pipeline([("scale", StandardScaler()), ("logreg", LogisticRegression())]).fit(X, y)
    kernel, bias = fold_head(head, {"class_names": ["c", "a", "b"]}, ["a", "b", "c"], 5)
    logits = X @ kernel + bias
    proba = np.exp(logits - logits.max(axis=1, keepdims=True))
    proba /= proba.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(proba, head.predict_proba(X)[:, [1, 2, 0]], atol=1e-5)


@pytest.mark.shared
def test_cats_vs_dogs_finetune_keeps_accuracy(cats_dogs_cache, model_store, tmp_path):
    """Real ImageNet weights at 224, warm-started from a logreg head, block_16 onward trained for 1 epoch on
    400 of the 500 training photos (100 held out for validation): the best weights are never worse on
    validation loss than the warm start, and the 500 test photos score within half a point of the head."""
    manifest = shared_path("datasets", "cats_vs_dogs", "manifest.csv")
    weights = shared_path("weights", "mobilenet_v2_1.0_224_no_top.h5")
    head = tmp_path / "logreg.joblib"
    trained = train_head(cats_dogs_cache, "logreg", head)
    started = time.perf_counter()
    result = finetune(
        manifest,
        tmp_path / "run",
        backbone="mobilenet_v2",
        weights=weights,
        head=head,
        unfreeze_from="block_16",
        epochs=1,
        store=model_store,
        progress=False,
    )
    rows = read_history(result.history_path)
    print(
        f"\ncats_vs_dogs fine-tune: warm start val loss {rows[0]['val_loss']:.4f} (eval {rows[0]['seconds']:.1f} s), "
        f"epoch 1 {rows[1]['val_loss']:.4f}, epoch time {rows[1]['seconds']:.1f} s; test accuracy "
        f"{result.test.accuracy:.4f} (head {trained.evaluation.accuracy:.4f}); "
        f"whole call {time.perf_counter() - started:.1f} s"
    )
    assert "validate on 100" in result.setup and "'test' split (500 images)" in result.setup
    assert result.best_val_loss <= rows[0]["val_loss"]
    assert result.test.images == 500 and result.test.accuracy >= trained.evaluation.accuracy - 0.005
