"""The public API as users call it (issue 26): every name of ``tlpipe.__all__`` resolves and works on a real
small cache (real photos, a real ONNX backbone, real HDF5, real heads); every public module declares
``__all__``; reports find their images by themselves; the key ``tlpipe info`` prints is a backbone; the CLI
tells bad input from bugs."""

from __future__ import annotations

import importlib
import json
import pickle
import pkgutil
import sys

import numpy as np
import pytest

import tlpipe
from tests.conftest import write_photo_folder
from tests.pipeline.cli.test_commands import tlpipe as run_cli


def test_every_public_name_resolves():
    for name in tlpipe.__all__:
        assert getattr(tlpipe, name) is not None, name
    assert sorted(dir(tlpipe)) == sorted(tlpipe.__all__)
    with pytest.raises(AttributeError):
        tlpipe.no_such_name  # noqa: B018


def test_every_package_module_declares_all():
    missing = []
    for package in ("tlpipe.backbones", "tlpipe.features", "tlpipe.pipeline"):
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
            if info.name.rsplit(".", 1)[-1].startswith("_") or info.name.endswith("__main__"):
                continue
            try:
                module = importlib.import_module(info.name)
            except ImportError as exc:  # an optional extra (Ray, TensorFlow) this environment lacks
                pytest.skip(f"{info.name} needs an optional extra: {exc}")
            if not hasattr(module, "__all__"):
                missing.append(info.name)
    assert not missing, f"public modules without __all__: {missing}"


@pytest.fixture(scope="module")
def small(tmp_path_factory, tiny_entry):
    root = tmp_path_factory.mktemp("api")
    photos = root / "photos"
    write_photo_folder(photos / "train", per_class=10, seed=1)
    write_photo_folder(photos / "test", per_class=4, seed=2)
    return root, photos, tiny_entry


def test_every_public_name_works_on_a_real_cache(small):
    root, photos, entry = small
    store = entry.directory.parent
    used = set()

    def use(name):
        used.add(name)
        return getattr(tlpipe, name)

    feature = use("FeatureSpec")(backbone=None, model=str(entry.directory))
    assert isinstance(feature, use("ModelChoice"))  # a feature spec names its model wherever a model is named
    summary = use("extract")(photos, root / "cache.h5", choice=feature)
    assert summary.key == feature.key
    assert isinstance(summary, use("ExtractSummary")) and summary.embedded == 28 and summary.failed == 0
    fs = use("read_feature_set")(root / "cache.h5")
    assert isinstance(fs, use("FeatureSet")) and fs.X.shape == (28, entry.embedding_dim) and fs.X.dtype == np.float32
    assert fs.sources == [str(photos.resolve())]

    trained = use("fit_head")(root / "cache.h5", "logreg", root / "head.joblib")
    assert isinstance(trained, use("TrainResult")) and trained.path.is_file()

    spec, run = use("HeadSpec")(seed=1), use("RunOptions")(n_jobs=1)
    compared = use("compare")(root / "cache.h5", ("logreg", "svm"), cv=3, head=spec, run=run, report=root / "report")
    assert isinstance(compared, use("CompareResult")) and compared.best in ("logreg", "svm")
    assert compared.seed == 1 and (root / "report" / "report.md").is_file()

    evaluated = use("evaluate")(root / "head.joblib", root / "cache.h5", report=root / "eval")
    assert isinstance(evaluated, use("EvalResult")) and evaluated.split == "test" and evaluated.n == 8
    assert json.loads((root / "eval" / "evaluation.json").read_text())["accuracy"] == evaluated.accuracy

    scored = use("score")(photos / "test", root / "preds.csv", head=root / "head.joblib", store=store)
    assert scored.scored == 8 and len((root / "preds.csv").read_text().splitlines()) == 9
    predicted = use("predict")(sorted((photos / "test").rglob("*.jpg"))[:3], head=root / "head.joblib", store=store)
    assert predicted.probabilities.shape == (3, 2) and predicted.labels == ["china", "flower"]

    record = use("export_model")(root / "head.joblib", root / "classifier.onnx", store=store)
    assert (root / "classifier.onnx").is_file() and record["verification"]["max_abs_diff"] < 1e-4

    unlabelled = root / "unsorted"  # a flat folder: its photos have no label, the ones suggest ranks
    unlabelled.mkdir()
    write_photo_folder(root / "more", per_class=2, seed=9)
    for i, photo in enumerate(sorted((root / "more").rglob("*.jpg"))):
        photo.rename(unlabelled / f"u{i}.jpg")
    tlpipe.extract(unlabelled, root / "cache.h5", choice=feature)
    picks = use("suggest")(root / "cache.h5", root / "head.joblib", 2, threshold=0.9999, out=root / "picks.csv")
    assert len(picks.picks) == 2 and (root / "picks.csv").is_file()

    pytest.importorskip("cleanlab", reason="tlpipe.audit needs the audit extra (cleanlab)")
    audited = use("audit")(root / "cache.h5", cv=3)
    assert isinstance(audited, use("AuditResult")) and audited.rows == 28 + 4  # the unlabelled photos too

    with pytest.raises(use("TlpipeError")):
        tlpipe.compare(root / "cache.h5", ("no-such-head",))
    assert used == set(tlpipe.__all__) - {"__version__"}, "a public name is not exercised here"


