import csv
import hashlib
import json

import numpy as np
import pytest
from rich.console import Console

from tlpipe.errors import InputError
from tlpipe.pipeline.heads.estimators import HEADS, search_space
from tlpipe.pipeline.heads.selection import HeadResult, choose_best, compare_heads
from tlpipe.pipeline.heads.selection import save_best_head as save_best
from tlpipe.pipeline.reports.compare import format_table, write_report


@pytest.fixture(scope="module")
def compared(tmp_path_factory, synthetic, cache_writer):
    from tlpipe.features.cache import read_feature_set

    X, y = synthetic((50, 50, 50, 50), dim=32, seed=4, spread=4.0)
    y = y.copy()
    y[:6] = -1  # a few unlabelled rows
    fs = read_feature_set(cache_writer(tmp_path_factory.mktemp("cmp") / "c.h5", X, y))
    return fs, compare_heads(fs, HEADS, cv=3, seed=0, n_jobs=2, holdout=False)


def test_compare_scores_every_head(compared):
    fs, result = compared
    assert [h.name for h in result.heads] == list(HEADS)
    assert result.rows == 194 and "6 unlabelled rows excluded" in result.setup
    from tlpipe.pipeline.heads.estimators import choose_logreg_c

    rows = fs.y >= 0
    for h in result.heads:
        # logreg's C is picked once on the cross-validated rows, as fit-head picks it; the others use defaults
        assert h.folds == 3 and h.params == (
            {"C": choose_logreg_c(fs.X[rows], fs.y[rows])} if h.name == "logreg" else {}
        )
        assert 0.8 <= h.accuracy <= 1 and 0 <= h.accuracy_std < 0.2 and 0.7 <= h.macro_f1 <= 1
        assert 0 < h.log_loss < 1.5 and h.fit_s > 0 and h.predict_s > 0
    assert result.best == choose_best(result.heads)[0].name and result.best in result.choice
    best = result.head(result.best)
    assert result.holdout is None and result.estimator is None and "no held-out rows" in result.setup
    # out-of-fold predictions of the best head reproduce its accuracy
    assert np.mean(result.y_pred == result.y_true) == pytest.approx(best.accuracy, abs=0.02)
    assert result.confusion.sum() == result.rows and sorted(result.class_names) == sorted(fs.class_names)
    assert result.balance["labelled"] == 194


REPORT_FILES = [
    "report.md",
    "results.csv",
    "results.json",
    "per_class.csv",
    "misclassified.csv",
    "comparison.png",
    "confusion_matrix.png",
    "reliability.png",
    "misclassified.png",
    "embedding_map_pca.png",
    "index.html",
]


def test_report_files(compared, tmp_path):
    fs, result = compared
    paths = write_report(result, tmp_path / "report")  # UMAP only when asked for (umap=True)
    assert sorted(p.name for p in paths.values()) == sorted(REPORT_FILES)  # no learning curve without a hold-out
    report = paths["report.md"].read_text()
    assert f"Best head: **{result.best}**. Why: {result.choice}" in report and "Class balance" in report
    assert all(f"| {name} |" in report for name in HEADS)
    assert "no row was held out" in report and f"accuracy {result.chance:.3f}" in report
    rows = list(csv.DictReader(paths["results.csv"].open()))
    assert [r["head"] for r in rows] == list(HEADS)
    assert float(rows[0]["accuracy"]) == pytest.approx(result.heads[0].accuracy)
    assert [r["best"] for r in rows].count("True") == 1
    data = json.loads(paths["results.json"].read_text())
    assert data["best"] == result.best and len(data["heads"]) == 4 and data["cv"] == 3
    assert data["choice"] == result.choice and data["chance"] == pytest.approx(50 / 194, abs=0.01)
    # per-class precision / recall / F1 of every head, out of fold, matching the confusion matrix of the best
    per_class = list(csv.DictReader(paths["per_class.csv"].open()))
    assert len(per_class) == 4 * len(fs.class_names) and {r["head"] for r in per_class} == set(HEADS)
    best_rows = {r["class"]: r for r in per_class if r["head"] == result.best}
    recall = np.diag(result.confusion) / result.confusion.sum(axis=1)
    for i, name in enumerate(result.class_names):
        assert float(best_rows[name]["recall"]) == pytest.approx(recall[i])
        assert int(best_rows[name]["support"]) == result.confusion[i].sum()
    # misclassified rows: exactly the out-of-fold mistakes of the best head, most confident first
    wrong = list(csv.DictReader(paths["misclassified.csv"].open()))
    assert len(wrong) == int(np.sum(result.y_pred != result.y_true))
    assert all(r["true"] != r["predicted"] for r in wrong)
    probabilities = [float(r["probability"]) for r in wrong]
    assert probabilities == sorted(probabilities, reverse=True)
    if wrong:  # the synthetic cache's paths are not files: the report says so instead of failing
        assert "could not be read from their paths" in report
    # reliability: ECE is the count-weighted gap between accuracy and confidence per bin
    for h in result.heads:
        bins = result.reliability[h.name]
        gaps = np.abs(np.subtract(bins["accuracy"], bins["confidence"])) * bins["count"]
        assert h.ece == pytest.approx(gaps.sum() / sum(bins["count"])) and 0 <= h.ece < 0.5
    # the 2-D map: every scored row once, misclassified ones flagged
    assert len(result.embedding_map["points"]["pca"]) == result.rows
    assert sum(result.embedding_map["misclassified"]) == len(wrong)
    for name in REPORT_FILES:
        if name.endswith(".png"):
            assert paths[name].read_bytes()[:4] == b"\x89PNG" and paths[name].stat().st_size > 1000


