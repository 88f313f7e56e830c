"""The command line as a user meets it: fast --help, heads without TF/ORT, one-line errors, exit codes."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT
from tlpipe.features.extract import extract

HEAVY = ("tensorflow", "keras", "onnxruntime", "sklearn", "h5py", "tf2onnx", "matplotlib")


def tlpipe(*args, env=None, check=False):
    proc = subprocess.run(
        [sys.executable, "-m", "tlpipe.pipeline.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **(env or {})},
        cwd=ROOT,
    )
    if check and proc.returncode:
        raise AssertionError(proc.stdout + proc.stderr)
    return proc


def test_help_imports_nothing_heavy():
    code = textwrap.dedent(
        """
        import sys
        from tlpipe.pipeline.cli import app
        try:
            app(["fit-head", "--help"])
        except SystemExit:
            pass
        print(sorted(m for m in sys.modules if m.split(".")[0] in %r))
    """
        % (HEAVY,)
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert "--model" in proc.stdout and proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


@pytest.fixture
def cache(tmp_path, tiny_entry, photo_folder):
    from tests.conftest import write_photo_folder

    write_photo_folder(photo_folder, per_class=10, seed=2)
    path = tmp_path / "cache.h5"
    extract(photo_folder, path, model=str(tiny_entry.directory))
    return path


def test_heads_commands_run_without_tensorflow_or_onnxruntime(tmp_path, cache):
    blocked = tmp_path / "blocked"
    for name in ("tensorflow", "onnxruntime", "keras", "tf2onnx"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text("raise ImportError('blocked for this test')\n")
    env = {"PYTHONPATH": f"{blocked}{os.pathsep}{ROOT}"}
    head = tmp_path / "svm.joblib"
    fitted = tlpipe("fit-head", cache, "--model", "svm", "--out", head, env=env, check=True)
    assert "held-out: accuracy" in fitted.stdout and head.exists() and (tmp_path / "svm.joblib.json").exists()
    best = tmp_path / "best.joblib"
    compared = tlpipe(
        "compare",
        cache,
        "--models",
        "logreg,svm",
        "--cv",
        "3",
        "--report",
        tmp_path / "report",
        "--save-best",
        best,
        env=env,
        check=True,
    )
    assert "best:" in compared.stdout and "why:" in compared.stdout and (tmp_path / "report" / "report.md").exists()
    assert "held-out:" in compared.stdout and (tmp_path / "report" / "misclassified.png").exists()
    sidecar = json.loads((tmp_path / "best.joblib.json").read_text())
    assert sidecar["head"]["params"]["trained_by"] == "compare --save-best"
    # no test split in this cache: evaluate scores the head's recorded hold-out by default
    evaluated = tlpipe("evaluate", head, cache, env=env, check=True)
    rows = json.loads((tmp_path / "svm.joblib.json").read_text())["evaluation"]["rows"]
    assert f"the head's recorded hold-out: {rows} rows" in evaluated.stdout and "china" in evaluated.stdout
    assert "recorded hold-out" in tlpipe("evaluate", best, cache, env=env, check=True).stdout
    # rows the head was trained on: refused in one line, unless asked for
    leaked = tlpipe("evaluate", head, cache, "--split", "all", env=env)
    assert (
        leaked.returncode == 2
        and leaked.stderr.startswith("error:")
        and "were used to train this head" in leaked.stderr
    )
    allowed = tlpipe("evaluate", head, cache, "--split", "all", "--allow-train-rows", env=env, check=True)
    trained = json.loads((tmp_path / "svm.joblib.json").read_text())["training"]["rows"]
    assert f"{trained} of which the head was trained on" in allowed.stdout
    # and extract, which needs ONNX Runtime, says which extra to install
    failed = tlpipe("extract", cache.parent, "--out", tmp_path / "x.h5", "--model", "whatever", env=env)
    assert failed.returncode == 2


def test_info_json(cache):
    info = json.loads(tlpipe("info", cache, "--json", check=True).stdout)
    assert info["images"] == 32 and info["class_names"] == ["china", "flower"]


def test_errors_are_one_line(tmp_path, cache, tiny_entry):
    for args, expected in [
        (("extract", tmp_path / "missing", "--out", tmp_path / "c.h5"), "image source not found"),
        (("export", "--backbone", "alexnet"), "unknown backbone"),
        (("export", "--backbone", "vgg16", "--layer", "block9_pool", "--weights", "none"), "no cut point"),
        (("fit-head", tmp_path / "nope.h5"), "does not exist"),
        (("fit-head", cache, "--model", "forest"), "unknown head"),
        (("evaluate", tmp_path / "none.joblib", cache), "No such file"),
    ]:
        proc = tlpipe(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], (args, proc.stderr)


def test_strict_exit_code(tmp_path, tiny_entry, photo_folder):
    (photo_folder / "china" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    proc = tlpipe(
        "extract", photo_folder, "--out", tmp_path / "c.h5", "--model", tiny_entry.directory, "--strict", "--quiet"
    )
    assert proc.returncode == 3
    ok = tlpipe("extract", photo_folder, "--out", tmp_path / "c.h5", "--backbone", tiny_entry.directory)
    assert ok.returncode == 0 and "1 failed" in ok.stdout and "broken.jpg" in ok.stderr


def test_export_precision_variants(tmp_path, tiny_entry):
    import shutil

    from tests.conftest import write_photo_folder

    store = tmp_path / "store"  # the fp32 export only: no int8 variant made by other tests
    shutil.copytree(tiny_entry.directory, store / tiny_entry.key)
    base = ("export", "--backbone", "mobilenet_v2_0.35", "--weights", "none", "--size", "64", "--store", store)
    missing = tlpipe(*base, "--precision", "int8")
    assert missing.returncode == 2 and "--images" in missing.stderr
    photos = write_photo_folder(tmp_path / "photos", per_class=12, seed=7)
    done = tlpipe(*base, "--precision", "int8", "--images", photos, check=True)
    assert "int8 of " + tiny_entry.key in done.stdout and "mean cosine" in done.stdout
    fp16 = tlpipe(*base, "--precision", "fp16", check=True)
    assert "fp16 of " + tiny_entry.key in fp16.stdout
