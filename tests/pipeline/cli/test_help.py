"""The command line's conventions and its output for people and programs (issue 16, items 2 and 3):
--version, -h, help for every option that is never cut at 80 columns, plain lines when piped, --json on
every command that summarises a run, and the documented exit codes."""

import json
import os
import re
import subprocess
import sys

import pytest
import typer.main

from tests.conftest import ROOT, write_photo_folder
from tlpipe.features.extract import extract
from tlpipe.pipeline.cli import app

BOX = re.compile("[\u2500-\u257f]")  # box drawing characters


def tlpipe(*args, columns=80, check=False):
    """Run the CLI in a real process with stdout a pipe (not a terminal)."""
    proc = subprocess.run(
        [sys.executable, "-m", "tlpipe.pipeline.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": str(columns)},
    )
    if check and proc.returncode:
        raise AssertionError(proc.stdout + proc.stderr)
    return proc


def commands() -> dict:
    """The commands in the order ``tlpipe --help`` lists them."""
    group = typer.main.get_command(app)
    ctx = typer.Context(group)
    return {name: group.commands[name] for name in group.list_commands(ctx)}


def options(cmd) -> list:
    """The visible options of a command (typer's own click classes: compare by kind, not by class)."""
    return [p for p in cmd.params if p.param_type_name == "option" and not p.hidden]


def test_every_option_has_help():
    seen = [p for cmd in commands().values() for p in options(cmd)]
    assert len(seen) > 100  # the introspection sees the options
    missing = [p.opts[0] for p in seen if not (p.help or "").strip()]
    assert not missing, missing


def test_one_meaning_per_option():
    """--model is a head type only; a trained head is --head; a fused classifier --classifier; the shared
    options have one spelling and one default wherever they appear."""
    for name, cmd in commands().items():
        by_name = {o: p for p in options(cmd) for o in p.opts}
        if "--model" in by_name:
            assert name == "fit-head" and "logreg" in by_name["--model"].help
        if "--head" in by_name:
            assert "fit-head" in by_name["--head"].help or "Warm-start" in by_name["--head"].help
        for opt, short, default in (
            ("--out", "-o", None),
            ("--quiet", "-q", False),
            ("--n-jobs", "-j", None),
            ("--device", None, "auto"),
            ("--batch-size", None, None),
            ("--json", None, False),
        ):
            if opt in by_name:
                p = by_name[opt]
                assert short is None or short in p.opts, (name, opt)
                assert default is None or p.default == default, (name, opt, p.default)
    assert "--classifier" in [o for p in options(commands()["score"]) for o in p.opts]


def test_old_spellings_work_with_one_deprecation_line(tmp_path, cache, tiny_entry):
    old = tlpipe("extract", cache.parent / "photos", "--out", tmp_path / "o.h5", "--model", tiny_entry.directory, "-q")
    assert old.returncode == 0 and (tmp_path / "o.h5").exists()
    warnings = [line for line in old.stderr.splitlines() if "deprecated" in line]
    assert warnings == [
        "warning: extract --model is deprecated and will be removed in the next release; use "
        "--backbone (a registry name, store key or folder)"
    ]
    head = tmp_path / "h.joblib"
    tlpipe("fit-head", cache, "--out", head, check=True)
    by_option = tlpipe("evaluate", cache, "--head", head, "--split", "all", "--allow-train-rows", "--json", check=True)
    by_position = tlpipe("evaluate", head, cache, "--split", "all", "--allow-train-rows", "--json", check=True)
    assert json.loads(by_option.stdout)["accuracy"] == json.loads(by_position.stdout)["accuracy"]
    both = tlpipe("evaluate", head, cache, "--head", head)
    assert both.returncode == 2 and "give the head once" in both.stderr
    classifier = tlpipe(
        "score", cache.parent / "photos", "--model", tmp_path / "missing.onnx", "--out", tmp_path / "s.csv"
    )
    assert classifier.returncode == 2 and "score --model is deprecated" in classifier.stderr
    assert "missing.onnx does not exist" in classifier.stderr


def test_help_at_80_columns_is_never_cut():
    """Every command's --help (and -h) at COLUMNS=80: no line over 80, no ellipsis, and markup-like text kept."""
    names = list(commands())
    assert {"extract", "score", "bench"} <= set(names)
    code = (
        "import sys\nfrom tlpipe.pipeline.cli import app\nfor args in %r:\n    print('=== ' + ' '.join(args))\n"
        "    try:\n        app(args, prog_name='tlpipe')\n    except SystemExit:\n        pass\n"
        % ([["-h"]] + [[name, "--help"] for name in names] + [[names[0], "-h"]],)
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"},
    )
    text = proc.stdout
    assert text.count("=== ") == len(names) + 2 and text.count("Usage: tlpipe") == len(names) + 2, text[-2000:]
    long = [line for line in text.splitlines() if len(line) > 80]
    cut = [line for line in text.splitlines() if "…" in line or re.search(r"\w\.\.\.\s*$", line)]
    assert not long and not cut, (long, cut)
    assert "needs tlpipe[tf]" in re.sub(r"\s+", " ", text)  # not eaten as markup
    assert "\\[" not in text  # help is plain text: brackets need no rich escapes
    assert "image_dataset_from_directory" in text  # a long word, whole
    assert "--install-completion" in text  # typer's shell completion


def test_version_and_short_help():
    from tlpipe import __version__

    assert tlpipe("--version", check=True).stdout.strip() == f"tlpipe {__version__}"
    assert re.match(r"Usage: .* info \[OPTIONS\]", tlpipe("info", "-h", check=True).stdout)