def test_format_table(compared):
    _, result = compared
    table = format_table(result)
    assert table.row_count == 4 and len(table.columns) == 7
    console = Console(record=True, width=160)
    console.print(table)
    text = console.export_text()
    assert all(name in text for name in HEADS) and f"{result.best} *" in text


def test_holdout_keeps_the_test_split_out_and_search(synthetic_cache):
    fs = synthetic_cache(
        n_per_class=(30, 30, 30), splits=lambda y: np.where(np.arange(len(y)) % 3 == 0, "test", "train")
    )
    result = compare_heads(fs, ("logreg",), cv=3, n_jobs=1, search=True)
    assert result.rows == int(np.sum(fs.split == "train")) and "'test'" in result.setup
    (head,) = result.heads
    assert len(head.grid) == len(search_space("logreg")["C"]) and head.params == head.grid[0]["params"]
    assert head.accuracy == max(row["accuracy"] for row in head.grid)


def test_parallel_equals_serial_and_too_few_rows_are_explained(synthetic_cache):
    fs = synthetic_cache(n_per_class=(20, 20, 5))
    serial = compare_heads(fs, ("logreg", "svm"), cv=3, n_jobs=1, holdout=False)
    parallel = compare_heads(fs, ("logreg", "svm"), cv=3, n_jobs=2, holdout=False)
    assert [h.accuracy for h in serial.heads] == [h.accuracy for h in parallel.heads]
    # a class smaller than the folds stays in training, named in the warning, and is never scored
    with pytest.warns(UserWarning, match=r"'class_2' \(5 rows\) have fewer rows than the 6 folds"):
        small = compare_heads(fs, ("logreg",), cv=6, n_jobs=1, holdout=False)
    assert small.head("logreg").per_class["class_2"]["support"] == 0 and small.rows == 45
    with pytest.raises(ValueError, match=r"two classes with 6 rows each; rows per class: .*'class_0' 5"):
        compare_heads(synthetic_cache(n_per_class=(5, 5, 20)), ("logreg",), cv=6, n_jobs=1, holdout=False)
    with pytest.raises(ValueError, match="class 'class_2' has only 4 labelled rows: svm calibrate"):
        compare_heads(synthetic_cache(n_per_class=(20, 20, 4)), ("svm",), cv=3, n_jobs=1, holdout=False)
    # the MLP fits tiny data (early stopping off where its validation share cannot hold every class)
    tiny = compare_heads(synthetic_cache(n_per_class=(8, 8, 8)), ("mlp",), cv=3, n_jobs=1, holdout=False)
    assert tiny.head("mlp").accuracy > 0.5


def _head(name, accuracy, std, loss, predict_s=0.01, folds=5):
    return HeadResult(
        name=name,
        params={},
        folds=folds,
        accuracy=accuracy,
        accuracy_std=std,
        macro_f1=accuracy,
        macro_f1_std=std,
        log_loss=loss,
        log_loss_std=0.01,
        fit_s=1.0,
        fit_s_std=0.1,
        predict_s=predict_s,
        predict_s_std=0.001,
    )


