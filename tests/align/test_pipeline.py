"""`align run` on the tiny model through the real CLI: a full pipeline completes and a re-run skips every stage; a
changed config re-runs only what depends on it; a failed gate stops the run until a named reviewer overrides it;
an interrupted stage resumes."""

import json
from pathlib import Path

import pytest
import yaml

from align.cli import main
from tests.conftest import EXAMPLES

LOOSE_PPL = {"max_relative_increase": 100.0, "min_examples": 5}
LOOSE_BIAS = {
    "max_share_increase": 1.0,
    "max_margin_increase": 100.0,
    "max_gap_increase": 10.0,
    "bootstrap_samples": 200,
}


def _sft(**extra):
    over = {
        "model.name_or_path": "tiny-random-llama",
        "data.train_file": "{run}/data",
        "data.validation_file": str(EXAMPLES / "instructions_validation.jsonl"),
        "train.max_steps": 2,
        "train.early_stopping_patience": None,
        "train.report_to": ["none"],
    }
    return {"config": "configs/sft.yaml", "overrides": {**over, **extra}}


def _pipeline(run: Path, **stages) -> dict:
    return {"run_dir": str(run), "gate_policy": "configs/gates.yaml", "stages": stages}


DATA = {
    "config": "configs/data.yaml",
    "overrides": {"inputs": [str(EXAMPLES / "instructions_train.jsonl")], "validation_fraction": 0.0},
}
PREFS = {
    "config": "configs/preferences.yaml",
    "overrides": {"inputs": [str(EXAMPLES / "preference_rankings.jsonl")]},
}
REWARD = {
    "config": "configs/reward.yaml",
    "overrides": {
        "init_from": "{run}/sft",
        "data.preferences_dir": "{run}/preferences",
        "data.max_length": 128,
        "train.max_steps": 2,
        "train.report_to": ["none"],
        "gate.min_accuracy": 0.0,
        "gate.min_margin_over_length": 0.0,
        "gate.min_pairs": 1,
    },
}


def _dpo(steps=2):
    return {
        "config": "configs/dpo.yaml",
        "overrides": {
            "init_from": "{run}/sft",
            "data.preferences_dir": "{run}/preferences",
            "data.max_pairs": 16,
            "data.max_length": 128,
            "data.max_prompt_length": 64,
            "train.max_steps": steps,
            "train.report_to": ["none"],
            "eval.prompts": 0,
            "perplexity_gate.max_relative_increase": 100.0,
            "perplexity_gate.min_examples": 5,
        },
        "gates": {"bias": LOOSE_BIAS},
    }


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _finished(run: Path) -> dict[str, str]:
    return {
        d.name: json.loads((d / "manifest.json").read_text())["finished_at"]
        for d in run.iterdir()
        if (d / "manifest.json").exists()
    }


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    run = root / "run"
    cfg = _pipeline(
        run,
        data=DATA,
        sft={**_sft(), "gates": {"perplexity": LOOSE_PPL, "bias": LOOSE_BIAS}},
        preferences=PREFS,
        reward=REWARD,
        dpo=_dpo(),
    )
    p = str(_write(root / "p.yaml", cfg))
    # A 2-step reward model on a random tiny model cannot beat the length baseline: its gate fails (closed), the
    # run stops there, and goes on once a reviewer has recorded an override.
    assert main(["run", "--config", p]) == 1
    assert not (run / "dpo").exists()
    reward_gate = run / "reward" / "gates" / "reward"
    assert (
        main(["gate", "override", str(reward_gate), "--reviewer", "QA", "--reason", "tiny test model"]) == 0
    )
    assert main(["run", "--config", p]) == 0
    return root, run, cfg


