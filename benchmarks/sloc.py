"""Size of Python files: code lines (lines holding code, not blank, comment or docstring lines: module, class and
function docstrings) beside the physical line count; with ``--ast``, AST nodes without docstrings; with
``--formatted``, code lines after ``ruff format`` with the repository's pyproject.toml (on a copy), so files
formatted by hand and by ruff compare fairly.

    python benchmarks/sloc.py [--ast] [--formatted] features/extract.py features/stream.py ...

prints ``code physical [ast] [formatted] path`` per file, then the totals. Used to size the extract and score
paths (issue 13): the paths at be83499 come from ``git archive be83499 features pipeline | tar -x -C /tmp/before``.
"""

from __future__ import annotations

import argparse
import ast
import io
import shutil
import subprocess
import sys
import tempfile
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIPPED = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
DOCUMENTED = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _docstrings(tree: ast.AST) -> list[ast.Expr]:
    """The docstring statements of a module and of its classes and functions."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, DOCUMENTED) and node.body and isinstance(node.body[0], ast.Expr):
            value = node.body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                found.append(node.body[0])
    return found


def code_lines(source: str) -> int:
    """Lines with a token that is neither a comment nor part of a docstring."""
    docstrings = {n for d in _docstrings(ast.parse(source)) for n in range(d.lineno, (d.end_lineno or 0) + 1)}
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in SKIPPED:
            lines.update(n for n in range(token.start[0], token.end[0] + 1) if n not in docstrings)
    return len(lines)


def ast_nodes(source: str) -> int:
    """AST nodes (every node ``ast.walk`` yields, expression contexts included), docstrings left out (a body
    that is only a docstring counts as one ``pass``); independent of formatting."""
    tree = ast.parse(source)
    docstrings = {id(d) for d in _docstrings(tree)}
    for node in ast.walk(tree):
        if isinstance(node, DOCUMENTED) and node.body and id(node.body[0]) in docstrings:
            node.body = node.body[1:] or [ast.Pass()]
    return sum(1 for _ in ast.walk(tree))


def formatted_code_lines(path: Path) -> int:
    """:func:`code_lines` of a copy of ``path`` formatted by ``ruff format --config pyproject.toml``."""
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / path.name
        shutil.copyfile(path, copy)
        subprocess.run(
            [sys.executable, "-m", "ruff", "format", "-q", "--config", str(ROOT / "pyproject.toml"), str(copy)],
            check=True,
        )
        return code_lines(copy.read_text(encoding="utf-8"))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ast", action="store_true", help="also count AST nodes without docstrings")
    parser.add_argument("--formatted", action="store_true", help="also count code lines after ruff format")
    parser.add_argument("paths", nargs="+", type=Path)
    args = parser.parse_args(argv)
    totals = [0, 0, 0]
    for path in args.paths:
        source = path.read_text(encoding="utf-8")
        counts = [code_lines(source)]
        counts += [ast_nodes(source)] if args.ast else []
        counts += [formatted_code_lines(path)] if args.formatted else []
        totals = [t + c for t, c in zip(totals, counts)]
        print(counts[0], source.count("\n"), *counts[1:], path)
    print(*totals[: 1 + args.ast + args.formatted], "total")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
