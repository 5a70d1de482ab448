"""Early stopping in every Trainer stage (train.early_stopping_patience): SFT, reward and DPO stop when their
held-out metric has not improved for `patience` evaluations, complete (not paused), keep the best weights and say
so in the manifest.

The plateau is made exact: full fine-tuning (SFT, reward) or a LoRA starting at zero (DPO) with a learning rate of
1e-12 cannot move fp32 weights by a representable amount, so every evaluation equals the first, none improves, and
the run must stop after the first evaluation plus `patience` more."""

from __future__ import annotations

import json

import pytest

from tests.stages.test_dpo import _pairs_file, dpo, sft  # noqa: F401 (sft: module fixture)
from tests.stages.test_reward_cli import prefs, reward  # noqa: F401 (prefs: module fixture)
from tests.stages.test_sft_cli import sft as run_sft

PLATEAU = ["train.learning_rate=1e-12", "train.eval_steps=1", "train.save_steps=1", "train.max_steps=12",
           "train.early_stopping_patience=2"]  # fmt: skip


def _stopped(out, metric: str) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete"
    x = m["metrics"]
    assert x["stopped_early"] is True and x["global_step"] == 3 < x["max_steps"] == 12  # evals at 1, 2, 3
    assert x["best_step"] == 1 and x[f"best_{metric}"] is not None  # ties never replace the first best
    return x


def test_sft_stops_early(tmp_path, tiny_model_path, capsys):
    out = tmp_path / "sft"
    assert run_sft(out, "lora.enabled=false", *PLATEAU) == 0
    _stopped(out, "loss")
    assert "stopped early at step 3 of 12" in " ".join(capsys.readouterr().err.split())


def test_reward_stops_early(tmp_path, prefs):  # noqa: F811
    out = tmp_path / "reward"
    assert reward(out, prefs, "lora.enabled=false", "gate.min_accuracy=0.0", *PLATEAU) == 0
    _stopped(out, "accuracy")  # reward watches held-out accuracy (greater is better)


def test_dpo_stops_early(tmp_path, sft):  # noqa: F811
    _pairs_file(tmp_path / "pairs.jsonl")
    out = tmp_path / "dpo"
    assert dpo(out, sft, tmp_path / "pairs.jsonl", *PLATEAU) == 0
    _stopped(out, "loss")


def test_no_early_stopping_without_patience(tmp_path, tiny_model_path):
    out = tmp_path / "sft"
    assert run_sft(out, "lora.enabled=false", *PLATEAU[:-1], "train.max_steps=4") == 0
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    assert m["global_step"] == 4 and "stopped_early" not in m


@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_patience_needs_held_out_data(stage):
    from core.config import UserError
    from data_schemas.config import TrainerSettings
    from lib.trainer import trainer_kwargs

    with pytest.raises(UserError, match="needs held-out data"):
        trainer_kwargs(
            TrainerSettings(early_stopping_patience=1), __import__("pathlib").Path("x"), "fp32", False, 1
        )
