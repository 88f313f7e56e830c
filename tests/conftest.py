"""Shared fixtures: real photos (scikit-learn's bundled samples, cropped), a session model store, ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def score_with_head_and_fused(photos: Path, head: Path, fused: Path, store, out: Path, **options):
    """Score ``photos`` with a saved head (its backbone from ``store``) and with its fused model, into JSON Lines
    under ``out``; assert both scored and failed the same images with the same labels. Returns both summaries
    and both outputs as {path: row} (head first)."""
    import json

    from tlpipe.pipeline.scoring.score import score

    a = score(photos, out / "head.jsonl", head=head, store=store, device="cpu", **options)
    b = score(photos, out / "fused.jsonl", model=fused, device="cpu", **options)
    assert (a.scored, a.failed) == (b.scored, b.failed)
    rows = [
        {r["path"]: r for r in map(json.loads, (out / name).read_text().splitlines())}
        for name in ("head.jsonl", "fused.jsonl")
    ]
    assert rows[0].keys() == rows[1].keys()
    assert {k: r["label"] for k, r in rows[0].items()} == {k: r["label"] for k, r in rows[1].items()}
    return a, b, rows[0], rows[1]


def opencv_classify(model: str | Path, pixels: np.ndarray, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A tlpipe ONNX classifier run by OpenCV's DNN module (a second ONNX runtime): uint8 (N, S, S, 3) ->
    probabilities (N, C) float32 and label (N,) int64. OpenCV 5 returns every graph output at once."""
    import cv2

    net = cv2.dnn.readNetFromONNX(str(model))
    probabilities, labels = [], []
    for start in range(0, len(pixels), batch):
        net.setInput(np.ascontiguousarray(pixels[start : start + batch]), "images")
        proba, label = net.forward(["probabilities", "label"])
        probabilities.append(proba)
        labels.append(label.reshape(-1))
    return np.concatenate(probabilities), np.concatenate(labels)


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with the reason."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared holds real weights and photos; tests that need it skip without it)")
    return path


def write_photo_folder(root: Path, per_class: int = 6, seed: int = 0, fmt: str = "JPEG") -> Path:
    """Class folders of real photographs: random crops of scikit-learn's two sample photos (china, flower)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    for name, photo in zip(("china", "flower"), photos):
        (root / name).mkdir(parents=True, exist_ok=True)
        h, w = photo.shape[:2]
        for i in range(per_class):
            side = int(rng.integers(120, min(h, w)))
            top, left = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
            crop = Image.fromarray(photo[top : top + side, left : left + side])
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crop.save(root / name / f"{name}_{seed}_{i:03d}.{fmt.lower().replace('jpeg', 'jpg')}", fmt)
    return root


@pytest.fixture(scope="session")
def model_store(tmp_path_factory):
    """One model store for the whole run, so each backbone is exported once."""
    from tlpipe.backbones.store import ModelStore

    return ModelStore(tmp_path_factory.mktemp("model-store"))


@pytest.fixture(scope="session")
def tiny_entry(model_store):
    """A real, small export: MobileNetV2 alpha 0.35 at 64 px, random init (seeded)."""
    from tlpipe.backbones.export import export_backbone

    return export_backbone("mobilenet_v2_0.35", weights="none", size=64, store=model_store)


@pytest.fixture
def photo_folder(tmp_path) -> Path:
    return write_photo_folder(tmp_path / "photos")


@pytest.fixture(scope="session")
def cats_dogs_cache(tmp_path_factory, model_store):
    """../shared's cats_vs_dogs (1,000 photos) embedded with MobileNetV2 1.0 and its real ImageNet weights."""
    from tlpipe.features.extract import extract

    weights = shared_path("weights", "mobilenet_v2_1.0_224_no_top.h5")
    manifest = shared_path("datasets", "cats_vs_dogs", "manifest.csv")  # carries the train/test split
    path = tmp_path_factory.mktemp("cats-dogs") / "cache.h5"
    extract(manifest, path, backbone="mobilenet_v2", weights=weights, store=model_store, device="cpu")
    return path
