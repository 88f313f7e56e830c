"""The registry's numbers are true: every entry is built with Keras and checked."""

import pytest

from tlpipe.backbones.registry import POOLINGS, REGISTRY, get_backbone, list_backbones

REQUIRED = {
    "MobileNetV2",
    "MobileNet",
    "MobileNetV3Small",
    "MobileNetV3Large",
    "VGG16",
    "VGG19",
    "ResNet50",
    "ResNet50V2",
    "Xception",
    "InceptionV3",
    "DenseNet121",
    "EfficientNetB0",
    "EfficientNetB1",
    "EfficientNetB2",
    "EfficientNetB3",
    "EfficientNetV2B0",
    "ConvNeXtTiny",
}


def test_registry_covers_the_required_families():
    assert REQUIRED <= {s.constructor for s in list_backbones()}
    alphas = {s.alpha for s in list_backbones() if s.constructor == "MobileNetV2"}
    assert alphas == {0.35, 0.5, 0.75, 1.0, 1.3, 1.4}
    assert {s.alpha for s in list_backbones() if s.constructor == "MobileNet"} == {0.25, 0.5, 0.75, 1.0}


def test_lookup_aliases_and_errors():
    assert get_backbone("MobileNet-V2").name == "mobilenet_v2_1.0"
    assert get_backbone("mobilenet").name == "mobilenet_1.0"
    with pytest.raises(KeyError, match="tlpipe backbones"):
        get_backbone("alexnet")
    spec = get_backbone("vgg16")
    assert spec.embedding_dim("avg", "block1_pool") == 64
    assert spec.embedding_dim("none") == 7 * 7 * 512
    with pytest.raises(ValueError, match="block5_pool"):
        spec.cut_point("block9_pool")
    with pytest.raises(ValueError, match="pooling"):
        spec.embedding_dim("mean")
    with pytest.raises(ValueError, match="ImageNet weights exist"):
        get_backbone("mobilenet_v2").check_size(100, pretrained=True)
    get_backbone("mobilenet_v2").check_size(100, pretrained=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_entry_matches_keras(name):
    """Parameter count, output channels/grid and every cut point's channels/grid, at the default size."""
    import keras

    spec = REGISTRY[name]
    size = spec.default_size
    model = getattr(keras.applications, spec.constructor)(
        include_top=False, weights=None, input_shape=(size, size, 3), **spec.kwargs
    )
    assert model.count_params() == spec.params
    assert tuple(model.output.shape[1:]) == (spec.grid, spec.grid, spec.channels)
    for cut in spec.cut_points:
        shape = tuple(model.get_layer(cut.layer).output.shape[1:])
        assert shape == (cut.grid, cut.grid, cut.channels), cut
    for pooling in POOLINGS:
        assert spec.embedding_dim(pooling) > 0
    keras.backend.clear_session()
