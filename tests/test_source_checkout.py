"""tlpipe runs from a source checkout that was never installed (a lent GPU machine has no network to install
it): with the checkout on PYTHONPATH, `tlpipe.backbones` & co. are the checkout's top-level folders."""

import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_checkout_imports_without_installation(tmp_path):
    # -S: no site processing, so the editable install's import finder (a .pth hook) is not there; the
    # dependencies' folder and the checkout are put on sys.path by hand, as PYTHONPATH would.
    code = (
        f"import sys; sys.path[:0] = [{str(ROOT)!r}, {sysconfig.get_paths()['purelib']!r}]\n"
        "import tlpipe.backbones, tlpipe.features.cache, tlpipe.pipeline.cli\n"
        "print(tlpipe.backbones.__file__)\n"
        "assert not any(type(f).__name__.startswith('_Editable') for f in sys.meta_path), sys.meta_path\n"
    )
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == ROOT / "backbones" / "__init__.py"
