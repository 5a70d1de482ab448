"""The real SmolLM2-135M-Instruct as a reward model: a few K-wise steps on OpenAssistant rankings run end to end,
the gate is evaluated on held-out groups (it may fail after so few steps: the check is that it is computed and
recorded), and the scorer serves the artifact."""

import json

import pytest

from align.cli import main


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
