"""The stage contract (core/stage.py) on a stage-shaped config, without a model: the artifact stays 'running'
until complete() records its gates, a failure marks it 'failed', a finished artifact is never overwritten, and
--resume on it returns the recorded gates."""

from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel

from core.config import UserError
from core.manifest import read_manifest
from core.stage import StageContext
from data_schemas.gates import Check, GateResult
from eval.gates import write_gate


class ToyConfig(BaseModel):
    stage: Literal["toy"] = "toy"
    output_dir: Path
    seed: int = 1
    knob: int = 3


def _gate(out: Path, passed: bool) -> GateResult:
    g = GateResult(gate="toy", checks=[Check(metric="m", candidate=1.0, passed=passed)])
    write_gate(g, out / "gates" / "toy")
    return g


def test_running_until_complete_records_its_gate(tmp_path):
    ctx = StageContext(ToyConfig(output_dir=tmp_path / "a"))
    with ctx.open():
        gate = _gate(ctx.out, passed=False)
        assert read_manifest(ctx.out).status == "running"  # the gate ran; nothing is complete yet
        result = ctx.complete({"x": 1}, gates=[gate])
    m = read_manifest(ctx.out)
    assert (
        m.status == "complete"
        and m.gates[0]["verdict"] == "fail"
        and m.gates[0]["report"] == "gates/toy/gate.md"
    )
    assert result.status == "complete" and not result.passed and result.exit_code == 1

    again = StageContext(ToyConfig(output_dir=tmp_path / "a"), resume=True)
    assert again.finished
    r = again.existing_result()
    assert [g.verdict for g in r.gates] == ["fail"] and r.exit_code == 1


def test_failure_inside_marks_failed_and_a_full_folder_needs_resume(tmp_path):
    ctx = StageContext(ToyConfig(output_dir=tmp_path / "b"))
    with pytest.raises(RuntimeError), ctx.open():
        raise RuntimeError("boom")
    m = read_manifest(tmp_path / "b")
    assert m.status == "failed" and "boom" in m.error
    with pytest.raises(UserError, match="not empty; pass --resume"):
        StageContext(ToyConfig(output_dir=tmp_path / "b"))


def test_the_key_leaves_out_operational_fields_only(tmp_path):
    a, b, c = (
        StageContext(ToyConfig(output_dir=tmp_path / n, knob=k)) for n, k in (("x", 3), ("y", 3), ("z", 4))
    )
    for ctx in (a, b, c):
        with ctx.open():
            ctx.complete({})
    keys = [read_manifest(ctx.out).key for ctx in (a, b, c)]
    assert keys[0] == keys[1] != keys[2]


def test_a_gate_cannot_pass_by_accident():
    assert GateResult(gate="g").verdict == "fail"  # no check evaluated
    nan = GateResult(gate="g", checks=[Check(metric="m", candidate=float("nan"), passed=True)])
    assert nan.verdict == "fail" and not nan.checks[0].passed
    assert GateResult(gate="g", checks=[Check(metric="m", candidate=1.0, passed=True)]).verdict == "pass"
    with pytest.raises(ValueError):
        GateResult.model_validate({"gate": "g", "override": {"reviewer": "", "reason": "x", "at": "now"}})


def test_resume_refuses_a_changed_config_unless_forced(tmp_path):
    ctx = StageContext(ToyConfig(output_dir=tmp_path / "r", knob=3))
    with ctx.open():
        pass  # interrupted: the manifest stays 'running'
    changed = StageContext(ToyConfig(output_dir=tmp_path / "r", knob=4), resume=True)
    with pytest.raises(UserError, match="changed since this run started"), changed.open():
        pass
    forced = StageContext(ToyConfig(output_dir=tmp_path / "r", knob=4), resume=True, force=True)
    with forced.open():
        forced.complete({})
    assert read_manifest(tmp_path / "r").status == "complete"


