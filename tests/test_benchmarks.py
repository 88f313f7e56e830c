"""The benchmarks are not run by CI (they take minutes on real photos), so at least every tlpipe name they
import, at any depth inside their functions, must exist: a renamed function would otherwise only show when
someone next measures."""

import ast
import importlib
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_every_tlpipe_name_a_benchmark_imports_exists(script):
    missing = []
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tlpipe"):
            module = importlib.import_module(node.module)
            missing += [
                f"{node.module}.{a.name} (line {node.lineno})" for a in node.names if not hasattr(module, a.name)
            ]
    assert not missing, f"{script.name} imports names that do not exist: {', '.join(missing)}"


def test_bench_ab_ratios_come_from_every_numeric_leaf_both_sides_report():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_ab", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ab.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    doc = {"a": {"img_s": 10, "ok": True, "name": "x"}, "b": [1.5, {"c": 2}]}
    assert module.leaves(doc) == {"a.img_s": 10.0, "b[0]": 1.5, "b[1].c": 2.0}  # booleans and text are not figures
