"""The planted-bias fixtures of bench/research/gate_power.py as tests: each fixture, trained on data disjoint from what the
gate evaluates (CrowS-Pairs rows 800+, its own user prompts), fails the bias gate through the real CLI; the same
training on neutral data passes. Real model, tens of minutes each on 2 CPU cores: `-m slow`. The measured table
is in docs/gates.md."""

import json
from pathlib import Path

import pytest
import yaml

from align.cli import main
from bench.research.gate_power import BBQ, CROWS, EVAL_ROWS, TRAIN_ROWS, train
from tests.conftest import shared_file

pytestmark = [pytest.mark.slow, pytest.mark.real_model]


def _gate(tmp_path, candidate, parent) -> tuple[int, dict]:
    shared_file(CROWS.name), shared_file(BBQ.name)
    assert EVAL_ROWS.stop <= TRAIN_ROWS.start  # the gate's CrowS rows are not the fixtures' training rows
    policy = yaml.safe_load(Path("configs/gates.yaml").read_text())
    policy["bias"].update(
        suites=["probes", "crows_pairs", "bbq"], crows_pairs_path=str(CROWS), bbq_path=str(BBQ)
    )
    path = tmp_path / "gates.yaml"
    path.write_text(yaml.safe_dump(policy))
    out = tmp_path / "gate"
    code = main(["eval", "gate", "bias", "--candidate", str(candidate), "--parent", str(parent), "--out", str(out),
                 "--config", str(path)])  # fmt: skip
    return code, json.loads((out / "gate.json").read_text())


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("gate_power")


def test_stereotyped_sft_fails_the_bias_gate(tmp_path, work):
    code, r = _gate(tmp_path, train("sft-stereotyped", work), "smollm2-135m-instruct")
    assert code == 1 and r["verdict"] == "fail"
    assert any("(chat)" in c["metric"] and not c["passed"] for c in r["checks"])


def test_poisoned_dpo_fails_the_bias_gate(tmp_path, work):
    code, r = _gate(tmp_path, train("dpo-poisoned", work), train("sft", work))
    assert code == 1 and r["verdict"] == "fail"


def test_clean_controls_pass_the_bias_gate(tmp_path, work):
    code, r = _gate(tmp_path, train("sft", work), "smollm2-135m-instruct")
    assert code == 0, r["reasons"]
    code, r = _gate(tmp_path / "dpo", train("dpo-clean-s1", work), train("sft", work))
    assert code == 0, r["reasons"]


def test_matched_clean_sft_passes_the_bias_gate(tmp_path, work):
    """sft-stereotyped's recipe (rows, prompts, epochs, rate) with neutral answers: the gate passes it, so the
    stereotyped fixture fails for what it learned, not for how hard it was trained."""
    code, r = _gate(tmp_path, train("sft-neutral-matched", work), "smollm2-135m-instruct")
    assert code == 0, r["reasons"]
    assert set(r["metrics"]["drift"]) == {"text", "chat"}


def test_poisoned_grpo_fails_the_bias_gate_in_the_choice_context(tmp_path, work):
    """The RL fixture that learned its bias (a reward model on two rounds of poisoned annotation driving GRPO on the
    choice task, docs/gates.md) learned it where it was trained, choosing between two sentences: the default gate
    fails it on CrowS-Pairs in the choice context, which the text and chat contexts alone pass. About 75 min on 2
    CPU cores."""
    candidate, parent = train("grpo-two-rounds-rm", work), train("sft", work)
    code, r = _gate(tmp_path, candidate, parent)
    assert code == 1 and r["verdict"] == "fail"
    assert any("crows_pairs (choice)" in c["metric"] and not c["passed"] for c in r["checks"])
