import pytest

from tests.conftest import shared_path
from tlpipe.backbones.registry import get_backbone
from tlpipe.backbones.weights import (
    WEIGHTS_DIR_ENV,
    WeightsUnavailable,
    candidate_filenames,
    resolve_weights,
    sha256_file,
)


def test_none_and_imagenet(monkeypatch):
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    spec = get_backbone("vgg16")
    assert resolve_weights(spec, "none", seed=3).identity == "random:seed=3"
    assert resolve_weights(spec, None).source == "none"
    assert resolve_weights(spec, "imagenet").keras_arg == "imagenet"


def test_file_and_directory(tmp_path, monkeypatch):
    spec = get_backbone("mobilenet_v2_0.35")
    name = candidate_filenames(spec, 224)[1]
    weights = tmp_path / name
    weights.write_bytes(b"weights")
    from_file = resolve_weights(spec, weights)
    assert from_file.source == "file" and from_file.sha256 == sha256_file(weights)
    assert resolve_weights(spec, tmp_path).path == str(weights.resolve())
    # imagenet looks in the weights directory first: option, then environment variable
    assert resolve_weights(spec, "imagenet", weights_dir=tmp_path).source == "file"
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    assert resolve_weights(spec, "imagenet").sha256 == from_file.sha256
    # another alpha is not confused with this one
    assert resolve_weights(get_backbone("mobilenet_v2"), "imagenet").source == "imagenet"


def test_bad_weights(tmp_path):
    spec = get_backbone("resnet50")
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        resolve_weights(spec, tmp_path / "missing.h5")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(WeightsUnavailable, match=".h5"):
        resolve_weights(spec, tmp_path / "w.bin")
    with pytest.raises(WeightsUnavailable, match="no weights for resnet50"):
        resolve_weights(spec, tmp_path)


def test_shared_weights_are_found_by_name():
    folder = shared_path("weights")
    for name, file in [
        ("mobilenet_v2", "mobilenet_v2_1.0_224_no_top.h5"),
        ("mobilenet_v2_0.35", "mobilenet_v2_0.35_224_no_top.h5"),
        ("mobilenet_0.25", "mobilenet_0.25_224_no_top.h5"),
    ]:
        assert resolve_weights(get_backbone(name), folder).path.endswith(file)