def test_pipeline_completes_with_lineage_and_a_report(full_run):
    _, run, _ = full_run
    state = json.loads((run / "pipeline.json").read_text())
    assert list(state["stages"]) == ["data", "sft", "preferences", "reward", "dpo"]
    assert all(s["status"] == "complete" for s in state["stages"].values())
    gates = {
        (g["stage"], g["gate"]): g["verdict"] for s in state["stages"].values() for g in s.get("gates", [])
    }
    assert gates == {
        ("sft", "perplexity"): "pass",
        ("sft", "bias"): "pass",
        ("reward", "reward"): "fail",  # overridden
        ("dpo", "perplexity"): "pass",
        ("dpo", "bias"): "pass",
    }
    dpo = json.loads((run / "dpo" / "manifest.json").read_text())
    assert {p["stage"] for p in dpo["parents"]} == {"sft", "preferences"}
    sft = json.loads((run / "sft" / "manifest.json").read_text())
    assert sft["parents"][0]["stage"] == "data"
    html = (run / "report.html").read_text()
    assert "Run: PASS WITH OVERRIDES" in html and "gates/sft-bias/gate.html" in html
    assert "reward: OVERRIDDEN" in html
    reward = json.loads((run / "reward" / "manifest.json").read_text())
    assert reward["overrides"][0]["reviewer"] == "QA" and reward["overrides"][0]["gate"] == "reward"
    assert (run / "gates" / "sft-bias" / "gate.html").exists() and (
        run / "gates" / "sft-perplexity" / "gate.html"
    ).exists()
    # the cards that leave with the models list the gates `align run` ran on them, with their checks
    sft_card = yaml.safe_load((run / "sft" / "README.md").read_text().split("---\n")[1])
    ran = {g["gate"]: g for g in sft_card["align"]["gates"] if g["by"] == "align run"}
    assert set(ran) == {"perplexity", "bias"} and ran["bias"]["report"] == "../gates/sft-bias/gate.html"
    assert all(g["verdict"] == "pass" and g["checks"] for g in ran.values())
    assert "No gate has run" not in (run / "sft" / "README.md").read_text()
    reward_card = yaml.safe_load((run / "reward" / "README.md").read_text().split("---\n")[1])
    assert reward_card["align"]["gates"][0]["override"] == {"reviewer": "QA", "reason": "tiny test model"}


def test_rerun_skips_finished_stages_and_a_change_reruns_only_dependants(full_run, capsys):
    root, run, cfg = full_run
    before = _finished(run)
    capsys.readouterr()
    assert main(["run", "--config", str(root / "p.yaml")]) == 0
    assert _finished(run) == before
    assert capsys.readouterr().err.count("up to date") >= 5 + 3  # 5 stages and the gates run by the pipeline

    changed = {**cfg, "stages": {**cfg["stages"], "dpo": _dpo(steps=3)}}
    assert main(["run", "--config", str(_write(root / "p2.yaml", changed))]) == 0
    after = _finished(run)
    assert {k for k in before if after[k] != before[k]} == {"dpo"}
    assert json.loads((run / "dpo" / "manifest.json").read_text())["metrics"]["global_step"] == 3
    assert any(p.name.startswith("dpo-") for p in (run / ".superseded").iterdir())


