"""The task gate: hand-computed decisions, and the real command catching a model whose answers got worse."""

from __future__ import annotations

import json
import math

import pytest

from data_schemas.config import TaskGateSettings
from eval.task_gate import decide_task
from tests.conftest import EXAMPLES

REFS = ["the cat sat", "a b c d"]


def settings(**kw):
    return TaskGateSettings(min_examples=1, **kw)


def test_a_shorter_answer_loses_rouge_l_by_the_hand_computed_amount():
    # "the cat" vs "the cat sat": LCS 2, precision 1, recall 2/3, F1 0.8; the other example is unchanged (1.0)
    r = decide_task(REFS, parent=REFS, candidate=["the cat", "a b c d"], settings=settings())
    assert r.metrics["delta"] == pytest.approx(0.9 - 1.0)
    assert r.verdict == "fail" and "fell by 0.1000" in r.reasons[0]
    assert r.metrics["candidate"]["rouge_l"] == pytest.approx(0.9)
    r = decide_task(REFS, parent=REFS, candidate=["the cat", "a b c d"], settings=settings(max_decrease=0.1))
    assert r.verdict == "pass"  # exactly at the allowed drop


def test_bleu_decides_on_the_corpus_score_scaled_to_one():
    r = decide_task(REFS, parent=REFS, candidate=list(REFS), settings=settings(metric="bleu"))
    assert r.verdict == "pass" and r.metrics["delta"] == 0 and r.metrics["delta_ci"] == [0.0, 0.0]
    worse = decide_task(REFS, parent=REFS, candidate=["the dog", "x"], settings=settings(metric="bleu"))
    assert worse.verdict == "fail" and worse.metrics["delta"] == pytest.approx(
        -1.0
    )  # 100 -> 0, on a 0-1 scale


def test_interval_test_needs_evidence_of_no_regression():
    refs = ["alpha beta gamma delta"] * 10 + ["one two three four"] * 10
    parent = list(refs)
    candidate = list(refs)
    candidate[0] = "alpha beta gamma"  # one example of 20 loses a little: mean drop 0.0071
    point = decide_task(refs, parent, candidate, settings(max_decrease=0.01))
    assert point.verdict == "pass"
    lo, _ = point.metrics["delta_ci"]
    strict = decide_task(refs, parent, candidate, settings(max_decrease=0.01, test="interval"))
    assert (strict.verdict == "fail") == (lo < -0.01)


def test_too_few_examples_or_none_fail_closed():
    r = decide_task([], [], [], TaskGateSettings())
    assert r.verdict == "fail" and "only 0 examples" in r.reasons[0] and math.isnan(r.metrics["delta"])
    r = decide_task(REFS, REFS, REFS, TaskGateSettings(min_examples=5))
    assert r.verdict == "fail"


@pytest.mark.real_model
def test_the_command_fails_a_model_whose_answers_got_worse(tmp_path, tiny_model_path, real_model_path):
    """The real SmolLM2 answers the bundled held-out questions (ROUGE-L about 0.2); a random model's answers share
    nothing with the references: the gate fails it, and passes a model against itself."""
    from align.cli import main

    data = EXAMPLES / "instructions_validation.jsonl"
    common = ["--data", str(data), "--config", "configs/gates.yaml", "task.max_new_tokens=24",
              "task.max_examples=20"]  # fmt: skip
    worse = ["eval", "gate", "task", "--candidate", "tiny-random-llama", "--parent", "smollm2-135m-instruct"]
    assert main([*worse, "--out", str(tmp_path / "worse"), *common]) == 1
    g = json.loads((tmp_path / "worse" / "gate.json").read_text())
    assert (
        g["verdict"] == "fail" and g["metrics"]["parent"]["rouge_l"] > 0.1 and g["metrics"]["examples"] == 20
    )
    assert g["worst_examples"] and (tmp_path / "worse" / "gate.html").exists()
    rows = [json.loads(x) for x in (tmp_path / "worse" / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all(r["reference"] and r["parent"] for r in rows)
    same = ["eval", "gate", "task", "--candidate", "tiny-random-llama", "--parent", "tiny-random-llama"]
    assert main([*same, "--out", str(tmp_path / "same"), *common]) == 0
