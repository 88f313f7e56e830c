"""Every text output survives any character in a file or class name (issue 34, kind 4): the score CSV quotes
``\\r``, ``\\n``, commas and quotes and is read back by csv, pandas and pyarrow (and resumed); JSON Lines escapes
the characters that some readers split lines on; plain tables and Markdown tables keep one row per line."""

import csv
import io
import json
import shutil

import pytest

from tests.reliability.conftest import tlpipe
from tlpipe.pipeline.cli.output import Output, table

ODD = [
    "flower/carriage\rreturn.jpg",
    'flower/comma, "quote"\nnewline.jpg',
    "flower/tab\there.jpg",
    "flower/line\u2028separator\u0085next.jpg",
    "odd\r|class/crlf\r\nname.jpg",
]


@pytest.fixture
def odd_folder(tmp_path, head):
    photos = shutil.copytree(head.photos, tmp_path / "photos")
    sources = sorted(photos.rglob("*.jpg"))
    for name, source in zip(ODD, sources):
        (photos / name).parent.mkdir(exist_ok=True)
        shutil.copy(source, photos / name)
    return photos


def test_the_score_csv_reads_back_in_csv_pandas_and_pyarrow_and_resumes(tmp_path, head, odd_folder):
    out = tmp_path / "scores.csv"
    common = ["--out", out, "--head", head.path, "--store", head.store.root]
    assert tlpipe("score", odd_folder, *common).returncode == 0
    want = {p.relative_to(odd_folder).as_posix() for p in odd_folder.rglob("*.jpg")}
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(want) == 17 and {r["path"] for r in rows} == want
    assert {r["true_label"] for r in rows} == {"china", "flower", "odd\r|class"}
    pd = pytest.importorskip("pandas")
    frame = pd.read_csv(out)
    assert len(frame) == 17 and set(frame["path"]) == want
    pacsv = pytest.importorskip("pyarrow.csv")
    arrow = pacsv.read_csv(out, parse_options=pacsv.ParseOptions(newlines_in_values=True))
    assert arrow.num_rows == 17 and set(arrow.column("path").to_pylist()) == want
    again = tlpipe("score", odd_folder, *common)
    assert again.returncode == 0 and "17 already in the output" in again.stdout, again.stdout + again.stderr


def test_json_lines_keep_one_record_per_line_for_every_line_splitter(tmp_path, head, odd_folder):
    out = tmp_path / "scores.jsonl"
    assert tlpipe("score", odd_folder, "--out", out, "--head", head.path, "--store", head.store.root).returncode == 0
    text = out.read_text(encoding="utf-8")
    for lines in (text.split("\n")[:-1], text.splitlines()):  # str.splitlines also splits on U+2028, U+0085...
        assert len(lines) == 17 and {json.loads(line)["path"] for line in lines} >= set(ODD)


def test_plain_and_markdown_tables_keep_one_row_per_line():
    buffer = io.StringIO()
    table(Output(file=buffer, force_terminal=False), ["name", "n"], [[name, 1] for name in ODD])
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 1 + len(ODD) and all(len(line.split("\t")) == 2 for line in lines)
    assert [line.split("\t")[0] for line in lines[1:]] == [
        name.replace("\r", "\\r")
        .replace("\n", "\\n")
        .replace("\t", "\\t")
        .replace("\u2028", "\\u2028")
        .replace("\u0085", "\\x85")
        for name in ODD
    ]
    from tlpipe.pipeline.cli.output import md_cell

    for name in ODD:
        row = f"| {md_cell(name)} | 1 |"
        assert len(row.splitlines()) == 1 and row.replace("\\|", "").count("|") == 3
    from tlpipe.pipeline.reports.audit import _md_path

    assert all(len(_md_path(name).splitlines()) == 1 and "|" not in _md_path(name).replace("\\|", "") for name in ODD)
