"""CLI of the feature levers: export/extract with --tta and lists of --size/--layer, compare --features all."""

import pytest

from tests.pipeline.cli.test_commands import tlpipe

pytestmark = pytest.mark.slow


def test_export_extract_and_sweep_from_the_command_line(tmp_path, photo_folder):
    store = tmp_path / "store"
    common = ["--backbone", "mobilenet_v2_0.35", "--weights", "none", "--store", store]
    done = tlpipe("export", *common, "--size", "64", "--layer", "block_12_add,out_relu", "--tta", "flip", check=True)
    assert (
        "output embeddings/block_12_add (N, 32)" in done.stdout
        and "output embeddings/out_relu (N, 1280)" in done.stdout
    )
    cache = tmp_path / "cache.h5"
    done = tlpipe(
        "extract",
        photo_folder,
        "--out",
        cache,
        *common,
        "--size",
        "64",
        "--layer",
        "block_12_add,out_relu",
        "--tta",
        "flip",
        check=True,
    )
    assert "feature sets" in done.stdout and "12 embedded" in done.stdout
    done = tlpipe(
        "compare",
        cache,
        "--features",
        "all",
        "--models",
        "logreg,svm",
        "--cv",
        "3",
        "--all-rows",
        "--n-jobs",
        "1",
        "--report",
        tmp_path / "sweep",
        check=True,
    )
    assert "best pair:" in done.stdout and "fit it: tlpipe fit-head" in done.stdout
    assert (tmp_path / "sweep" / "sweep.md").is_file()
    bad = tlpipe("extract", photo_folder, "--out", cache, *common, "--size", "64,x")
    assert bad.returncode == 2 and "--size takes whole numbers" in bad.stderr
    bad = tlpipe("extract", photo_folder, "--out", cache, *common, "--tta", "mirror")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: unknown TTA mode 'mirror'")
