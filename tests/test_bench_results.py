"""bench/: every recorded result follows the one schema of bench/harness.py, and the harness refuses a result that
does not (machine, command, date, numeric metrics)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import check, write_result  # noqa: E402


def test_every_result_file_follows_the_schema():
    files = sorted((ROOT / "bench" / "results").glob("*.json"))
    assert files
    wrong = {f.name: check(json.loads(f.read_text())) for f in files}
    assert not {k: v for k, v in wrong.items() if v}, wrong
    names = {json.loads(f.read_text())["benchmark"] for f in files}
    scripts = {p.stem for p in (ROOT / "bench").rglob("*.py")}
    assert names <= scripts, names - scripts  # each result names the script that made it


def test_the_harness_writes_the_schema_and_refuses_what_is_not(tmp_path):
    out = write_result(
        tmp_path / "r.json", "toy", {"ratio": 2.0}, {"rows": [1, 2]}, machine_info={"cpu": "x"}
    )
    record = json.loads(out.read_text())
    assert not check(record) and record["metrics"] == {"ratio": 2.0} and record["command"]
    with pytest.raises(ValueError, match="metrics.ratio: must be a number"):
        write_result(tmp_path / "bad.json", "toy", {"ratio": "fast"}, {}, machine_info={})
    assert check({"benchmark": "x"}) == [
        "command: missing", "date: missing", "machine: missing", "metrics: missing", "details: missing",
        "metrics: must be an object of numbers",
    ]  # fmt: skip
