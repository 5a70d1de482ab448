"""Fault injection: align killed with SIGKILL at chosen points (while a stage gates itself, while a product folder
is being swapped in, while `align run` gates a stage), then resumed. Never a complete artifact without its gate,
and the resumed result equals the uninterrupted one. The kill comes from tests/faults/runner.py, which patches the
named function in the child process only."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from align.cli import main
from tests.conftest import EXAMPLES
from tests.stages.test_dpo import _pairs_file

ROOT = Path(__file__).resolve().parents[2]


def killed_at(target: str, nth: int, when: str, args: list[str], needle: str | None = None) -> None:
    cmd = [
        sys.executable,
        "-m",
        "tests.faults.runner",
        target,
        str(nth),
        when,
        *([needle] if needle else []),
        "--",
    ]
    r = subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])


def manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def same_weights(a: Path, b: Path) -> None:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        assert (x[k] - y[k]).abs().max().item() < 1e-6, k


SFT = ["sft", "--config", "configs/sft.yaml", "model.name_or_path=tiny-random-llama",
       f"data.train_file={EXAMPLES / 'instructions_train.jsonl'}", "train.max_steps=3", "train.save_steps=2",
       "train.early_stopping_patience=null", "train.report_to=[none]"]  # fmt: skip


@pytest.fixture(scope="module")
def sft_reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("k9") / "sft"
    assert main([*SFT, f"output_dir={out}"]) == 0
    return out


def test_sft_killed_while_its_adapter_is_swapped_in_resumes_to_the_same_weights(tmp_path, sft_reference):
    out = tmp_path / "sft"
    killed_at("pathlib:Path.rename", 1, "before", [*SFT, f"output_dir={out}"], needle="adapter")
    assert manifest(out)["status"] == "running" and not (out / "adapter").exists()
    assert main([*SFT, f"output_dir={out}", "--resume"]) == 0
    assert manifest(out)["status"] == "complete"
    same_weights(out / "adapter", sft_reference / "adapter")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".adapter.")]  # no half folder left behind


def test_dpo_killed_during_its_gate_is_not_complete_and_resumes_to_the_same_result(tmp_path, sft_reference):
    _pairs_file(tmp_path / "pairs.jsonl", n=24)
    args = ["dpo", "--config", "configs/dpo.yaml", f"init_from={sft_reference}", "data.preferences_dir=null",
            f"data.pairs_file={tmp_path / 'pairs.jsonl'}", "data.validation_fraction=0.25", "train.max_steps=3",
            "train.save_steps=2", "train.report_to=[none]", "eval.prompts=0", "perplexity_gate.min_examples=5",
            "perplexity_gate.max_relative_increase=10"]  # fmt: skip
    ref, out = tmp_path / "ref", tmp_path / "dpo"
    assert main([*args, f"output_dir={ref}"]) == 0
    killed_at("eval.gates:run_gate", 1, "before", [*args, f"output_dir={out}"])
    m = manifest(out)
    assert m["status"] == "running" and m["gates"] == []  # products written, gate not run: not complete
    assert main([*args, f"output_dir={out}", "--resume"]) == 0
    m = manifest(out)
    assert m["status"] == "complete" and [g["gate"] for g in m["gates"]] == ["perplexity"]
    same_weights(out / "adapter", ref / "adapter")
    assert manifest(ref)["gates"][0]["verdict"] == m["gates"][0]["verdict"]


def test_align_run_killed_during_a_pipeline_gate_reruns_only_the_gate(tmp_path):
    run = tmp_path / "run"
    sft = {"config": "configs/sft.yaml", "overrides": {
        "model.name_or_path": "tiny-random-llama", "data.train_file": str(EXAMPLES / "instructions_train.jsonl"),
        "data.validation_file": str(EXAMPLES / "instructions_validation.jsonl"), "train.max_steps": 2,
        "train.early_stopping_patience": None, "train.report_to": ["none"]},
        "gates": {"perplexity": {"max_relative_increase": 100.0, "min_examples": 5}}}  # fmt: skip
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(
        yaml.safe_dump({"run_dir": str(run), "gate_policy": "configs/gates.yaml", "stages": {"sft": sft}})
    )
    killed_at("eval.gates:write_gate", 1, "before", ["run", "--config", str(cfg)])
    key = manifest(run / "sft")["key"]
    assert (
        manifest(run / "sft")["status"] == "complete"
        and not (run / "gates" / "sft-perplexity" / "gate.json").exists()
    )
    assert main(["run", "--config", str(cfg)]) == 0
    assert manifest(run / "sft")["key"] == key  # the stage was up to date: only the gate ran again
    state = json.loads((run / "pipeline.json").read_text())
    assert [g["verdict"] for g in state["stages"]["sft"]["gates"]] == ["pass"]
    assert (run / "report.html").exists()
    # a stage redone with --from is a new candidate: its gate is evaluated again, never reused
    first = json.loads((run / "gates" / "sft-perplexity" / "gate.json").read_text())
    assert main(["run", "--config", str(cfg), "--from", "sft"]) == 0
    again = json.loads((run / "gates" / "sft-perplexity" / "gate.json").read_text())
    assert again["key"] != first["key"] and again["started_at"] >= first["started_at"]


DATA_ROWS = "".join(
    json.dumps({"instruction": f"task {i}", "output": f"answer number {i}"}) + "\n" for i in range(40)
)


@pytest.mark.parametrize("stage", ["data", "preferences"])
def test_data_stages_killed_while_swapping_their_product_resume_to_the_same_product(tmp_path, stage):
    if stage == "data":
        src = tmp_path / "in.jsonl"
        src.write_text(DATA_ROWS)
        args, product = ["data", "build", str(src), "--set", "tokenizer=null"], "dataset"
    else:
        src = EXAMPLES / "preference_rankings.jsonl"
        args, product = (
            ["data", "build-preferences", str(src)],
            "pairs",
        )  # kwise is swapped in first, then pairs
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main([*args, "--out", str(ref)]) == 0
    killed_at("pathlib:Path.rename", 1, "before", [*args, "--out", str(out)], needle=product)
    assert manifest(out)["status"] == "running"
    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert manifest(out)["status"] == "complete" and manifest(out)["key"] == manifest(ref)["key"]
    for f in sorted((ref / product).rglob("*.arrow")):
        assert f.read_bytes() == (out / product / f.relative_to(ref / product)).read_bytes()
