"""Exact class activation maps: the mean of a linear head's map is its class score minus the folded intercept."""

from __future__ import annotations

import numpy as np
import pytest

from tlpipe.pipeline.heads.cam import NoExactMap, class_activation_maps
from tlpipe.pipeline.heads.estimators import fit_head


def _spatial(n=90, h=5, w=6, d=24, classes=3, seed=0):
    """ReLU'd spatial maps whose pooled means separate ``classes`` classes (class evidence in a region)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    maps = np.maximum(rng.normal(0, 1, (n, h, w, d)), 0)
    for k in range(classes):
        maps[y == k, : h // 2, :, k * 4 : k * 4 + 4] += 2.0
    return maps.astype(np.float32), np.array([f"c{k}" for k in y])


@pytest.mark.parametrize("classes,pca", [(3, None), (3, 8), (2, None)])
def test_mean_of_the_map_is_the_score_minus_the_intercept(classes, pca):
    spatial, names = _spatial(classes=classes)
    pooled = spatial.mean(axis=(1, 2))
    estimator, _ = fit_head(pooled, names, "logreg", pca=pca)
    maps, intercepts, labels = class_activation_maps(spatial, estimator)
    scores = estimator.decision_function(pooled)
    if scores.ndim == 1:
        scores = np.stack([-scores, scores], axis=1)
    assert labels == list(estimator.classes_) and maps.shape == (len(spatial), len(labels), 5, 6)
    np.testing.assert_allclose(maps.mean(axis=(2, 3)), scores - intercepts, atol=1e-4)
    # the evidence planted in the top half of each class's images lands there
    top = maps[:, :, :2].mean(axis=(2, 3)) - maps[:, :, 3:].mean(axis=(2, 3))
    for k, name in enumerate(labels):
        assert top[names == name, k].mean() > 0


@pytest.mark.parametrize("head", ["mlp", "rbf-svm"])
def test_heads_without_an_exact_map_are_refused_naming_why(head):
    spatial, names = _spatial()
    estimator, _ = fit_head(spatial.mean(axis=(1, 2)), names, head)
    with pytest.raises(NoExactMap, match="no exact class activation map"):
        class_activation_maps(spatial, estimator)
