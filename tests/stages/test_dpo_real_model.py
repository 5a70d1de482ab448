"""DPO on the real SmolLM2-135M-Instruct with HH-RLHF pairs: a few steps move the held-out implicit reward the right
way (loss below its starting ln 2, positive mean margin), and the perplexity gate runs against the SFT parent."""

import json
import math

import pytest

from align.cli import main
from tests.conftest import shared_file


@pytest.mark.real_model
def test_dpo_real_model_hh_rlhf(tmp_path, real_sft):
    hh = shared_file("hh_rlhf_harmless_test_1000.jsonl")
    assert (
        main(["data", "import-rankings", "--from", "hh-rlhf", str(hh), "--out", str(tmp_path / "hh.jsonl")])
        == 0
    )
    assert (
        main(
            [
                "data",
                "build-preferences",
                str(tmp_path / "hh.jsonl"),
                "--out",
                str(tmp_path / "prefs"),
                "--set",
                "validation_fraction=0.1",
            ]
        )
        == 0
    )
    sft = real_sft
    out = tmp_path / "dpo"
    code = main(
        [
            "dpo",
            "--config",
            "configs/dpo.yaml",
            f"output_dir={out}",
            f"init_from={sft}",
            f"data.preferences_dir={tmp_path / 'prefs'}",
            "data.max_length=192",
            "data.max_prompt_length=96",
            "data.max_pairs=128",
            "train.max_steps=16",
            "train.learning_rate=2e-4",
            "train.beta=0.1",
            "train.per_device_train_batch_size=8",
            "train.eval_steps=100",
            "train.save_steps=100",
            "eval.prompts=2",
            "eval.max_new_tokens=16",
        ]
    )
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete"
    # At step 0 the policy is the reference: every implicit reward is 0, the held-out DPO loss is exactly ln 2 and
    # the accuracy (chosen strictly above rejected) is 0. On HH-RLHF a 135M model learns slowly (16 steps of 8 pairs
    # here); the held-out loss falling below ln 2 with a positive mean margin is the signal, accuracy is coarse.
    assert m["metrics"]["heldout_loss"] < math.log(
        2
    )  # measured 0.6908 (accuracy 0.503) on 102 held-out pairs
    assert m["metrics"]["heldout_rewards_margins"] > 0
    assert m["metrics"]["heldout_rewards_accuracies"] >= 0.5
    assert m["gates"][0]["gate"] == "perplexity" and code in (0, 1)
