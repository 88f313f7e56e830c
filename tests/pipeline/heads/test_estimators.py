import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.metrics import recall_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from tlpipe.features.cache import read_feature_set
from tlpipe.pipeline.heads import estimators as heads
from tlpipe.pipeline.heads.estimators import (
    HEADS,
    class_balance,
    cross_validate,
    fit,
    fit_head,
    grid_points,
    head_name,
    make_head,
    resolve_pca,
    search_space,
    select_split,
    summarize,
)

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def separable(synthetic):
    X, y = synthetic((60, 60, 60), dim=48, seed=1, spread=5.0)
    return X[:135], y[:135], X[135:], y[135:]


@pytest.mark.parametrize("name", HEADS)
def test_head_is_a_real_estimator(name, separable):
    X, y, X_test, y_test = separable
    head = make_head(name, seed=0)
    assert head_name(head) == name
    twin = clone(head)
    assert twin.get_params(deep=False).keys() == head.get_params(deep=False).keys()
    # logreg without an explicit C picks it from its grid Cs by internal CV (LogisticRegressionCV)
    key = {"logreg": "logreg__Cs", "svm": "svm__estimator__C", "rbf-svm": "rbf_svm__estimator__C", "mlp": "mlp__alpha"}[
        name
    ]
    value = [0.5] if name == "logreg" else 0.5
    twin.set_params(**{key: value})
    assert twin.get_params()[key] == value and head.get_params()[key] != value
    outer = Pipeline([("cast", FunctionTransformer(lambda a: a.astype(np.float64))), ("head", head)]).fit(X, y)
    proba = outer.predict_proba(X_test)
    assert proba.shape == (len(X_test), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-6)
    np.testing.assert_array_equal(outer.classes_, [0, 1, 2])
    assert np.mean(outer.predict(X_test) == y_test) >= 0.9


def test_unknown_head_and_mlp_class_weight_are_refused():
    with pytest.raises(ValueError, match="unknown head 'knn'"):
        make_head("knn")
    with pytest.raises(ValueError, match="sample weights"):
        make_head("mlp", class_weight="balanced")


def test_pca_step_and_auto_rule():
    assert make_head("logreg", pca=8).named_steps["pca"].n_components == 8
    assert "pca" not in make_head("rbf-svm").named_steps
    assert resolve_pca("rbf-svm", "auto", (10000, 1280)) == 256
    assert resolve_pca("rbf-svm", "auto", (10000, 128)) is None  # no fewer dimensions to gain
    assert resolve_pca("rbf-svm", "auto", (500, 1280)) is None  # too few rows
    assert resolve_pca("logreg", "auto", (10000, 1280)) is None
    assert resolve_pca("logreg", 32, (100, 64)) == 32


@pytest.mark.parametrize("name", ["mlp", "rbf-svm"])
def test_seed_reproducible(name, separable):
    X, y, X_test, _ = separable
    a, _ = fit_head(X, y, name, seed=3)
    b, _ = fit_head(X, y, name, seed=3)
    np.testing.assert_array_equal(a.predict_proba(X_test), b.predict_proba(X_test))
    if name == "mlp":
        c, _ = fit_head(X, y, name, seed=4)
        assert not np.array_equal(a.predict_proba(X_test), c.predict_proba(X_test))


def test_search_picks_the_best_grid_point(separable, monkeypatch):
    X, y, X_test, y_test = separable
    # gamma=1000 makes every kernel row an indicator: near-chance accuracy, so the search must avoid it.
    monkeypatch.setattr(heads, "search_space", lambda name: {"C": [10.0], "gamma": [1000.0, "scale"]})
    estimator, info = fit_head(X, y, "rbf-svm", search=True, cv=3, n_jobs=1)
    assert info["params"] == {"C": 10.0, "gamma": "scale"}
    assert estimator.get_params()["rbf_svm__estimator__gamma"] == "scale"
    results = info["cv_results"]
    assert len(results) == 2 and results[0]["params"]["gamma"] == "scale"
    assert info["cv_accuracy"] == max(r["accuracy"] for r in results) >= 0.9
    assert min(r["accuracy"] for r in results) < 0.6
    assert np.mean(estimator.predict(X_test) == y_test) >= 0.9


def test_default_grids_are_small_and_ordered_for_warm_starts():
    for name in HEADS:
        points = grid_points(name)
        assert 1 < len(points) <= 6
        assert all(set(p) == set(search_space(name)) for p in points)
    assert [p["C"] for p in grid_points("logreg")] == sorted(p["C"] for p in grid_points("logreg"))


