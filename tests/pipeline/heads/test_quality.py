"""Quality on real photos (../shared): a preprocessing or conversion bug shows up here as a drop toward chance."""

import pytest

from tlpipe.features.cache import read_feature_set
from tlpipe.pipeline.heads.selection import compare_heads

pytestmark = [pytest.mark.shared, pytest.mark.slow]


def test_best_head_reaches_098_on_cats_vs_dogs(cats_dogs_cache):
    fs = read_feature_set(cats_dogs_cache)
    assert len(fs) == 1000 and set(fs.split) == {"train", "test"}
    result = compare_heads(fs, ("logreg", "svm", "rbf-svm", "mlp"), cv=5, holdout=False)
    best = result.head(result.best)
    assert best.accuracy >= 0.98, result.to_dict()["heads"]
