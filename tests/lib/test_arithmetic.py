"""lib/arithmetic.py: the verifiable task is reproducible, its answers right, its splits disjoint."""

import json
import re

import pytest

from align.cli import main
from lib.arithmetic import splits
from lib.rewards.verifiers import answers_equal, final_answer


def test_the_same_seed_gives_the_same_problems_and_the_splits_share_none():
    a, b = splits(200, 50, seed=3, max_steps=2), splits(200, 50, seed=3, max_steps=2)
    assert a == b and splits(200, 50, seed=4) != a
    assert not {r["prompt"] for r in a["train"]} & {r["prompt"] for r in a["test"]}
    assert len({r["prompt"] for r in a["train"]}) == 200


def test_every_answer_is_what_its_worked_steps_compute_and_the_verifier_reads_it():
    for r in splits(300, 0, seed=1, max_steps=2)["train"]:
        total = None
        for x, op, y, z in re.findall(r"(\d+) ([+x-]) (\d+) = (\d+)", r["completion"]):
            got = {"+": int(x) + int(y), "-": int(x) - int(y), "x": int(x) * int(y)}[op]
            assert got == int(z) and (total is None or int(x) == total)
            total = got
        assert str(total) == r["answer"] and int(r["answer"]) >= 0
        assert answers_equal(final_answer(r["completion"], True), r["answer"], True, 1e-6)


def test_too_many_problems_for_the_settings_is_said():
    with pytest.raises(ValueError, match="distinct problems"):
        splits(5000, 0, max_operand=2)


def test_the_cli_writes_a_hub_style_folder(tmp_path, capsys):
    assert main(["data", "arithmetic", "--out", str(tmp_path / "a"), "--train", "20", "--test", "5"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and {"prompt", "completion", "answer"} <= set(rows[0])
    assert len((tmp_path / "a" / "test.jsonl").read_text().splitlines()) == 5
    assert "configs/ppo_arithmetic.yaml" in capsys.readouterr().out.replace("\n", "")
