"""fit-head from the very first labels (issue 31, issue 34 item kind 14): a logreg head on classes too small to
choose C by cross-validation fits with a fixed, documented C and says so naming the class; fit-head holds
nothing out when there is too little to hold out, and the hold-out sizes it prints are the sizes it used."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

from tlpipe.pipeline.heads import estimators as heads
from tlpipe.pipeline.heads.estimators import fit_head
from tlpipe.pipeline.heads.fit import train_head
from tlpipe.pipeline.heads.persistence import load_head


def test_logreg_on_two_rows_of_a_class_fits_with_the_fixed_c_and_names_the_class(synthetic):
    X, y = synthetic((6, 5, 2), 32, 3)
    names = np.array(["cat", "dog", "lynx"])[y]
    with pytest.warns(UserWarning) as caught:
        head, info = fit_head(X, names, "logreg")
    notes = [str(w.message) for w in caught if "fixed C" in str(w.message)]
    assert len(notes) == 1, [str(w.message) for w in caught]
    note, fixed, folds = notes[0], heads.LOGREG_FIXED_C, heads.LOGREG_CV_FOLDS
    assert "\n" not in note and "'lynx'" in note and "2 labelled rows" in note
    assert f"C = {fixed:g}" in note and f"label at least {folds} per class" in note
    assert float(np.ravel(head[-1].C_)[0]) == fixed
    assert info["params"]["C"] == fixed and info["params"]["C_chosen_by"].startswith("fixed")
    assert list(head.classes_) == ["cat", "dog", "lynx"]
    assert len(set(head.predict(X))) > 1  # a fitted classifier, not the majority class
    # with 3 rows in every class C is chosen by the internal CV again, without that note
    X3, y3 = synthetic((6, 5, 3), 32, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head3, info3 = fit_head(X3, np.array(["cat", "dog", "lynx"])[y3], "logreg")
    assert info3["params"]["C_chosen_by"].startswith(f"internal {heads.LOGREG_CV_FOLDS}-fold CV")


def test_fit_head_on_two_labelled_photos_per_class_holds_nothing_out_and_says_so(synthetic, cache_writer, tmp_path):
    X, y = synthetic((2, 2, 2), 32, 1)
    path = cache_writer(tmp_path / "two.h5", X, y, class_names=["cat", "dog", "lynx"])
    with pytest.warns(UserWarning, match="fixed C"):
        result = train_head(path, "logreg", tmp_path / "head.joblib")
    assert result.evaluation is None
    assert result.setup.startswith("no hold-out: 6 labelled rows of 3 classes")
    assert "no held-out figures" in result.setup
    head, metadata = load_head(tmp_path / "head.joblib")
    assert metadata["training"]["rows"] == 6 and len(metadata["training"]["sha256"]) == 6
    assert metadata["evaluation"]["rows"] == 0 and metadata["evaluation"]["sha256"] == []
    # never figures from training rows: the sidecar's metrics hold no accuracy at all
    assert not {"accuracy", "macro_f1", "log_loss", "n"} & set(metadata["metrics"])


def test_the_hold_out_printed_is_the_hold_out_used(synthetic, cache_writer, tmp_path):
    # 4 rows of each of 5 classes: a 0.2 hold-out is 4 rows, one short of a row per class; the old code held out 5
    # (25 %) and printed "test_size 0.2"
    X, y = synthetic((4, 4, 4, 4, 4), 32, 2)
    path = cache_writer(tmp_path / "four.h5", X, y)
    result = train_head(path, "logreg", tmp_path / "head.joblib")
    assert result.evaluation is None and result.setup.startswith("no hold-out: 20 labelled rows of 5 classes")
    # enough rows: the stratified hold-out's printed sizes are the rows used
    X, y = synthetic((12, 12, 11), 32, 2)
    path = cache_writer(tmp_path / "enough.h5", X, y)
    result = train_head(path, "logreg", tmp_path / "head2.joblib")
    held = re.search(r"(\d+) train, (\d+) evaluation \((\d+) % of (\d+) labelled rows", result.setup)
    assert held, result.setup
    train, evaluation, share, total = map(int, held.groups())
    assert (train, evaluation, total) == (28, 7, 35) and share == 20
    assert result.evaluation.n == evaluation and result.metadata["training"]["rows"] == train


def test_mlp_on_300_classes_of_two_images_holds_nothing_out_and_says_what_its_early_stopping_did(
    synthetic, cache_writer, tmp_path
):
    X, y = synthetic((2,) * 300, 16, 4)
    path = cache_writer(tmp_path / "many.h5", X, y)
    with pytest.warns(UserWarning, match="early stopping off"):
        result = train_head(path, "mlp", tmp_path / "head.joblib")
    assert result.evaluation is None and "test_size 0.2" not in result.setup
    assert result.setup.startswith("no hold-out: 600 labelled rows of 300 classes")
    assert "mlp early stopping off" in result.setup and result.metadata["training"]["rows"] == 600
    # with rows enough, the mlp's own validation share is printed with the rows it holds
    X, y = synthetic((30, 30, 30), 16, 4)
    path = cache_writer(tmp_path / "mlp.h5", X, y)
    result = train_head(path, "mlp", tmp_path / "mlp.joblib")
    assert "72 train, 18 evaluation" in result.setup
    assert "mlp early stopping validates on 8 of the 72 training rows (validation_fraction 0.1)" in result.setup
