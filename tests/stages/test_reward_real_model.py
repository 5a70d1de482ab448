"""The real SmolLM2-135M-Instruct as a reward model: a few K-wise steps on OpenAssistant rankings run end to end,
the gate is evaluated on held-out groups (it may fail after so few steps: the check is that it is computed and
recorded), and the scorer serves the artifact."""

import json

import pytest

from align.cli import main
from tests.conftest import shared_file


@pytest.mark.real_model
def test_reward_real_model_oasst(tmp_path):
    oa = shared_file("oasst_en_trees_60.jsonl")
    assert (
        main(["data", "import-rankings", "--from", "oasst", str(oa), "--out", str(tmp_path / "oa.jsonl")])
        == 0
    )
    assert (
        main(
            [
                "data",
                "build-preferences",
                str(tmp_path / "oa.jsonl"),
                "--out",
                str(tmp_path / "prefs"),
                "--set",
                "validation_fraction=0.2",
            ]
        )
        == 0
    )
    out = tmp_path / "reward"
    code = main(
        [
            "reward",
            "--config",
            "configs/reward.yaml",
            f"output_dir={out}",
            f"data.preferences_dir={tmp_path / 'prefs'}",
            "data.max_length=256",
            "data.max_eval_groups=12",
            "train.max_steps=3",
            "train.groups_per_batch=2",
            "train.eval_steps=100",
            "train.save_steps=100",
            "gate.min_pairs=10",
        ]
    )
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
