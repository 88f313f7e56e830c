"""pipeline/output.py: plain lines when stdout is not a terminal, rich tables when it is, one JSON document."""

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.table import Table

from tlpipe.pipeline.cli.output import Output, emit_json, summary_dict, table


def test_plain_when_not_a_terminal():
    buffer = io.StringIO()
    out = Output(file=buffer, width=40)
    assert out.plain
    out.print("x" * 100 + " [bold]62,720[/]")  # one line however long; markup removed
    table(out, ("name", "dim"), [("[green]mobilenet_v2[/]", "62,720"), ("a\tb", 3)], title="T")
    rich_table = Table("head", "params", title="cv")
    rich_table.add_row("svm *", "C=0.1, class_weight=balanced, pca=256")
    out.print(rich_table)  # any rich table prints as plain lines too
    assert buffer.getvalue().splitlines() == [
        "x" * 100 + " 62,720",
        "# T",
        "name\tdim",
        "mobilenet_v2\t62,720",
        "a\\tb\t3",  # a tab inside a cell is escaped: still one cell, and nothing lost
        "# cv",
        "head\tparams",
        "svm *\tC=0.1, class_weight=balanced, pca=256",
    ]


def test_rich_on_a_terminal_folds_and_keeps_numbers_whole():
    buffer = io.StringIO()
    out = Output(file=buffer, width=40, force_terminal=True, color_system=None)
    assert not out.plain
    table(out, ("name", "flat dim"), [("efficientnet_v2_b0_with_a_very_long_name", "62,720")], right=("flat dim",))
    text = buffer.getvalue()
    assert "62,720" in text and "┃" in text and "…" not in text and max(map(len, text.splitlines())) <= 40


@dataclass
class Summary:
    out: Path
    failures: list = field(default_factory=list)
    seconds: float = 2.0

    @property
    def rate(self) -> float:
        return 10 / self.seconds


def test_json(capsys):
    data = summary_dict(Summary(Path("c.h5"), [("a.jpg", "empty")]))
    assert data == {"out": "c.h5", "failures": [["a.jpg", "empty"]], "seconds": 2.0, "rate": 5.0}
    emit_json({"x": np.float32(0.5), "n": np.int64(3), "a": np.arange(2), "nan": math.nan, "p": Path("/t")})
    assert json.loads(capsys.readouterr().out) == {"x": 0.5, "n": 3, "a": [0, 1], "nan": None, "p": "/t"}
