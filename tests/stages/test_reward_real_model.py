"""The real SmolLM2-135M-Instruct as a reward model: a few K-wise steps on OpenAssistant rankings run end to end,
the gate is evaluated on held-out groups (it may fail after so few steps: the check is that it is computed and
recorded), and the scorer serves the artifact."""

import json

import pytest

from align.cli import main
from tests.conftest import export_matches_align, hh_preferences


@pytest.mark.real_model
def test_reward_real_model_oasst(tmp_path, real_reward):
    out, code = real_reward
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["model"]["name"] == "smollm2-135m-instruct"
    assert m["metrics"]["pairs"] >= 10 and 0.0 <= m["metrics"]["accuracy"] <= 1.0
    assert m["gates"][0]["verdict"] in ("pass", "fail") and code == (
        0 if m["gates"][0]["verdict"] == "pass" else 1
    )
    src = tmp_path / "rows.jsonl"
    src.write_text(
        json.dumps({"prompt": "How do I boil an egg?", "response": "Simmer it for 9 minutes."}) + "\n"
    )
    assert (
        main(["score", "--reward", str(out), "--input", str(src), "--out", str(tmp_path / "scored.jsonl")])
        == 0
    )
    assert isinstance(json.loads((tmp_path / "scored.jsonl").read_text())["reward"], float)
    # exported: AutoModelForSequenceClassification scores what align scores (before: -1.513 where align -1.021)
    meta = export_matches_align(out, tmp_path / "export")
    assert meta["pipeline_tag"] == "text-classification"


@pytest.mark.slow
@pytest.mark.real_model
def test_reward_real_model_learns_hh_rlhf_preferences(tmp_path):
    """The real model trained on HH-RLHF pairs ranks held-out pairs better than chance and than length alone, and
    passes its gate. Measured: accuracy 0.570 vs length baseline 0.365 on 100 held-out pairs after 24 steps
    (3.5 min on 2 cores; slow-marked for the default run's time budget)."""
    prefs = hh_preferences(tmp_path, 0.2)
    out = tmp_path / "reward"
    code = main(
        ["reward", "--config", "configs/reward.yaml", f"output_dir={out}", f"data.preferences_dir={prefs}",
         "data.max_length=128", "data.max_eval_groups=100", "train.max_steps=24", "train.groups_per_batch=4",
         "train.eval_steps=1000", "train.save_steps=1000", "train.report_to=[none]", "gate.min_pairs=50"]
    )  # fmt: skip
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    assert m["pairs"] == 100 and m["accuracy"] >= 0.55 and m["accuracy"] > m["length_baseline_accuracy"] + 0.1
    assert code == 0
