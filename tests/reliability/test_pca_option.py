"""--pca means what it says (issue 34, kind 9): an integer number of components (1 to min(rows, dims)) or a
fraction of the variance in (0, 1); anything else (0, 1.0, 2.7, 5000 on 1280-d rows) is refused in one line naming
both forms, by the library's one rule; the head's sidecar and the outputs of fit-head and compare state the
dimensions kept."""

import json

import pytest

from tests.reliability.conftest import one_line_error, tlpipe
from tlpipe.features.cache import read_feature_set
from tlpipe.pipeline.heads.estimators import fit_head
from tlpipe.pipeline.heads.fit import train_head
from tlpipe.pipeline.heads.selection import compare_heads

BAD = ["0", "0.0", "1.0", "2.7", "-3", "1e3", "nan", "inf", "True", "half", 0, 1.0, 2.7, -1, True, float("nan")]


@pytest.mark.parametrize("value", BAD)
def test_the_library_refuses_what_is_neither_form(value):
    from tlpipe.pipeline.heads.estimators import check_pca

    with pytest.raises(ValueError, match=r"number of components.*\(0, 1\)"):
        check_pca(value)


def test_the_library_accepts_both_forms_and_bounds_the_components():
    from tlpipe.pipeline.heads.estimators import check_pca

    assert [check_pca(v) for v in ("auto", "none", None, 3, "3", 0.5, "0.95", "1")] == [
        "auto",
        None,
        None,
        3,
        3,
        0.5,
        0.95,
        1,
    ]
    assert check_pca(12, rows=12, dim=1280) == 12
    with pytest.raises(ValueError, match=r"at most 12 .*min\(rows, dimensions\)"):
        check_pca(5000, rows=12, dim=1280)


def test_library_entry_points_refuse_before_fitting(head):
    fs = read_feature_set(head.cache)
    for pca in (1.0, 2.7, 0):
        with pytest.raises(ValueError, match="number of components"):
            train_head(head.cache, out=head.cache.parent / "never.joblib", pca=pca)
        with pytest.raises(ValueError, match="number of components"):
            compare_heads(fs, ["logreg"], cv=2, n_jobs=1, pca=pca)
    with pytest.raises(ValueError, match="at most"):
        fit_head(fs.X, fs.y, "logreg", pca=5000)
    assert not (head.cache.parent / "never.joblib").exists()


@pytest.mark.parametrize("value", ["0", "1.0", "2.7", "5000"])
def test_fit_head_refuses_in_one_line_naming_both_forms(tmp_path, head, value):
    line = one_line_error(tlpipe("fit-head", head.cache, "--out", tmp_path / "h.joblib", "--pca", value))
    assert "number of components" in line and "(0, 1)" in line and value in line
    assert not (tmp_path / "h.joblib").exists()


def test_compare_refuses_too(head):
    for value in ("1.0", "5000"):
        line = one_line_error(tlpipe("compare", head.cache, "--models", "logreg", "--cv", "2", "--pca", value))
        assert "number of components" in line


@pytest.mark.parametrize("value", ["3", "0.9"])
def test_the_dimensions_kept_are_stated_by_fit_head_its_sidecar_and_compare(tmp_path, head, value):
    out = tmp_path / "h.joblib"
    run = tlpipe("fit-head", head.cache, "--out", out, "--pca", value)
    assert run.returncode == 0, run.stderr
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    kept = sidecar["head"]["dimensions"]
    assert kept["input"] == 1280 and 1 <= kept["kept"] <= 12 and (value != "3" or kept["kept"] == 3)
    assert f"{kept['kept']} of 1280 dimensions kept" in run.stdout, run.stdout
    compared = tlpipe("compare", head.cache, "--models", "logreg", "--cv", "2", "--pca", value)
    assert compared.returncode == 0 and "of 1280 dimensions" in compared.stdout, compared.stdout + compared.stderr
