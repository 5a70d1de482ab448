"""The gate table (eval/registry.py): a toy gate registered as one module and one row runs through the real CLI
(`align eval gate size`), reads its settings from its own section of the policy file, and fails closed; names that
are not gates are one sentence."""

import json

import pytest

from align.cli import main
from core.config import UserError
from eval.registry import GATES, gate_settings
from tests.eval import toy_gate


@pytest.fixture
def sized(tmp_path):
    parent, candidate = tmp_path / "parent", tmp_path / "candidate"
    for d, n in ((parent, 100), (candidate, 150)):
        d.mkdir()
        (d / "weights.bin").write_bytes(b"x" * n)
    return parent, candidate


def test_a_toy_gate_is_one_module_and_one_row(tmp_path, monkeypatch, sized):
    monkeypatch.setitem(GATES, toy_gate.ROW.name, toy_gate.ROW)
    parent, candidate = sized
    policy = tmp_path / "gates.yaml"
    policy.write_text("size: {max_ratio: 2.0}\nperplexity: {max_relative_increase: 0.1}\n")
    args = [
        "eval",
        "gate",
        "size",
        "--candidate",
        str(candidate),
        "--parent",
        str(parent),
        "--config",
        str(policy),
    ]
    assert main([*args, "--out", str(tmp_path / "pass")]) == 0
    record = json.loads((tmp_path / "pass" / "gate.json").read_text())
    assert record["verdict"] == "pass" and record["policy"] == {"max_ratio": 2.0}
    assert record["checks"][0]["candidate"] == pytest.approx(1.5)
    assert (tmp_path / "pass" / "gate.html").exists()
    assert main([*args, "--out", str(tmp_path / "fail"), "size.max_ratio=1.2"]) == 1  # overrides reach it
    assert json.loads((tmp_path / "fail" / "gate.json").read_text())["verdict"] == "fail"
    (parent / "weights.bin").unlink()  # an empty parent: the ratio cannot be computed, the gate fails closed
    assert main([*args, "--out", str(tmp_path / "closed")]) == 1
    assert json.loads((tmp_path / "closed" / "gate.json").read_text())["reasons"]


def test_gate_settings_are_each_rows_own_section(monkeypatch):
    monkeypatch.setitem(GATES, toy_gate.ROW.name, toy_gate.ROW)
    policy = {"size": {"max_ratio": 3.0}, "bias": {"max_margin_increase": 0.05}}
    assert gate_settings("size", policy, "p.yaml").max_ratio == 3.0
    assert gate_settings("bias", policy, "p.yaml").max_margin_increase == 0.05
    with pytest.raises(UserError, match="p.yaml: nonsense: not a gate; known: perplexity, task, bias, size"):
        gate_settings("size", {**policy, "nonsense": {}}, "p.yaml")
    with pytest.raises(UserError, match="'nope' is not a gate"):
        gate_settings("nope", policy, "p.yaml")
    with pytest.raises(UserError, match="max_ratio"):
        gate_settings("size", {"size": {"max_ratio": -1}}, "p.yaml")