def test_compare_report_finds_the_images_from_the_cache_sources(small):
    """The report's gallery shows the photos whoever calls the library (make demo's report showed every tile
    as 'image not readable': only the CLI handed the report its source folders)."""
    from tlpipe.pipeline.reports.images import resolve_image

    root, photos, entry = small
    cache = root / "gallery.h5"
    tlpipe.extract(photos / "train", cache, model=str(entry.directory))
    result = tlpipe.compare(cache, ("logreg",), cv=3, holdout=False, report=root / "gallery-report")
    assert result.misclassified, "a random-init backbone on these crops misclassifies some: the gallery has tiles"
    for item in result.misclassified:
        found, reason = resolve_image(item["path"], item["source"], item["sha256"])
        assert found is not None and found.is_file(), reason
    report = (root / "gallery-report" / "report.md").read_text()
    assert "read from the image paths" in report and "could not be read" not in report


def test_the_key_info_prints_is_a_backbone(small, tmp_path):
    root, photos, entry = small
    store = entry.directory.parent
    cache = tmp_path / "cache.h5"
    first = tlpipe.extract(photos / "train", cache, model=str(entry.directory))
    info = json.loads(run_cli("info", cache, "--json", check=True).stdout)
    key = info["feature_sets"][0]["key"] if isinstance(info["feature_sets"], list) else next(iter(info["feature_sets"]))
    assert key == first.key and key.endswith("-filter-bilinear")
    more = write_photo_folder(tmp_path / "more", per_class=2, seed=7)
    proc = run_cli("extract", more, "--backbone", key, "--store", store, "--out", cache, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["key"] == key  # the same feature set, appended to
    refused = run_cli(
        "extract", more, "--backbone", key, "--store", store, "--out", cache, "--resize-filter", "antialias"
    )
    assert refused.returncode == 2 and "disagrees with the feature-set key" in refused.stderr


def test_the_cli_tells_bad_input_from_bugs():
    from tlpipe.errors import InputError, TlpipeError
    from tlpipe.pipeline.cli import user_message

    assert user_message(InputError("bad value")) == "bad value"
    assert user_message(FileNotFoundError(2, "No such file or directory", "a.h5")) is not None
    assert user_message(ValueError("a bug")) is None and user_message(KeyError("a bug")) is None
    from tlpipe.backbones.deps import MissingExtra
    from tlpipe.features.cache import CacheError
    from tlpipe.pipeline.heads.persistence import HeadError

    for cls in (MissingExtra, CacheError, HeadError, InputError):
        assert issubclass(cls, TlpipeError)
    proc = run_cli("backbones", "--json")  # a command that works exits 0
    assert proc.returncode == 0
    proc = run_cli("extract", "/nonexistent-folder", "--out", "/tmp/x.h5")  # the user's mistake: one line, exit 2
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr


def test_heads_pickled_before_the_heads_package_still_load():
    # protocol 0 GLOBAL opcode: the class as older tlpipe versions pickled it
    cls = pickle.loads(b"ctlpipe.pipeline.heads\nSVCHead\n.")
    from tlpipe.pipeline.heads.estimators import SVCHead

    assert cls is SVCHead
    assert "tlpipe.pipeline.heads.estimators" in sys.modules


def test_the_library_raises_tlpipe_errors_for_bad_input():
    """A plain ValueError/KeyError raised by tlpipe's own code would be taken for a bug by the CLI (exit 1 with a
    traceback): the library raises the TlpipeError subclasses that keep those bases (InputError, UnknownNameError)."""
    import ast
    from pathlib import Path

    root = Path(tlpipe.__file__).resolve().parent.parent
    offenders = []
    for folder in ("backbones", "features", "pipeline"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.Raise, ast.Return)) and isinstance(
                    node.value if isinstance(node, ast.Return) else node.exc, ast.Call
                ):
                    call = node.value if isinstance(node, ast.Return) else node.exc
                    if isinstance(call.func, ast.Name) and call.func.id in ("ValueError", "KeyError"):
                        offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not offenders, offenders