def test_warm_started_c_path_matches_cold_fits(separable, monkeypatch):
    X, y, _, _ = separable
    warm = {r["params"]["C"]: r for r in summarize(cross_validate(X, y, ["logreg"], cv=3, search=True, n_jobs=1))}
    assert set(warm) == set(search_space("logreg")["C"])
    for C in (0.01, 1.0):
        monkeypatch.setattr(heads, "search_space", lambda name, C=C: {"C": [C]})
        (cold,) = summarize(cross_validate(X, y, ["logreg"], cv=3, search=True, n_jobs=1))
        assert cold["accuracy"] == pytest.approx(warm[C]["accuracy"], abs=0.02)
        assert cold["log_loss"] == pytest.approx(warm[C]["log_loss"], rel=0.02)


def test_select_split_uses_the_split_column(synthetic_cache):
    fs = synthetic_cache(
        n_per_class=(30, 30, 30), splits=lambda y: np.where(np.arange(len(y)) % 4 == 0, "test", "train")
    )
    train, test, description = select_split(fs)
    assert set(fs.split[train]) == {"train"} and set(fs.split[test]) == {"test"}
    assert len(train) + len(test) == len(fs)
    assert "split column" in description


def test_select_split_falls_back_to_val_and_excludes_unlabelled(synthetic, cache_writer, tmp_path):
    X, y = synthetic((20, 20), dim=16)
    y = y.copy()
    y[:5] = -1
    splits = np.where(np.arange(len(y)) % 5 == 0, "val", "train")
    fs = read_feature_set(cache_writer(tmp_path / "v.h5", X, y, splits=splits))
    train, test, description = select_split(fs)
    assert set(fs.split[test]) == {"val"} and set(fs.split[train]) == {"train"}
    assert np.all(fs.y[np.concatenate([train, test])] >= 0)
    assert "no 'test' split" in description and "5 unlabelled rows excluded" in description


def test_select_split_stratified_holdout(synthetic_cache):
    fs = synthetic_cache(n_per_class=(50, 30, 20))
    train, test, description = select_split(fs, test_size=0.2, seed=0)
    assert "stratified hold-out" in description
    assert not set(train) & set(test) and len(train) + len(test) == len(fs)
    per_class = dict(zip(*np.unique([fs.class_names[i] for i in fs.y[test]], return_counts=True)))
    assert per_class == {"class_0": 10, "class_1": 6, "class_2": 4}
    again, _, _ = select_split(fs, test_size=0.2, seed=0)
    other, _, _ = select_split(fs, test_size=0.2, seed=1)
    np.testing.assert_array_equal(train, again)
    assert not np.array_equal(train, other)


def test_class_balance():
    balance = class_balance(np.array([0, 0, 0, 0, 1, 2, 2, -1]), ["a", "b", "c", "d"])
    assert balance["counts"] == {"a": 4, "b": 1, "c": 2, "d": 0}
    assert balance["unlabelled"] == 1 and balance["labelled"] == 7
    assert balance["imbalance_ratio"] == 4.0 and balance["majority"] == "a" and balance["minority"] == "b"


def test_class_weight_balanced_lifts_the_minority_class(synthetic):
    X, y = synthetic((200, 12), dim=24, seed=2, spread=1.2)
    X_test, y_test = synthetic((200, 200), dim=24, seed=2, spread=1.2)  # same centres, fresh rows
    recalls = {}
    for weight in (None, "balanced"):
        estimator, info = fit_head(X, y, "logreg", class_weight=weight)
        assert info["class_weight"] == weight
        recalls[weight] = recall_score(y_test, estimator.predict(X_test), pos_label=1)
    assert recalls["balanced"] > recalls[None] + 0.1
    mlp = make_head("mlp", seed=0)
    fit(mlp, X, y, "balanced")  # sample weights reach the MLP
    assert hasattr(mlp[-1], "coefs_")