def test_best_is_the_lowest_log_loss_within_one_standard_error():
    # logreg is top; svm is within one standard error (0.02 / sqrt(4) = 0.01) and has the lower log-loss;
    # mlp has the lowest log-loss of all but is 2 standard errors behind.
    heads = [
        _head("logreg", 0.95, 0.02, 0.20, folds=4),
        _head("svm", 0.945, 0.01, 0.15, folds=4),
        _head("mlp", 0.93, 0.01, 0.05, folds=4),
    ]
    best, why = choose_best(heads)
    assert best.name == "svm"
    assert "logreg has the highest mean CV accuracy (0.9500, standard error 0.0100)" in why
    assert "svm has the lowest log-loss (0.1500" in why and "mlp" not in why
    # log-loss ties: the faster predictor wins
    best, why = choose_best([_head("logreg", 0.95, 0.02, 0.1, 0.5), _head("svm", 0.95, 0.02, 0.1, 0.01)])
    assert best.name == "svm" and "predicts fastest" in why
    # nobody close: the top accuracy wins outright
    best, why = choose_best([_head("logreg", 0.99, 0.0, 0.3), _head("svm", 0.90, 0.01, 0.01)])
    assert best.name == "logreg" and "no other head is within one standard error" in why


def test_holdout_refit_learning_curve_and_save_best(synthetic_cache, tmp_path):
    from PIL import Image

    from tlpipe.pipeline.heads.evaluate import evaluate_head
    from tlpipe.pipeline.heads.persistence import load_head

    fs = synthetic_cache(
        n_per_class=(40, 40, 40), splits=lambda y: np.where(np.arange(len(y)) % 3 == 0, "test", "train")
    )
    result = compare_heads(fs, ("logreg", "rbf-svm"), cv=3, n_jobs=2)
    train, test = np.flatnonzero(fs.split == "train"), np.flatnonzero(fs.split == "test")
    # CV on the training rows only; the winner refitted on all of them and scored once on the test rows
    assert result.rows == len(train) and result.holdout["rows"] == len(test) and result.holdout["head"] == result.best
    # the refitted head knows its classes by name (as fit-head's do): predict returns names
    names = np.asarray(fs.class_names)[fs.y[test]]
    assert set(result.estimator.classes_) == set(fs.class_names)
    assert result.holdout["accuracy"] == pytest.approx(np.mean(result.estimator.predict(fs.X[test]) == names))
    np.testing.assert_array_equal(result.train_rows, train)
    best = result.head(result.best)
    clf = result.estimator[-1]
    if result.best == "logreg":
        # the head CV fitted on every training row to choose C is the refit: the very head fit-head builds
        from tlpipe.pipeline.heads.estimators import LogisticRegressionCVHead, fit_head

        assert isinstance(clf, LogisticRegressionCVHead) and float(np.ravel(clf.C_)[0]) == best.params["C"]
        built, _ = fit_head(fs.X[train], np.asarray(fs.class_names)[fs.y[train]], "logreg")
        np.testing.assert_array_equal(built[-1].coef_, clf.coef_)
    else:
        estimator_params = clf.get_params()
        assert all(estimator_params["estimator__" + k] == v for k, v in best.params.items())
    # the learning curve ends at every training row with the hold-out accuracy itself
    curve = result.learning_curve
    assert [p["rows"] for p in curve] == sorted(p["rows"] for p in curve) and curve[-1]["rows"] == len(train)
    assert curve[-1]["accuracy"] == result.holdout["accuracy"] and len(curve) == 3
    # the mistakes come from the hold-out; thumbnails read from the image paths when they exist
    wrong = np.flatnonzero(result.estimator.predict(fs.X[test]) != names)
    assert len(result.misclassified) == len(wrong) and "held-out rows" in result.misclassified_source
    root = tmp_path / "images"
    for item in result.misclassified:  # as if the cache's source were `root`: its files, their bytes
        (root / item["path"]).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 48), (200, 30, 30)).save(root / item["path"], format="JPEG")
        item["source"], item["sha256"] = str(root), hashlib.sha256((root / item["path"]).read_bytes()).hexdigest()
    paths = write_report(result, tmp_path / "report")
    report = paths["report.md"].read_text()
    assert "learning_curve.png" in paths and "Held-out score of the best head" in report
    assert f"accuracy {result.holdout['accuracy']:.4f}" in report
    if len(wrong):
        assert "read from the image paths" in report and "could not be read" not in report
    # --save-best keeps exactly that head; its sidecar records the hold-out, evaluate scores the same rows
    metadata = save_best(result, fs, tmp_path / "best.joblib")
    assert metadata["head"]["params"]["trained_by"] == "compare --save-best"
    assert metadata["head"]["params"]["params"] == best.params and metadata["head"]["name"] == result.best
    assert metadata["evaluation"]["sha256"] == sorted(fs.sha256[test].tolist())
    assert metadata["training"]["sha256"] == sorted(fs.sha256[train].tolist())
    loaded, meta = load_head(tmp_path / "best.joblib")
    assert meta["labels"] == list(loaded.classes_) and meta["head"]["predicts"] == "class names"
    assert meta["classes"] == [fs.class_names.index(c) for c in loaded.classes_]
    assert evaluate_head(loaded, meta, fs, split=None).accuracy == result.holdout["accuracy"]
    with pytest.raises(ValueError, match="no held-out rows"):
        save_best(compare_heads(fs, ("logreg",), cv=3, n_jobs=1, holdout=False), fs, tmp_path / "x.joblib")


