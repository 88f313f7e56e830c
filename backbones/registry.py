"""The backbone registry: one table, as data, that drives `tlpipe backbones`, export and the tests.

Every entry carries its own preprocessing contract (what the ONNX graph does to uint8 RGB before the
network), its input sizes, its embedding dimension and the named layers a user may truncate at, with the
channel count and spatial grid (at the default size) of each. The numbers were read off Keras 3.15 models
and are re-checked by ``tests/backbones/test_registry.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import overload

from tlpipe.errors import InputError, UnknownNameError

__all__ = [
    "BackboneSpec",
    "CONCAT",
    "CutPoint",
    "POOLINGS",
    "PREPROCESSING_MODES",
    "REGISTRY",
    "get_backbone",
    "layer_parts",
    "list_backbones",
]

POOLINGS = ("avg", "max", "none")
# Joins cut points into one concatenated feature set: ``out_relu+block_13_expand_relu`` is the pooled
# ``out_relu`` embedding followed by the pooled ``block_13_expand_relu`` one, as one vector (one model output).
# ``--layer a,b`` (comma) still means two feature sets; ``a+b`` (plus) one feature set of both.
CONCAT = "+"


@overload
def layer_parts(layer: str) -> list[str]: ...
@overload
def layer_parts(layer: None) -> list[None]: ...
@overload
def layer_parts(layer: str | None) -> list[str] | list[None]: ...
def layer_parts(layer: str | None) -> list[str] | list[None]:
    """The cut points a layer spec names: ``[layer]``, or the parts of a ``a+b`` concatenation, in order.

    Parameters
    ----------
    layer : str or None
        A cut point, a concatenation of cut points joined by :data:`CONCAT`, or None (the last output).

    Returns
    -------
    list of str or None
        One entry per pooled block of the embedding, in the order the blocks are concatenated.

    Raises
    ------
    ValueError
        An empty part (``a+``) or a cut point named twice (``a+a``).
    """
    if layer is None:
        return [None]
    if CONCAT not in layer:
        return [layer]
    parts = [part.strip() for part in layer.split(CONCAT)]
    if any(not part for part in parts):
        raise InputError(
            f"layer {layer!r} has an empty part: join cut points with '+', e.g. out_relu+block_13_expand_relu"
        )
    if len(set(parts)) != len(parts):
        raise InputError(f"layer {layer!r} names a cut point twice")
    return parts


# mode -> what the in-graph preprocessing does to x = float32(uint8 RGB)
PREPROCESSING_MODES = {
    "tf": "x / 127.5 - 1 (scale to [-1, 1])",
    "caffe": "RGB -> BGR, minus ImageNet mean [103.939, 116.779, 123.68]",
    "torch": "x / 255, minus mean [0.485, 0.456, 0.406], over std [0.229, 0.224, 0.225]",
    "builtin": "none outside: the Keras model rescales 0..255 itself",
    "unit": "x / 255 (scale to [0, 1]; no registry backbone uses it: custom-model's default with backbone none)",
}


@dataclass(frozen=True)
class CutPoint:
    """A named layer the backbone can be truncated at."""

    layer: str
    channels: int
    grid: int  # spatial side at the backbone's default input size


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry: how to build the model and what it hands back."""

    name: str
    constructor: str  # keras.applications.<constructor>
    keras_module: str  # keras.applications.<keras_module>.preprocess_input
    preprocessing: str  # a key of PREPROCESSING_MODES
    default_size: int
    params: int  # include_top=False, at the default size
    channels: int
    grid: int
    cut_points: tuple[CutPoint, ...]
    kwargs: dict = field(default_factory=dict)
    pretrained_sizes: tuple[int, ...] = ()  # () = ImageNet weights work at any size >= min_size
    min_size: int = 32
    aliases: tuple[str, ...] = ()

    @property
    def family(self) -> str:
        return self.keras_module

    @property
    def alpha(self) -> float | None:
        return self.kwargs.get("alpha")

    def cut_point(self, layer: str | None) -> CutPoint:
        """The cut point named ``layer`` (None: the full backbone's output).

        A concatenation ``a+b`` (:func:`layer_parts`) gives a CutPoint of that name whose ``channels`` is the sum
        of its parts' (the pooled embedding's length) and whose ``grid`` is 0 (the parts' grids differ)."""
        parts = layer_parts(layer)
        if layer is not None and len(parts) > 1:
            cuts = [self.cut_point(part) for part in parts]
            return CutPoint(layer=layer, channels=sum(c.channels for c in cuts), grid=0)
        if layer is None:
            return CutPoint(layer="(output)", channels=self.channels, grid=self.grid)
        for cut in self.cut_points:
            if cut.layer == layer:
                return cut
        names = ", ".join(c.layer for c in self.cut_points)
        raise InputError(f"{self.name} has no cut point {layer!r}; choose one of: {names}")

    def embedding_dim(self, pooling: str = "avg", layer: str | None = None, size: int | None = None) -> int:
        """Embedding length for ``pooling`` at ``layer``; for pooling "none" at ``size`` (default size)."""
        if pooling not in POOLINGS:
            raise InputError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
        cut = self.cut_point(layer)
        if pooling != "none":
            return cut.channels
        if size not in (None, self.default_size):
            raise InputError(
                "the flattened dimension is tabulated at the default size only; build the model to know it"
            )
        return sum(c.grid * c.grid * c.channels for c in map(self.cut_point, layer_parts(layer)))

    def check_size(self, size: int, pretrained: bool) -> None:
        """Raise ValueError when ``size`` cannot be used (with ImageNet weights when ``pretrained``)."""
        if size < self.min_size:
            raise InputError(f"{self.name} needs an input size of at least {self.min_size}, not {size}")
        if pretrained and self.pretrained_sizes and size not in self.pretrained_sizes:
            sizes = ", ".join(map(str, self.pretrained_sizes))
            raise InputError(f"{self.name} ImageNet weights exist for sizes {sizes}, not {size}")


