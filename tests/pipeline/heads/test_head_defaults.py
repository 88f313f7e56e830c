"""The logreg head's default: C picked by an internal 3-fold CV over LOGREG_CS, adapting to the data."""

import numpy as np
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

from tlpipe.pipeline.heads.estimators import LOGREG_CS, cross_validate, fit_head, make_head, summarize


def data(rows: int, dims: int, signal: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, rows)
    X = rng.normal(size=(rows, dims))
    X[:, :3] += signal * np.eye(3)[y]
    return X.astype(np.float32), y


def test_default_logreg_picks_c_by_internal_cv_and_it_depends_on_the_data():
    noisy = fit_head(*data(90, 600, 1.5), "logreg")[1]["params"]  # few rows, many useless dims: regularise
    clean = fit_head(*data(900, 4, 4.0), "logreg")[1]["params"]  # many rows, few informative dims: barely
    assert noisy["Cs"] == clean["Cs"] == list(LOGREG_CS)
    assert noisy["C"] in LOGREG_CS and clean["C"] in LOGREG_CS
    assert noisy["C"] <= 0.01 and clean["C"] >= 0.1, (noisy, clean)


def test_explicit_c_and_search_use_a_plain_logistic_regression():
    assert isinstance(make_head("logreg")[-1], LogisticRegressionCV)
    fixed = make_head("logreg", C=0.5)[-1]
    assert type(fixed) is LogisticRegression and fixed.C == 0.5
    X, y = data(150, 10, 3.0)
    rows = summarize(cross_validate(X, y, ["logreg"], cv=3, search=True, n_jobs=1))
    assert sorted(r["params"]["C"] for r in rows) == [0.001, 0.01, 0.1, 1.0]
    estimator, info = fit_head(X, y, "logreg", search=True, cv=3, n_jobs=1)
    assert type(estimator[-1]) is LogisticRegression and info["params"] == {"C": info["cv_results"][0]["params"]["C"]}
