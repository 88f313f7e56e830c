"""Portable single-writer locks (issue 16, item 5): no fcntl at import time, lock files removed after use,
one refusal message naming the holder's pid."""

import os
import subprocess
import sys

from tests.conftest import ROOT
from tlpipe.features.cache import CacheWriter


def test_importable_without_fcntl():
    """As on Windows: the cache, scoring and the CLI import with no fcntl module at all."""
    code = (
        "import sys\nsys.modules['fcntl'] = None  # any 'import fcntl' now fails\n"
        "import tlpipe.features.cache, tlpipe.pipeline.scoring.score, tlpipe.pipeline.cli\nprint('ok')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout.strip() == "ok", proc.stderr


def test_second_process_is_refused_with_the_holders_pid_and_the_lock_file_goes(tmp_path):
    cache = tmp_path / "c.h5"
    code = (
        "import sys\nfrom tlpipe.features.cache import CacheWriter, CacheLockedError\n"
        "try:\n    CacheWriter(sys.argv[1])\nexcept CacheLockedError as e:\n    print(e)\n"
    )
    with CacheWriter(cache):
        assert (tmp_path / "c.h5.lock").read_text() == f"pid {os.getpid()}"
        proc = subprocess.run(
            [sys.executable, "-c", code, str(cache)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert proc.stdout.strip() == f"{cache} is being written by pid {os.getpid()}; wait for it to finish"
    assert not (tmp_path / "c.h5.lock").exists()
    CacheWriter(cache).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5"]