def test_umap_map_when_asked_for_and_umap_learn_is_installed(synthetic, compared, tmp_path):
    pytest.importorskip("umap", reason="umap-learn is the optional extra tlpipe[umap]")
    import subprocess
    import sys

    from tlpipe.pipeline.heads.selection import _embedding_map

    X, y = synthetic((40, 40, 40), dim=16, seed=1, spread=6.0)
    maps = _embedding_map(
        X, seed=0, methods=("pca", "umap")
    )  # compare_heads computes PCA, and UMAP when asked (umap=True); the report only draws them
    assert set(maps) == {"pca", "umap"} and maps["umap"].shape == (120, 2)
    fs = compared[0]
    with_umap = compare_heads(fs, ("logreg",), cv=3, seed=0, n_jobs=1, holdout=False, umap=True)
    assert set(with_umap.embedding_map["points"]) == {"pca", "umap"}
    paths = write_report(with_umap, tmp_path / "report", umap=True)
    assert "embedding_map_umap.png" in {p.name for p in paths.values()}
    with pytest.raises(InputError, match="no UMAP map"):  # rendering never computes it
        write_report(compared[1], tmp_path / "report2", umap=True)
    # umap-learn's import of its TensorFlow-based ParametricUMAP is skipped (seconds, unused)
    code = (
        "import sys; from tlpipe.pipeline.heads.selection import _import_umap; _import_umap(); "
        "print('tensorflow' in sys.modules, 'umap' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == [
        "False",
        "True",
    ]
    # UMAP keeps well separated classes apart: each point's nearest neighbour in the map is of its class
    d = ((maps["umap"][:, None] - maps["umap"][None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert np.mean(y[d.argmin(axis=1)] == y) > 0.9


def test_the_sweep_picks_the_cheapest_pair_within_one_standard_error():
    """A CV tie between an expensive and a cheap feature set goes to the cheap one; a clear winner stays."""
    from tlpipe.pipeline.heads.selection import SweepRow, choose_pair

    def row(key, accuracy, ms, std=0.02):
        return SweepRow(
            feature_key=key,
            head="logreg",
            params={},
            accuracy=accuracy,
            accuracy_std=std,
            macro_f1=accuracy,
            fit_s=0.1,
            predict_s=0.01,
            extraction_ms=ms,
            feature_sets_in_pass=1,
            input_size=224,
            tta="none",
            layer=None,
        )

    tied = [
        row("288-flip", 0.9933, 12.0),
        row("224", 0.9930, 4.5),
        row("224-crops", 0.9920, 40.0),
        row("160", 0.95, 2.0),
    ]
    pick, why = choose_pair(tied, cv=5)  # se = 0.02 / sqrt(5) = 0.0089: the first three tie, 160 px does not
    assert tied[pick].feature_key == "224" and "cheapest extraction" in why and "3 pairs" in why
    clear = [row("concat", 0.75, 5.0, std=0.005), row("224", 0.72, 4.5, std=0.005)]
    pick, why = choose_pair(clear, cv=5)
    assert pick == 0 and "no other pair" in why
    unknown = [row("a", 0.99, None), row("b", 0.989, None)]  # costs not recorded: the top pair
    assert choose_pair(unknown, cv=5)[0] == 0


def test_a_logreg_winner_reused_from_cv_keeps_the_pca_cv_measured(synthetic_cache):
    # the head CV fits on all training rows to choose logreg's C is the refit: with --pca it must carry that PCA,
    # as the folds it was scored with did
    from tlpipe.pipeline.heads.estimators import LogisticRegressionCVHead

    split = lambda y: np.where(np.arange(len(y)) % 3 == 0, "test", "train")  # noqa: E731
    fs = synthetic_cache(n_per_class=(40, 40, 40), splits=split)
    result = compare_heads(fs, ("logreg",), cv=3, n_jobs=1, pca=4, learning_curve=False)
    assert result.best == "logreg" and result.head("logreg").pca == 4 and result.holdout["pca"] == 4
    assert result.estimator.named_steps["pca"].n_components_ == 4
    assert isinstance(result.estimator[-1], LogisticRegressionCVHead)
    assert float(np.ravel(result.estimator[-1].C_)[0]) == result.head("logreg").params["C"]