def test_failed_gate_stops_the_run_until_a_reviewer_overrides_it(tmp_path, capsys):
    run = tmp_path / "run"
    strict = {**LOOSE_BIAS, "max_share": 0.01}  # no model prefers the anti-stereotype in 99% of pairs
    cfg = _pipeline(run, data=DATA, sft={**_sft(), "gates": {"bias": strict}}, preferences=PREFS)
    p = _write(tmp_path / "p.yaml", cfg)
    assert main(["run", "--config", str(p)]) == 1
    err = capsys.readouterr().err
    folded = err.replace("\n", "")  # rich folds a path longer than the terminal (pytest's tmp dirs grow)
    assert "gate failed" in err and "sft-bias" in folded and "align gate override" in err
    assert "sft: bias gate FAIL" in err  # the verdict said as the gate ends, as a stage says its own
    assert not (run / "preferences").exists()  # stopped before the next stage
    assert "Run: FAIL" in (run / "report.html").read_text()
    gate_html = (run / "gates" / "sft-bias" / "gate.html").read_text()
    assert "Bias gate: FAIL" in gate_html and "above the ceiling 0.01" in gate_html

    # issue 34 B7: gate.json edited into a pass does not promote: the run notices and runs the gate again
    record = run / "gates" / "sft-bias" / "gate.json"
    data = json.loads(record.read_text())
    data["reasons"], data["verdict"] = [], "pass"
    for c in data["checks"]:
        c["passed"] = True
    record.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["report", str(run)]) == 0 and "Run: FAIL" in (run / "report.html").read_text()
    assert main(["run", "--config", str(p)]) == 1
    assert "changed after this run recorded it" in capsys.readouterr().err.replace("\n", "")
    assert not (run / "preferences").exists()

    assert main(["gate", "override", str(run / "gates" / "sft-bias"), "--reviewer", "R. Chen", "--reason", "probe ceiling set too low for this run"]) == 0  # fmt: skip
    assert main(["run", "--config", str(p)]) == 0
    assert (run / "preferences" / "manifest.json").exists()
    assert "OVERRIDDEN by R. Chen" in (run / "gates" / "sft-bias" / "gate.html").read_text()
    sft = json.loads((run / "sft" / "manifest.json").read_text())
    assert sft["overrides"][0]["reviewer"] == "R. Chen" and "too low" in sft["overrides"][0]["reason"]
    card = (run / "sft" / "README.md").read_text()
    assert "| `bias` | `align run` | **FAIL** |" in card and "overridden by `R. Chen`" in card
    assert "PASS WITH OVERRIDES" in (run / "report.html").read_text()


def test_interrupted_stage_resumes_and_a_changed_parent_reruns_its_children(tmp_path, capsys):
    run = tmp_path / "run"
    dpo = {**_dpo(), "gates": {}}  # DPO is here as SFT's child; its bias gate is the other tests' subject
    paused = _pipeline(run, data=DATA, sft=_sft(**{"train.stop_after_steps": 1, "train.save_steps": 1}), preferences=PREFS, dpo=dpo)  # fmt: skip
    assert main(["run", "--config", str(_write(tmp_path / "a.yaml", paused))]) == 3  # paused
    assert json.loads((run / "sft" / "manifest.json").read_text())["status"] == "running"
    capsys.readouterr()
    whole = _pipeline(run, data=DATA, sft=_sft(**{"train.save_steps": 1}), preferences=PREFS, dpo=dpo)
    assert main(["run", "--config", str(_write(tmp_path / "b.yaml", whole))]) == 0
    assert "sft (resuming)" in capsys.readouterr().err
    before = _finished(run)

    relearned = _pipeline(run, data=DATA, sft=_sft(**{"train.save_steps": 1, "train.learning_rate": 1e-3}), preferences=PREFS, dpo=dpo)  # fmt: skip
    assert main(["run", "--config", str(_write(tmp_path / "c.yaml", relearned))]) == 0
    after = _finished(run)
    assert {k for k in before if after[k] != before[k]} == {"sft", "dpo"}  # data and preferences kept


