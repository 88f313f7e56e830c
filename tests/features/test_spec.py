"""FeatureSpec and RunOptions: one source of truth for the defaults and the rules; the key is the feature-set key."""

from __future__ import annotations

import dataclasses

import pytest

from tlpipe.backbones.choice import ModelChoice
from tlpipe.errors import InputError
from tlpipe.features.cache import feature_set_key, split_feature_set_key
from tlpipe.features.spec import FeatureSpec, RunOptions


def test_feature_set_keys_split_back_into_their_settings():
    for resize in ("squash", "crop"):
        for resize_filter in ("bilinear", "antialias"):
            key = feature_set_key("mobilenet_v2_1.0-224-full-avg-0123456789abcdef", resize, resize_filter)
            model, r, f = split_feature_set_key(key)
            assert model == "mobilenet_v2_1.0-224-full-avg-0123456789abcdef"
            # a setting the key does not spell out is None: the key is then also a plain model key
            assert r == (None if resize == "squash" else resize)
            assert f == (None if resize_filter == "antialias" else resize_filter)


def test_a_spec_is_a_frozen_model_choice_with_its_image_settings():
    spec = FeatureSpec(backbone="mobilenet_v2_0.35", weights="none", size=64, resize="crop")
    assert isinstance(spec, ModelChoice)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.size = 96  # type: ignore[misc]
    assert spec.model_choice == ModelChoice(backbone="mobilenet_v2_0.35", weights="none", size=64)
    assert spec.settled().resize == "crop" and spec.settled().resize_filter == "bilinear"  # the defaults, once


def test_from_key_and_settled_take_the_settings_the_key_spells_out():
    key = feature_set_key("somemodel-0123456789abcdef", "crop", "bilinear")
    spec = FeatureSpec.from_key(key)
    assert spec.model == "somemodel-0123456789abcdef" and spec.resize == "crop" and spec.resize_filter == "bilinear"
    settled = FeatureSpec(backbone=None, model=key).settled()
    assert (settled.model, settled.resize, settled.resize_filter) == ("somemodel-0123456789abcdef", "crop", "bilinear")
    with pytest.raises(InputError, match="disagrees with the feature-set key"):
        FeatureSpec(backbone=None, model=key, resize="squash").settled()


def test_the_key_of_a_registry_spec_is_the_key_extract_writes(tmp_path, tiny_entry, photo_folder):
    import tlpipe

    spec = FeatureSpec(backbone=None, model=str(tiny_entry.directory))
    summary = tlpipe.extract(photo_folder, tmp_path / "c.h5", choice=spec)
    assert spec.key == summary.key and FeatureSpec.from_key(summary.key).model == tiny_entry.key
    with pytest.raises(InputError, match="int8"):
        _ = dataclasses.replace(spec, precision="int8").key


@pytest.mark.parametrize(
    "bad",
    [{"resize": "stretch"}, {"resize_filter": "lanczos"}, {"dtype": "float64"}, {"pooling": "mean"}, {"tta": "x"}],
)
def test_check_refuses_each_bad_value_by_name(bad):
    with pytest.raises(InputError):
        FeatureSpec(**bad).check()


@pytest.mark.parametrize(
    "bad", [{"device": "gpu"}, {"engine": "spark"}, {"batch_size": 0}, {"workers": 0}, {"n_jobs": -1}]
)
def test_run_options_check_refuses_each_bad_value(bad):
    with pytest.raises(InputError):
        RunOptions(**bad).check()
    assert RunOptions().check() == RunOptions()