def _cuts(*rows: tuple[str, int, int]) -> tuple[CutPoint, ...]:
    return tuple(CutPoint(*row) for row in rows)


# fmt: off
REGISTRY: dict[str, BackboneSpec] = {spec.name: spec for spec in (
    BackboneSpec('mobilenet_v2_0.35', 'MobileNetV2', 'mobilenet_v2', 'tf', 224, 410208, 1280, 7,
                 _cuts(('block_2_add', 8, 56), ('block_4_add', 16, 28), ('block_5_add', 16, 28), ('block_6_expand_relu', 96, 28), ('block_7_add', 24, 14), ('block_8_add', 24, 14), ('block_9_add', 24, 14), ('block_11_add', 32, 14), ('block_12_add', 32, 14), ('block_13_expand_relu', 192, 14), ('block_14_add', 56, 7), ('block_15_add', 56, 7), ('out_relu', 1280, 7)),
                 kwargs={'alpha': 0.35}, pretrained_sizes=(96, 128, 160, 192, 224)),
    BackboneSpec('mobilenet_v2_0.5', 'MobileNetV2', 'mobilenet_v2', 'tf', 224, 706224, 1280, 7,
                 _cuts(('block_2_add', 16, 56), ('block_4_add', 16, 28), ('block_5_add', 16, 28), ('block_6_expand_relu', 96, 28), ('block_7_add', 32, 14), ('block_8_add', 32, 14), ('block_9_add', 32, 14), ('block_11_add', 48, 14), ('block_12_add', 48, 14), ('block_13_expand_relu', 288, 14), ('block_14_add', 80, 7), ('block_15_add', 80, 7), ('out_relu', 1280, 7)),
                 kwargs={'alpha': 0.5}, pretrained_sizes=(96, 128, 160, 192, 224)),
    BackboneSpec('mobilenet_v2_0.75', 'MobileNetV2', 'mobilenet_v2', 'tf', 224, 1382064, 1280, 7,
                 _cuts(('block_2_add', 24, 56), ('block_4_add', 24, 28), ('block_5_add', 24, 28), ('block_6_expand_relu', 144, 28), ('block_7_add', 48, 14), ('block_8_add', 48, 14), ('block_9_add', 48, 14), ('block_11_add', 72, 14), ('block_12_add', 72, 14), ('block_13_expand_relu', 432, 14), ('block_14_add', 120, 7), ('block_15_add', 120, 7), ('out_relu', 1280, 7)),
                 kwargs={'alpha': 0.75}, pretrained_sizes=(96, 128, 160, 192, 224)),
    BackboneSpec('mobilenet_v2_1.0', 'MobileNetV2', 'mobilenet_v2', 'tf', 224, 2257984, 1280, 7,
                 _cuts(('block_2_add', 24, 56), ('block_4_add', 32, 28), ('block_5_add', 32, 28), ('block_6_expand_relu', 192, 28), ('block_7_add', 64, 14), ('block_8_add', 64, 14), ('block_9_add', 64, 14), ('block_11_add', 96, 14), ('block_12_add', 96, 14), ('block_13_expand_relu', 576, 14), ('block_14_add', 160, 7), ('block_15_add', 160, 7), ('out_relu', 1280, 7)),
                 kwargs={'alpha': 1.0}, pretrained_sizes=(96, 128, 160, 192, 224), aliases=("mobilenet_v2", "mobilenetv2")),
    BackboneSpec('mobilenet_v2_1.3', 'MobileNetV2', 'mobilenet_v2', 'tf', 224, 3766048, 1664, 7,
                 _cuts(('block_2_add', 32, 56), ('block_4_add', 40, 28), ('block_5_add', 40, 28), ('block_6_expand_relu', 240, 28), ('block_7_add', 80, 14), ('block_8_add', 80, 14), ('block_9_add', 80, 14), ('block_11_add', 128, 14), ('block_12_add', 128, 14), ('block_13_expand_relu', 768, 14), ('block_14_add', 208, 7), ('block_15_add', 208, 7), ('out_relu', 1664, 7)),
                 kwargs={'alpha': 1.3}, pretrained_sizes=(96, 128, 160, 192, 224)),
    BackboneSpec('mobilenet_v2_1.4', 'MobileNetV2', 'mobilenet_v2', 'tf', 224, 4363712, 1792, 7,
                 _cuts(('block_2_add', 32, 56), ('block_4_add', 48, 28), ('block_5_add', 48, 28), ('block_6_expand_relu', 288, 28), ('block_7_add', 88, 14), ('block_8_add', 88, 14), ('block_9_add', 88, 14), ('block_11_add', 136, 14), ('block_12_add', 136, 14), ('block_13_expand_relu', 816, 14), ('block_14_add', 224, 7), ('block_15_add', 224, 7), ('out_relu', 1792, 7)),
                 kwargs={'alpha': 1.4}, pretrained_sizes=(96, 128, 160, 192, 224)),
    BackboneSpec('mobilenet_0.25', 'MobileNet', 'mobilenet', 'tf', 224, 218544, 256, 7,
                 _cuts(('conv_pw_1_relu', 16, 112), ('conv_pw_2_relu', 32, 56), ('conv_pw_3_relu', 32, 56), ('conv_pw_4_relu', 64, 28), ('conv_pw_5_relu', 64, 28), ('conv_pw_6_relu', 128, 14), ('conv_pw_7_relu', 128, 14), ('conv_pw_8_relu', 128, 14), ('conv_pw_9_relu', 128, 14), ('conv_pw_10_relu', 128, 14), ('conv_pw_11_relu', 128, 14), ('conv_pw_12_relu', 256, 7), ('conv_pw_13_relu', 256, 7)),
                 kwargs={'alpha': 0.25}, pretrained_sizes=(128, 160, 192, 224)),
    BackboneSpec('mobilenet_0.5', 'MobileNet', 'mobilenet', 'tf', 224, 829536, 512, 7,
                 _cuts(('conv_pw_1_relu', 32, 112), ('conv_pw_2_relu', 64, 56), ('conv_pw_3_relu', 64, 56), ('conv_pw_4_relu', 128, 28), ('conv_pw_5_relu', 128, 28), ('conv_pw_6_relu', 256, 14), ('conv_pw_7_relu', 256, 14), ('conv_pw_8_relu', 256, 14), ('conv_pw_9_relu', 256, 14), ('conv_pw_10_relu', 256, 14), ('conv_pw_11_relu', 256, 14), ('conv_pw_12_relu', 512, 7), ('conv_pw_13_relu', 512, 7)),
                 kwargs={'alpha': 0.5}, pretrained_sizes=(128, 160, 192, 224)),
    BackboneSpec('mobilenet_0.75', 'MobileNet', 'mobilenet', 'tf', 224, 1832976, 768, 7,
                 _cuts(('conv_pw_1_relu', 48, 112), ('conv_pw_2_relu', 96, 56), ('conv_pw_3_relu', 96, 56), ('conv_pw_4_relu', 192, 28), ('conv_pw_5_relu', 192, 28), ('conv_pw_6_relu', 384, 14), ('conv_pw_7_relu', 384, 14), ('conv_pw_8_relu', 384, 14), ('conv_pw_9_relu', 384, 14), ('conv_pw_10_relu', 384, 14), ('conv_pw_11_relu', 384, 14), ('conv_pw_12_relu', 768, 7), ('conv_pw_13_relu', 768, 7)),
                 kwargs={'alpha': 0.75}, pretrained_sizes=(128, 160, 192, 224)),
    BackboneSpec('mobilenet_1.0', 'MobileNet', 'mobilenet', 'tf', 224, 3228864, 1024, 7,
                 _cuts(('conv_pw_1_relu', 64, 112), ('conv_pw_2_relu', 128, 56), ('conv_pw_3_relu', 128, 56), ('conv_pw_4_relu', 256, 28), ('conv_pw_5_relu', 256, 28), ('conv_pw_6_relu', 512, 14), ('conv_pw_7_relu', 512, 14), ('conv_pw_8_relu', 512, 14), ('conv_pw_9_relu', 512, 14), ('conv_pw_10_relu', 512, 14), ('conv_pw_11_relu', 512, 14), ('conv_pw_12_relu', 1024, 7), ('conv_pw_13_relu', 1024, 7)),
                 kwargs={'alpha': 1.0}, pretrained_sizes=(128, 160, 192, 224), aliases=("mobilenet", "mobilenet_v1")),
    BackboneSpec('mobilenet_v3_small', 'MobileNetV3Small', 'mobilenet_v3', 'builtin', 224, 939120, 576, 7,
                 _cuts(('expanded_conv_2_add', 24, 28), ('expanded_conv_4_add', 40, 14), ('expanded_conv_5_add', 40, 14), ('expanded_conv_7_add', 48, 14), ('expanded_conv_9_add', 96, 7), ('expanded_conv_10_add', 96, 7)),
                 ),
    BackboneSpec('mobilenet_v3_large', 'MobileNetV3Large', 'mobilenet_v3', 'builtin', 224, 2996352, 960, 7,
                 _cuts(('expanded_conv_add', 16, 112), ('expanded_conv_2_add', 24, 56), ('expanded_conv_4_add', 40, 28), ('expanded_conv_5_add', 40, 28), ('expanded_conv_7_add', 80, 14), ('expanded_conv_8_add', 80, 14), ('expanded_conv_9_add', 80, 14), ('expanded_conv_11_add', 112, 14), ('expanded_conv_13_add', 160, 7), ('expanded_conv_14_add', 160, 7)),
                 ),
    BackboneSpec('vgg16', 'VGG16', 'vgg16', 'caffe', 224, 14714688, 512, 7,
                 _cuts(('block1_pool', 64, 112), ('block2_pool', 128, 56), ('block3_pool', 256, 28), ('block4_pool', 512, 14), ('block5_pool', 512, 7)),
                 ),
    BackboneSpec('vgg19', 'VGG19', 'vgg19', 'caffe', 224, 20024384, 512, 7,
                 _cuts(('block1_pool', 64, 112), ('block2_pool', 128, 56), ('block3_pool', 256, 28), ('block4_pool', 512, 14), ('block5_pool', 512, 7)),
                 ),
    BackboneSpec('resnet50', 'ResNet50', 'resnet', 'caffe', 224, 23587712, 2048, 7,
                 _cuts(('pool1_pool', 64, 56), ('conv2_block3_out', 256, 56), ('conv3_block4_out', 512, 28), ('conv4_block6_out', 1024, 14), ('conv5_block3_out', 2048, 7)),
                 ),
    BackboneSpec('resnet50_v2', 'ResNet50V2', 'resnet_v2', 'tf', 224, 23564800, 2048, 7,
                 _cuts(('pool1_pool', 64, 56), ('conv2_block3_out', 256, 28), ('conv3_block4_out', 512, 14), ('conv4_block6_out', 1024, 7), ('post_relu', 2048, 7)),
                 ),
    BackboneSpec('xception', 'Xception', 'xception', 'tf', 299, 20861480, 2048, 10,
                 _cuts(('block2_pool', 128, 74), ('block3_pool', 256, 37), ('block4_pool', 728, 19), ('block13_pool', 1024, 10), ('block14_sepconv2_act', 2048, 10)),
                 min_size=71),
    BackboneSpec('inception_v3', 'InceptionV3', 'inception_v3', 'tf', 299, 21802784, 2048, 8,
                 _cuts(('mixed0', 256, 35), ('mixed1', 288, 35), ('mixed2', 288, 35), ('mixed3', 768, 17), ('mixed4', 768, 17), ('mixed5', 768, 17), ('mixed6', 768, 17), ('mixed7', 768, 17), ('mixed8', 1280, 8), ('mixed9', 2048, 8), ('mixed10', 2048, 8)),
                 min_size=75),
    BackboneSpec('densenet121', 'DenseNet121', 'densenet', 'torch', 224, 7037504, 1024, 7,
                 _cuts(('pool2_pool', 128, 28), ('pool3_pool', 256, 14), ('pool4_pool', 512, 7), ('relu', 1024, 7)),
                 ),
    BackboneSpec('efficientnet_b0', 'EfficientNetB0', 'efficientnet', 'builtin', 224, 4049571, 1280, 7,
                 _cuts(('block2b_add', 24, 56), ('block3b_add', 40, 28), ('block4b_add', 80, 14), ('block4c_add', 80, 14), ('block5b_add', 112, 14), ('block5c_add', 112, 14), ('block6b_add', 192, 7), ('block6c_add', 192, 7), ('block6d_add', 192, 7), ('top_activation', 1280, 7)),
                 ),
    BackboneSpec('efficientnet_b1', 'EfficientNetB1', 'efficientnet', 'builtin', 240, 6575239, 1280, 8,
                 _cuts(('block1b_add', 16, 120), ('block2b_add', 24, 60), ('block2c_add', 24, 60), ('block3b_add', 40, 30), ('block3c_add', 40, 30), ('block4b_add', 80, 15), ('block4c_add', 80, 15), ('block4d_add', 80, 15), ('block5b_add', 112, 15), ('block5c_add', 112, 15), ('block5d_add', 112, 15), ('block6b_add', 192, 8), ('block6c_add', 192, 8), ('block6d_add', 192, 8), ('block6e_add', 192, 8), ('block7b_add', 320, 8), ('top_activation', 1280, 8)),
                 ),
    BackboneSpec('efficientnet_b2', 'EfficientNetB2', 'efficientnet', 'builtin', 260, 7768569, 1408, 9,
                 _cuts(('block1b_add', 16, 130), ('block2b_add', 24, 65), ('block2c_add', 24, 65), ('block3b_add', 48, 33), ('block3c_add', 48, 33), ('block4b_add', 88, 17), ('block4c_add', 88, 17), ('block4d_add', 88, 17), ('block5b_add', 120, 17), ('block5c_add', 120, 17), ('block5d_add', 120, 17), ('block6b_add', 208, 9), ('block6c_add', 208, 9), ('block6d_add', 208, 9), ('block6e_add', 208, 9), ('block7b_add', 352, 9), ('top_activation', 1408, 9)),
                 ),
    BackboneSpec('efficientnet_b3', 'EfficientNetB3', 'efficientnet', 'builtin', 300, 10783535, 1536, 10,
                 _cuts(('block1b_add', 24, 150), ('block2b_add', 32, 75), ('block2c_add', 32, 75), ('block3b_add', 48, 38), ('block3c_add', 48, 38), ('block4b_add', 96, 19), ('block4c_add', 96, 19), ('block4d_add', 96, 19), ('block4e_add', 96, 19), ('block5b_add', 136, 19), ('block5c_add', 136, 19), ('block5d_add', 136, 19), ('block5e_add', 136, 19), ('block6b_add', 232, 10), ('block6c_add', 232, 10), ('block6d_add', 232, 10), ('block6e_add', 232, 10), ('block6f_add', 232, 10), ('block7b_add', 384, 10), ('top_activation', 1536, 10)),
                 ),
    BackboneSpec('efficientnet_v2_b0', 'EfficientNetV2B0', 'efficientnet_v2', 'builtin', 224, 5919312, 1280, 7,
                 _cuts(('block2b_add', 32, 56), ('block3b_add', 48, 28), ('block4b_add', 96, 14), ('block4c_add', 96, 14), ('block5b_add', 112, 14), ('block5c_add', 112, 14), ('block5d_add', 112, 14), ('block5e_add', 112, 14), ('block6b_add', 192, 7), ('block6c_add', 192, 7), ('block6d_add', 192, 7), ('block6e_add', 192, 7), ('block6f_add', 192, 7), ('block6g_add', 192, 7), ('block6h_add', 192, 7), ('top_activation', 1280, 7)),
                 ),
    BackboneSpec('convnext_tiny', 'ConvNeXtTiny', 'convnext', 'builtin', 224, 27820128, 768, 7,
                 _cuts(('convnext_tiny_stage_0_block_0_identity', 96, 56), ('convnext_tiny_stage_0_block_1_identity', 96, 56), ('convnext_tiny_stage_0_block_2_identity', 96, 56), ('convnext_tiny_stage_1_block_0_identity', 192, 28), ('convnext_tiny_stage_1_block_1_identity', 192, 28), ('convnext_tiny_stage_1_block_2_identity', 192, 28), ('convnext_tiny_stage_2_block_0_identity', 384, 14), ('convnext_tiny_stage_2_block_1_identity', 384, 14), ('convnext_tiny_stage_2_block_2_identity', 384, 14), ('convnext_tiny_stage_2_block_3_identity', 384, 14), ('convnext_tiny_stage_2_block_4_identity', 384, 14), ('convnext_tiny_stage_2_block_5_identity', 384, 14), ('convnext_tiny_stage_2_block_6_identity', 384, 14), ('convnext_tiny_stage_2_block_7_identity', 384, 14), ('convnext_tiny_stage_2_block_8_identity', 384, 14), ('convnext_tiny_stage_3_block_0_identity', 768, 7), ('convnext_tiny_stage_3_block_1_identity', 768, 7), ('convnext_tiny_stage_3_block_2_identity', 768, 7)),
                 ),
)}
# fmt: on

_ALIASES = {alias: spec.name for spec in REGISTRY.values() for alias in spec.aliases}


def get_backbone(name: str) -> BackboneSpec:
    """Look a backbone up by name or alias (case-insensitive; ``-`` and ``_`` alike)."""
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key in REGISTRY:
        return REGISTRY[key]
    raise UnknownNameError(f"unknown backbone {name!r}; `tlpipe backbones` lists them: {', '.join(REGISTRY)}")


def list_backbones() -> list[BackboneSpec]:
    return list(REGISTRY.values())