def test_annotation_round_pauses_the_run_until_people_have_ranked_then_feeds_preferences(tmp_path, capsys):
    """RLHF's loop in `align run`: sample the policy, stop (exit 3) with the commands that collect judgments, and go
    on when they exist, with the judgments in the preferences stage. A prompt judged by a person (here through
    the server's desk) is the only data preferences gets beside the configured file."""
    from align.annotate import Desk
    from data_schemas.config import SessionSettings
    from data_schemas.rankings import Submission

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt_id": f"q{i}", "prompt": f"Say {i}."}) + "\n" for i in range(2))
    )
    annotate = {
        "policy": "tiny-random-llama",
        "prompts": str(prompts),
        "options": {"k": 2, "max_new_tokens": 6, "engine": "generate"},
    }
    run = tmp_path / "run"
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump(_pipeline(run, annotate=annotate, preferences=PREFS)))
    assert main(["run", "--config", str(cfg)]) == 3
    err = capsys.readouterr().err
    assert "0 of 2 judgments" in " ".join(err.split())
    # the commands to copy stay whole on their lines, however long the path (no wrapping inside it)
    assert f"  align annotate serve --dir {run / 'annotate'} " in err.splitlines()[-1]
    assert not (run / "preferences").exists()

    d = run / "annotate"
    desk = Desk(d, SessionSettings.model_validate_json((d / "session.json").read_text()))
    assert len(desk.samples) == 2 and all(len(s["responses"]) == 2 for s in desk.samples)
    for _ in desk.samples:
        desk.submit("ann-1", Submission(prompt_id=desk.next_for("ann-1")["prompt_id"], ranking=["r2", "r1"]))
    assert main(["run", "--config", str(cfg)]) == 0
    assert "annotate: 2 judgments" in " ".join(capsys.readouterr().err.split())
    inputs = json.loads((run / "preferences" / "manifest.json").read_text())["inputs"]
    assert any(i["path"].endswith("annotate/rankings.jsonl") for i in inputs)
    assert main(["run", "--config", str(cfg)]) == 0  # nothing new: everything up to date, no new sampling
    assert "(sampling" not in capsys.readouterr().err
    # other prompts: a new round (the old one kept aside), and the run waits for its judgments
    prompts.write_text(json.dumps({"prompt_id": "q9", "prompt": "Say 9."}) + "\n")
    assert main(["run", "--config", str(cfg)]) == 3
    said = " ".join(capsys.readouterr().err.split())
    assert "previous round is in" in said and "0 of 1 judgments" in said
    (kept,) = (run / ".superseded").glob("annotate-*")
    assert len((kept / "rankings.jsonl").read_text().splitlines()) == 2


def test_a_base_model_with_other_weights_is_another_run(tmp_path, monkeypatch):
    """Issue 34 B9: the base folder's weights multiplied by 3 and `align run` said "sft: up to date". The stage key
    (and the manifest key) now include the weights' sha256, hashed once per (file, size, mtime)."""
    import torch
    from safetensors.torch import save_file

    import core.models
    from align.pipeline import stage_key
    from core.config import load_config
    from data_schemas.config import SFTConfig

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "base"
    model.mkdir()
    (model / "config.json").write_text("{}")
    save_file({"w": torch.ones(4)}, str(model / "model.safetensors"))
    cfg = load_config(
        SFTConfig, "configs/sft.yaml", [f"model.name_or_path={model}", f"output_dir={tmp_path / 'o'}"]
    )
    before = stage_key(cfg, tmp_path)
    reads = []
    real = core.models.sha256_path
    monkeypatch.setattr(core.models, "sha256_path", lambda p: reads.append(p) or real(p))
    assert stage_key(cfg, tmp_path) == before and reads == []  # remembered by size and mtime: not read again
    save_file({"w": 3 * torch.ones(4)}, str(model / "model.safetensors"))
    assert stage_key(cfg, tmp_path) != before and len(reads) == 1


def test_a_second_align_run_on_one_run_directory_is_refused(tmp_path, capsys):
    """Issue 34 B6: a second `align run` moved the first run's live SFT folder aside and finished."""
    from core.stage import run_lock

    run = tmp_path / "run"
    p = _write(tmp_path / "p.yaml", _pipeline(run, data=DATA))
    held = run_lock(run, "run directory")  # the first run, still going
    try:
        assert main(["run", "--config", str(p)]) == 2
        assert "another align process is using this run directory" in capsys.readouterr().err.replace(
            "\n", ""
        )
        assert not (run / "data").exists()
    finally:
        held.release()