def test_two_writers_of_one_folder_are_refused(tmp_path):
    first = StageContext(ToyConfig(output_dir=tmp_path / "l"))
    with first.open():
        second = StageContext(ToyConfig(output_dir=tmp_path / "l"), resume=True)
        with pytest.raises(UserError, match="another align process is writing"), second.open():
            pass
        first.complete({})
    assert read_manifest(tmp_path / "l").status == "complete"


def test_a_gate_record_from_before_the_typed_api_still_reads(tmp_path):
    from core.manifest import read_gate

    old = {"gate": "perplexity", "verdict": "pass", "reasons": [], "candidate_description": "x", "data_counts": {},
           "checks": [{"metric": "m", "candidate": 1.0, "parent": 1.0, "passed": True}]}  # fmt: skip
    (tmp_path / "gate.json").write_text(__import__("json").dumps(old))
    r = read_gate(tmp_path)
    assert r.verdict == "pass" and r.details["candidate_description"] == "x"
    (tmp_path / "gate.json").write_text("{broken")
    assert read_gate(tmp_path) is None


def test_resume_on_a_complete_artifact_checks_its_stage_config_and_inputs(tmp_path):
    """Issue 34 B13: `--resume` on a complete artifact said "already complete" for a changed config, and `sft
    --resume` on a data artifact said "sft already complete"."""
    data = tmp_path / "in.txt"
    data.write_text("one")
    ctx = StageContext(ToyConfig(output_dir=tmp_path / "r", knob=3))
    with ctx.open(inputs=[(data, "train")]):
        ctx.complete({})
    assert StageContext(ToyConfig(output_dir=tmp_path / "r", knob=3), resume=True).finished  # the same run
    with pytest.raises(UserError, match="the config changed"):
        StageContext(ToyConfig(output_dir=tmp_path / "r", knob=4), resume=True)
    data.write_text("two")
    with pytest.raises(UserError, match=f"input {data} changed"):
        StageContext(ToyConfig(output_dir=tmp_path / "r", knob=3), resume=True)

    class OtherStage(ToyConfig):
        stage: Literal["other"] = "other"

    with pytest.raises(UserError, match="holds a toy artifact, not other"):
        StageContext(OtherStage(output_dir=tmp_path / "r"), resume=True)


def test_resume_into_a_folder_that_is_not_an_align_run_touches_nothing(tmp_path):
    """Issue 34 B12: `data build --resume` into a folder without a manifest replaced the user's config.yaml."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my own settings\n")
    with pytest.raises(UserError, match="no manifest.json"):
        StageContext(ToyConfig(output_dir=mine), resume=True)
    assert (mine / "config.yaml").read_text() == "my own settings\n"


def test_two_runs_that_both_found_the_folder_empty_do_not_both_write_it(tmp_path):
    """Issue 34 B6: two `data build` into one --out both exited 0, and the manifest named the wrong input."""
    first = StageContext(ToyConfig(output_dir=tmp_path / "o", knob=1))
    second = StageContext(ToyConfig(output_dir=tmp_path / "o", knob=2))  # checked before the first wrote
    with first.open():
        first.complete({})
    with pytest.raises(UserError, match="another run wrote this folder"), second.open():
        pass
    assert read_manifest(tmp_path / "o").status == "complete"


def test_non_finite_trained_weights_never_complete(tmp_path):
    """Issue 34 B10: a run whose adapter tensors were all NaN finished 'complete', exit 0."""
    import torch
    from safetensors.torch import save_file

    ctx = StageContext(ToyConfig(output_dir=tmp_path / "n"))
    with pytest.raises(UserError, match="not finite"), ctx.open():
        (tmp_path / "n" / "adapter").mkdir()
        save_file({"a.lora_A.weight": torch.tensor([1.0, float("nan")])},
                  str(tmp_path / "n" / "adapter" / "adapter_model.safetensors"))  # fmt: skip
        ctx.complete({})
    assert read_manifest(tmp_path / "n").status == "failed"
