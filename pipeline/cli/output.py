"""What the command line prints, for people and for programs.

On a terminal: rich text and tables. When stdout is not a terminal (a pipe, a file, a test): plain text
lines that are never wrapped, cut or boxed, and tables as tab-separated lines under a header line, so
``tlpipe compare cache.h5 | cut -f1,2`` and ``tlpipe backbones | grep`` work. ``--json`` prints one JSON
document (:func:`emit_json`) instead of either.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from tlpipe.features.names import display_name

__all__ = ["Output", "emit_json", "summary_dict", "table"]


def _stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


class Output(Console):
    """A rich console on stdout that prints plain, unwrapped lines when stdout is not a terminal."""

    @property
    def plain(self) -> bool:
        return not self.is_terminal

    def print(self, *objects: Any, **kwargs: Any) -> None:  # noqa: A003 - rich's name
        if self.plain:
            from rich.table import Table

            if len(objects) == 1 and isinstance(objects[0], Table):  # anyone's rich table: plain lines too
                rich_table = objects[0]
                title = rich_table.title if isinstance(rich_table.title, str) else None
                cells = [
                    [c if isinstance(c, str) else getattr(c, "plain", str(c)) for c in col._cells]
                    for col in rich_table.columns
                ]
                headers = [
                    c.header if isinstance(c.header, str) else getattr(c.header, "plain", str(c.header))
                    for c in rich_table.columns
                ]
                table(self, headers, list(zip(*cells)), title=title)
                return
            kwargs.setdefault("soft_wrap", True)  # one logical line stays one line, whatever its length
            kwargs.setdefault("highlight", False)
        super().print(*objects, **kwargs)


# characters that end a line for some reader (str.splitlines, csv, editors) or separate a TSV cell, as escapes
_CELL_ESCAPES = {
    "\t": "\\t",
    "\n": "\\n",
    "\r": "\\r",
    "\x0b": "\\x0b",
    "\x0c": "\\x0c",
    "\x1c": "\\x1c",
    "\x1d": "\\x1d",
    "\x1e": "\\x1e",
    "\x85": "\\x85",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_CELL_TABLE = str.maketrans(_CELL_ESCAPES)


def tsv_cell(text: str) -> str:
    """A cell of a tab-separated line: tabs and every line break (``\\r``, ``\\n``, U+2028...) as backslash escapes,
    so a row stays one line of the same number of cells for any name."""
    return text.translate(_CELL_TABLE)


def md_cell(text: str) -> str:
    """A cell of a Markdown table: ``|`` escaped and line breaks as backslash escapes (:func:`tsv_cell`), so a row
    stays one row for any name."""
    return tsv_cell(text).replace("|", "\\|")


def table(
    console: Output,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    title: str | None = None,
    right: Sequence[str] = (),
    no_wrap: Sequence[str] = (),
) -> None:
    """Print a table: a rich table on a terminal (long cells fold, nothing is cut), otherwise a header line and
    one tab-separated line per row (cells as given, markup removed, tabs and line breaks escaped: :func:`tsv_cell`).

    Parameters
    ----------
    console : Output
        Where to print (the CLI's stdout console).
    columns : sequence of str
        Column names.
    rows : iterable of sequences
        One sequence of cells per row; cells are str (rich markup allowed) or anything ``str()`` renders.
    title : str, optional
        Shown above a rich table; in plain mode a line starting with ``# ``.
    right : sequence of str
        Columns to right-align in the rich table (numbers; they are never wrapped).
    no_wrap : sequence of str
        Columns the rich table keeps on one line (others fold to make room).
    """
    rows = [[c if isinstance(c, str) else str(c) for c in row] for row in rows]
    if console.plain:
        clean = lambda cell: Text.from_markup(tsv_cell(cell)).plain  # noqa: E731 (escaped first: rich drops \r)
        lines = ([f"# {title}"] if title else []) + ["\t".join(columns)]
        lines += ["\t".join(clean(c) for c in row) for row in rows]
        console.file.write("\n".join(lines) + "\n")
        console.file.flush()
        return
    from rich.table import Table

    rich_table = Table(title=title)
    for name in columns:
        rich_table.add_column(
            name,
            overflow="fold",
            no_wrap=name in no_wrap or name in right,
            justify="right" if name in right else "left",
        )
    for row in rows:
        rich_table.add_row(*row)
    console.print(rich_table)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, str):  # names that are not UTF-8: backslash escapes, so the document is valid UTF-8
        return display_name(value)
    if isinstance(value, dict):
        return {display_name(str(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return display_name(str(value))
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _jsonable(value.tolist())
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def summary_dict(obj: Any) -> dict:
    """A dataclass's fields and its computed properties (``failed``, ``images_per_second``...) as plain data.

    Parameters
    ----------
    obj : dataclass instance
        A run's summary (e.g. ``ExtractSummary``, ``ScoreSummary``).

    Returns
    -------
    dict
        JSON-ready data.
    """
    data = _jsonable(obj)
    for name in dir(type(obj)):
        if isinstance(getattr(type(obj), name, None), property) and not name.startswith("_"):
            data[name] = _jsonable(getattr(obj, name))
    return data


def emit_json(data: Any) -> None:
    """Print ``data`` as one JSON document on stdout (dataclasses, paths and numpy values converted; NaN as null;
    names that are not UTF-8 with backslash escapes, :func:`tlpipe.features.names.display_name`).

    Parameters
    ----------
    data : Any
        A dict, list, dataclass or value.
    """
    sys.stdout.write(json.dumps(_jsonable(data), indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()