def test_backbones_piped_is_plain_lines():
    lines = tlpipe("backbones", check=True).stdout.splitlines()
    assert lines[0].split("\t")[:4] == ["name", "size", "prep", "dim"]
    assert not any(BOX.search(line) for line in lines)
    mobilenet = next(line.split("\t") for line in lines if line.startswith("mobilenet_v2_1.0"))
    assert mobilenet[4] == "62,720" and mobilenet[3] == "1280"  # not split over two lines
    cuts = tlpipe("backbones", "--cuts", check=True).stdout.splitlines()
    assert max(map(len, cuts)) <= 80
    at = cuts.index(next(line for line in cuts if line.startswith("vgg16:")))
    assert cuts[at + 1].split() == ["block1_pool", "64", "112x112"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_entry):
    root = tmp_path_factory.mktemp("cli-output")
    photos = write_photo_folder(root / "photos", per_class=8, seed=3)
    (photos / "china" / "broken.jpg").write_bytes(b"not an image")
    path = root / "cache.h5"
    extract(photos, path, model=str(tiny_entry.directory))
    return path


def test_json_on_every_summarising_command(tmp_path, cache, tiny_entry):
    store, photos = tiny_entry.directory.parent, cache.parent / "photos"
    info = json.loads(tlpipe("info", cache, "--json", check=True).stdout)
    assert info["images"] == 16 and len(info["failures"]) == 1
    ran = json.loads(
        tlpipe(
            "extract",
            photos,
            "--out",
            tmp_path / "c.h5",
            "--backbone",
            tiny_entry.directory,
            "--json",
            "-q",
            check=True,
        ).stdout
    )
    assert (
        ran["total"] == 17
        and ran["embedded"] == 16
        and ran["failed"] == 1
        and ran["key"] == tiny_entry.key + "-filter-bilinear"
    )
    head = tmp_path / "h.joblib"
    fitted = json.loads(tlpipe("fit-head", cache, "--model", "logreg", "--out", head, "--json", check=True).stdout)
    assert fitted["path"] == str(head) and 0 <= fitted["evaluation"]["accuracy"] <= 1
    compared = json.loads(tlpipe("compare", cache, "--models", "logreg,svm", "--cv", "2", "--json", check=True).stdout)
    assert {h["name"] for h in compared["heads"]} == {"logreg", "svm"} and compared["best"] in ("logreg", "svm")
    evaluated = json.loads(
        tlpipe("evaluate", head, cache, "--split", "all", "--allow-train-rows", "--json", check=True).stdout
    )
    assert evaluated["n"] == 16 and evaluated["labels"] == ["china", "flower"]
    scored = json.loads(
        tlpipe(
            "score", photos, "--head", head, "--out", tmp_path / "p.csv", "--store", store, "--json", "-q", check=True
        ).stdout
    )
    assert scored["total"] == 17 and scored["written"] == 17 and scored["failed"] == 1
    bench = json.loads(
        tlpipe(
            "bench",
            "--backbone",
            tiny_entry.directory,
            "--no-keras",
            "--batch-size",
            "1",
            "--threads",
            "1",
            "--seconds",
            "0",
            "--json",
            check=True,
        ).stdout
    )
    assert bench["timings"] and all(t["images_per_s"] > 0 for t in bench["timings"])


def test_compare_and_evaluate_piped_are_tab_separated(tmp_path, cache):
    compared = tlpipe("compare", cache, "--models", "logreg,svm", "--cv", "2", "--search", check=True).stdout
    assert not BOX.search(compared)
    header, *rows = [line for line in compared.splitlines() if "\t" in line]
    assert header.split("\t")[0] == "head" and len(rows) == 2
    assert all(len(r.split("\t")) == len(header.split("\t")) for r in rows)
    head = tmp_path / "h.joblib"
    assert tlpipe("fit-head", cache, "--out", head, "-q", check=True).stdout == "" and head.exists()  # --quiet
    evaluated = tlpipe("evaluate", head, cache, "--split", "all", "--allow-train-rows", check=True).stdout
    assert "class\tprecision\trecall\tf1\tsupport" in evaluated and not BOX.search(evaluated)


def test_exit_codes(tmp_path, cache, tiny_entry):
    """0 ok, 2 usage or bad input (one line), 3 --strict with failed images; as docs/cli.md's table says."""
    assert tlpipe("info", cache).returncode == 0
    usage = tlpipe("info", cache, "--no-such-option")
    assert usage.returncode == 2 and "No such option" in usage.stderr
    bad = tlpipe("info", tmp_path / "missing.h5")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1
    strict = tlpipe(
        "extract",
        cache.parent / "photos",
        "--out",
        tmp_path / "s.h5",
        "--backbone",
        tiny_entry.directory,
        "--strict",
        "-q",
    )
    assert strict.returncode == 3, strict.stderr
    if hasattr(os, "mkfifo"):  # interrupted while it waits on a manifest nobody writes: 130
        import signal
        import time

        os.mkfifo(tmp_path / "pipe.csv")
        waiting = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tlpipe.pipeline.cli",
                "extract",
                str(tmp_path / "pipe.csv"),
                "--out",
                str(tmp_path / "p.h5"),
                "-q",
            ],
            cwd=ROOT,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        time.sleep(3)
        assert waiting.poll() is None
        waiting.send_signal(signal.SIGINT)
        assert waiting.wait(timeout=60) == 130
    reference = (ROOT / "docs" / "cli.md").read_text()
    for code in ("| 0 |", "| 1 |", "| 2 |", "| 3 |", "| 130 |"):
        assert code in reference
