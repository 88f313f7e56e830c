"""ModelChoice, the one value for "which model": built from a command's keywords, refusing what a command
does not take, and the same export plan as the arguments it replaces."""

from __future__ import annotations

import pytest

from tlpipe.backbones.choice import ModelChoice
from tlpipe.backbones.export import plan_export
from tlpipe.pipeline.bench import run_bench
from tlpipe.pipeline.training.finetune import prepare_finetune


def test_given_builds_from_keywords_and_refuses_mixtures_unknown_and_unused_fields():
    made = ModelChoice.given(None, {"backbone": "resnet50", "size": 160}, "extract")
    assert (made.backbone, made.size, made.weights, made.pooling) == ("resnet50", 160, "imagenet", "avg")
    assert ModelChoice.given(made, {}, "extract") is made
    with pytest.raises(TypeError, match="not both"):
        ModelChoice.given(made, {"size": 96}, "extract")
    with pytest.raises(TypeError, match="unexpected keyword arguments: sizes"):
        ModelChoice.given(None, {"sizes": 96}, "extract")
    used = ("backbone", "weights", "size")
    assert ModelChoice.given(None, {"size": 96}, "finetune", used).size == 96
    with pytest.raises(ValueError, match="finetune does not take layer, precision"):
        ModelChoice.given(ModelChoice(layer="block_13_expand_relu", precision="int8"), {}, "finetune", used)


def test_plan_is_the_export_plan_of_its_fields():
    choice = ModelChoice("mobilenet_v2_0.35", weights="none", size=96, layer="block_13_expand_relu", pooling="max")
    got, want = choice.plan(seed=3), plan_export("mobilenet_v2_0.35", "none", 96, "block_13_expand_relu", "max", seed=3)
    assert (got.spec.name, got.size, got.layer, got.pooling, got.weights) == (
        want.spec.name,
        want.size,
        want.layer,
        want.pooling,
        want.weights,
    )
    with pytest.raises(ValueError, match="registry backbone"):
        ModelChoice(backbone=None, model="some-key").plan()


def test_library_commands_refuse_model_fields_they_do_not_use(tmp_path):
    with pytest.raises(ValueError, match="finetune does not take precision"):
        prepare_finetune(tmp_path, tmp_path / "out", precision="int8")
    with pytest.raises(ValueError, match="bench does not take tta"):
        run_bench("mobilenet_v2_0.35", tta="flip")