def test_core_modules_never_import_tensorflow_or_onnxruntime(tmp_path):
    blocked = tmp_path / "blocked"
    log = tmp_path / "attempts.log"
    for module in ("tensorflow", "onnxruntime"):
        (blocked / module).mkdir(parents=True)
        (blocked / module / "__init__.py").write_text(
            f"import os\nopen(os.environ['BLOCK_LOG'], 'a').write('{module}\\n')\nraise ImportError('blocked for test')\n"
        )
    script = textwrap.dedent("""
        import sys
        import numpy as np
        import tlpipe.features.cache, tlpipe.pipeline.heads.estimators, tlpipe.pipeline.heads.selection, tlpipe.pipeline.heads.evaluate, tlpipe.pipeline.heads.persistence
        from tlpipe.features.cache import FeatureSet
        from tlpipe.pipeline.heads.persistence import load_head, save_head
        from tlpipe.pipeline.heads.selection import compare_heads
        from tlpipe.pipeline.heads.evaluate import evaluate_head
        rng = np.random.default_rng(0)
        y = np.repeat([0, 1], 20).astype(np.int32)
        X = (rng.normal(0, 1, (40, 8)) + 3 * y[:, None]).clip(0).astype(np.float32)
        fs = FeatureSet("k", X, y, np.array(["train", "test"] * 20), np.array(["p"] * 40), np.array(["s"] * 40), ["a", "b"])
        result = compare_heads(fs, ("logreg", "svm"), cv=3, n_jobs=1)
        estimator, info = tlpipe.pipeline.heads.estimators.fit_head(X, y, "logreg")
        save_head(estimator, sys.argv[1], feature_set=fs, metrics={}, params=info)
        estimator, metadata = load_head(sys.argv[1])
        print(result.best, evaluate_head(estimator, metadata, fs).accuracy)
        assert "tensorflow" not in sys.modules and "onnxruntime" not in sys.modules, "imported"
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), str(ROOT)]), "BLOCK_LOG": str(log)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "head.joblib")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert not log.exists(), f"tried to import: {log.read_text()}"
    # the blocker itself works: importing tensorflow there fails and is recorded
    probe = subprocess.run([sys.executable, "-c", "import tensorflow"], env=env, capture_output=True, text=True)
    assert "blocked for test" in probe.stderr and log.read_text() == "tensorflow\n"


# Checks of scikit-learn's check_estimator that the heads fail, each because a plain scikit-learn Pipeline of
# the same steps (with scikit-learn's own classifier) fails it too; test_heads_pass_check_estimator proves that.
PIPELINE_FAILURES = {
    "check_estimators_overwrite_params": "Pipeline.fit fits the estimators held in its `steps` parameter in place, "
    "so that parameter holds fitted objects afterwards",
    "check_dont_overwrite_parameters": "same cause: `steps` (a public attribute) changes during fit",
}
MLP_FAILURES = {
    "check_classifiers_one_label": "MLPClassifier with early stopping first makes a stratified validation split; "
    "with one class that split's error is raised, not the 'one class' message the "
    "check looks for",
}
if tuple(int(v) for v in __import__("sklearn").__version__.split(".")[:2]) < (1, 9):
    MLP_FAILURES["check_classifiers_classes"] = (
        "scikit-learn 1.8's MLPClassifier early stopping scores string labels with np.isnan (TypeError); fixed in 1.9"
    )


@pytest.mark.parametrize("name", HEADS)
def test_heads_pass_check_estimator(name):
    import warnings

    from sklearn.neural_network import MLPClassifier
    from sklearn.utils import estimator_checks
    from sklearn.utils.estimator_checks import check_estimator

    expected = PIPELINE_FAILURES | (MLP_FAILURES if name == "mlp" else {})
    head = make_head(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(head, expected_failed_checks=expected, on_fail=None)
    failed = {r["check_name"] for r in results if r["status"] == "failed"}
    assert failed == set(), failed  # everything else passes
    assert {r["check_name"] for r in results if r["status"] == "xfail"} == set(expected)  # and these really fail
    # ... and fail for the plain Pipeline of the same steps with scikit-learn's own classifier too
    plain = Pipeline(
        [(k, MLPClassifier(**v.get_params()) if isinstance(v, heads.MLPHead) else v) for k, v in head.steps]
    )
    for check in expected:
        with warnings.catch_warnings(), pytest.raises((AssertionError, ValueError, TypeError)):
            warnings.simplefilter("ignore")
            getattr(estimator_checks, check)("plain", clone(plain))


def test_step_names_work_as_keyword_parameters_and_map_back(separable):
    X, y, _, _ = separable
    head = make_head("rbf-svm")
    assert [s for s, _ in head.steps] == ["l2", "scale", "rbf_svm"] and head_name(head) == "rbf-svm"
    head.set_params(rbf_svm__estimator__C=2.0)
    assert head.get_params()["rbf_svm__estimator__C"] == 2.0
    assert all("-" not in step for name in HEADS for step, _ in make_head(name).steps)


def test_mlp_fits_tiny_data_and_says_so():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(12, 6)) + np.repeat(np.eye(3, 6) * 4, 4, axis=0)
    y = np.repeat([0, 1, 2], 4)  # 10% of 12 rows is 1 row: fewer than 3 classes
    head = make_head("mlp")
    with pytest.warns(UserWarning, match="early stopping off for this fit"):
        head.fit(X, y)
    assert head[-1].early_stopping is True  # the parameter is left as set
    assert np.mean(head.predict(X) == y) == 1.0
    with pytest.warns(UserWarning, match="or a class has one row"):  # a singleton class cannot be stratified
        make_head("mlp").fit(np.vstack([X] * 10 + [X[:1]]), np.concatenate([np.tile(y, 10) % 2, [2]]))


def test_predict_returns_class_names_when_fitted_on_them(separable):
    X, y, X_test, y_test = separable
    names = np.array(["cat", "dog", "lynx"])
    for name in ("logreg", "svm"):
        head = make_head(name).fit(X, names[y])
        assert list(head.classes_) == ["cat", "dog", "lynx"]
        assert np.mean(head.predict(X_test) == names[y_test]) >= 0.9


def test_cli_defaults_are_the_library_defaults():
    import inspect

    from tlpipe.pipeline.cli import heads as cli
    from tlpipe.pipeline.heads import fit as train

    # one source of truth: fit-head / compare default to the library's pca="auto" (rbf-svm gets PCA-256 on
    # large sets in both), so the head fit-head saves is the head compare measured
    library = inspect.signature(fit_head).parameters["pca"].default
    assert library == "auto" == inspect.signature(train.train_head).parameters["pca"].default
    for command in (cli.fit_head, cli.compare):
        option = inspect.signature(command).parameters["pca"].default
        assert cli._pca(option.default) == library
    assert cli._pca("none") is None and cli._pca("32") == 32 and cli._pca("0.9") == 0.9
    X = np.random.default_rng(0).normal(size=(1100, 300)).astype(np.float32)
    y = np.arange(1100) % 2
    estimator, info = fit_head(X, y, "rbf-svm")
    assert info["pca"] == 256 == estimator.named_steps["pca"].n_components


def test_small_classes_stay_in_every_training_fold(synthetic):
    X, y = synthetic((30, 30, 2), dim=16, seed=2)
    with pytest.warns(UserWarning, match=r"class\(es\) 'lynx' \(2 rows\) have fewer rows than the 5 folds"):
        folds = heads.cv_folds(y, 5, class_names=["cat", "dog", "lynx"])
    small = np.flatnonzero(y == 2)
    for train, test in folds:
        assert set(small) <= set(train) and not set(small) & set(test)
        assert not set(train) & set(test)
    assert sorted(np.concatenate([test for _, test in folds])) == sorted(np.flatnonzero(y != 2))
    with pytest.raises(ValueError, match="class 'lynx' has only 2 labelled rows: svm calibrate"):
        heads.check_rows(y, ["svm"], 5, ["cat", "dog", "lynx"])


@pytest.mark.parametrize("classes", [2, 3, 5])
@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_svc_head_equals_libsvm(monkeypatch, classes, class_weight):
    # SVCHead computes RBF kernel values on BLAS, in fit and in the decision function; the fit and the decision
    # values must be libsvm's (a plain SVC), in every kernel block, for binary and one-vs-one multi-class heads
    from sklearn.svm import SVC

    rng = np.random.default_rng(classes)
    centres = rng.normal(size=(classes, 16)) * 1.5
    y = rng.integers(0, classes, 300)
    X = centres[y] + rng.normal(size=(300, 16))
    X_new = rng.normal(size=(97, 16)) * 2
    ours = heads.SVCHead(C=10.0, gamma="scale", class_weight=class_weight).fit(X, y)
    libsvm = SVC(C=10.0, gamma="scale", class_weight=class_weight).fit(X, y)
    # fitted on the BLAS Gram matrix: libsvm's solution, stored as an RBF fit
    np.testing.assert_array_equal(ours.support_, libsvm.support_)
    np.testing.assert_array_equal(ours.support_vectors_, libsvm.support_vectors_)
    np.testing.assert_allclose(ours.dual_coef_, libsvm.dual_coef_, rtol=0, atol=1e-8)
    np.testing.assert_allclose(ours.intercept_, libsvm.intercept_, rtol=0, atol=1e-8)
    assert (ours.kernel, ours.shape_fit_, ours.n_features_in_) == ("rbf", X.shape, 16)
    assert ours._gamma == pytest.approx(libsvm._gamma, rel=1e-12)
    reference = libsvm.decision_function(X_new)
    assert reference.shape == ((97,) if classes == 2 else (97, classes))
    monkeypatch.setattr(heads, "SVC_KERNEL_BLOCK", 8 * len(ours.support_vectors_) * 10)  # 10 rows per block
    np.testing.assert_allclose(ours.decision_function(X_new), reference, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(ours.predict(X_new), libsvm.predict(X_new))
    # a Gram matrix over the limit: libsvm's own kernel, the same model
    monkeypatch.setattr(heads, "SVC_GRAM_BYTES", 8 * 299**2)
    big = heads.SVCHead(C=10.0, gamma="scale", class_weight=class_weight).fit(X, y)
    np.testing.assert_allclose(big.decision_function(X_new), reference, rtol=0, atol=1e-8)
    # another kernel is libsvm's own
    linear = heads.SVCHead(kernel="linear").fit(X, y)
    plain_linear = SVC(kernel="linear").fit(X, y)
    np.testing.assert_array_equal(linear.decision_function(X_new), plain_linear.decision_function(X_new))


def test_rbf_svm_head_uses_the_blas_decision_function():
    head = make_head("rbf-svm")
    assert isinstance(head[-1].estimator, heads.SVCHead)
