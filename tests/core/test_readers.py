"""Input readers on hostile files: every bad row is named with its real line and a reason, every good row is kept,
and whole-file problems are one sentence (UserError), never a traceback."""

import json
import os

import pytest

from core.config import UserError
from core.manifest import atomic_write_text
from core.readers import LoadReport, iter_rows

GOOD = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]


def _read(path):
    report = LoadReport()
    rows = list(iter_rows(path, report))
    return rows, report


@pytest.mark.parametrize(
    "bad,reason",
    [
        ('{"x": ' + "1" * 5000 + "}", "Exceeds the limit"),
        ("[" * 5000 + "]" * 5000, "nested too deeply"),
        ('{"a":' * 100 + "1" + "}" * 100, "nested too deeply"),
        ('{"instruction": "\\ud800", "output": "b"}', "unpaired surrogate"),
        ("[1, 2]", "expected a JSON object"),
        ("{oops", "not valid JSON"),
    ],
)
def test_jsonl_bad_line_is_named_and_good_lines_kept(tmp_path, bad, reason):
    p = tmp_path / "in.jsonl"
    p.write_text(json.dumps(GOOD[0]) + "\n" + bad + "\n" + json.dumps(GOOD[1]) + "\n")
    rows, report = _read(p)
    assert [r for _, r in rows] == GOOD and [n for n, _ in rows] == [1, 3]
    assert (
        len(report.problems) == 1
        and report.problems[0].startswith(f"{p}:2: ")
        and reason in report.problems[0]
    )


def test_csv_records_keep_their_real_line_numbers_and_bad_bytes_are_named(tmp_path):
    p = tmp_path / "in.csv"
    big = "x" * (2 << 20)
    p.write_bytes(b'instruction,output\n"two\nlines",ok\nbad\xff,zz\n"' + big.encode() + b'",y\nfine,good\n')
    rows, report = _read(p)
    assert rows == [
        (2, {"instruction": "two\nlines", "output": "ok"}),
        (6, {"instruction": "fine", "output": "good"}),
    ]
    assert report.problems[0].startswith(f"{p}:4: not valid UTF-8")
    assert report.problems[1].startswith(f"{p}:5: ") and "field" in report.problems[1]


def test_whole_file_problems_are_sentences(tmp_path):
    (tmp_path / "c.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match="not a readable Parquet file"):
        _read(tmp_path / "c.parquet")
    with pytest.raises(UserError, match="file not found"):
        _read(tmp_path / "missing.jsonl")
    (tmp_path / "d.json").write_text("[" * 100000)
    with pytest.raises(UserError, match=r"d\.json: "):
        _read(tmp_path / "d.json")


def test_written_files_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
