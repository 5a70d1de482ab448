"""Checkpoints under faults (issue 34, B1 and B2), with a constant learning rate so that an extra optimizer step
would show in the weights (the default cosine schedule ends at 0 and hid it):

- a process killed while the Trainer writes a checkpoint leaves a folder without trainer_state.json; `--resume`
  set it aside and continues from the last whole one (it failed with FileNotFoundError and marked the artifact
  failed, `--force` too);
- a process killed after training finished (in its gate, or while its adapter is swapped in) resumes to exactly
  max_steps: the last checkpoint is loaded, not trained from (transformers took step 13 of 12)."""

from __future__ import annotations

import json

from align.cli import main
from tests.conftest import EXAMPLES
from tests.faults.test_kill9 import killed_at, manifest, same_weights
from tests.stages.test_reward_cli import _ranking_file

CONSTANT = ["train.lr_scheduler_type=constant", "train.warmup_ratio=0", "train.report_to=[none]"]
SFT = ["sft", "--config", "configs/sft.yaml", "model.name_or_path=tiny-random-llama",
       f"data.train_file={EXAMPLES / 'instructions_train.jsonl'}", "train.max_steps=5", "train.save_steps=2",
       "train.learning_rate=3e-3", "train.early_stopping_patience=null", *CONSTANT]  # fmt: skip


def test_sft_killed_while_writing_a_checkpoint_resumes_from_the_last_whole_one(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "sft"
    assert main([*SFT, f"output_dir={ref}"]) == 0
    # killed writing checkpoint-4: its weights are on disk, its optimizer and trainer_state.json are not
    killed_at(
        "transformers.trainer:Trainer._save_optimizer_and_scheduler", 2, "before", [*SFT, f"output_dir={out}"]
    )
    assert not (out / "checkpoints" / "checkpoint-4" / "trainer_state.json").exists()
    assert main([*SFT, f"output_dir={out}", "--resume"]) == 0
    m = manifest(out)
    assert m["status"] == "complete" and m["metrics"]["global_step"] == 5
    same_weights(out / "adapter", ref / "adapter")
    assert (
        out / "checkpoints" / ".incomplete-checkpoint-4"
    ).is_dir()  # kept aside for inspection, never read


def test_sft_killed_after_training_resumes_to_max_steps_exactly(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "sft"
    assert main([*SFT, f"output_dir={ref}"]) == 0
    killed_at("pathlib:Path.rename", 1, "before", [*SFT, f"output_dir={out}"], needle="adapter")
    assert main([*SFT, f"output_dir={out}", "--resume"]) == 0
    m = manifest(out)
    assert m["status"] == "complete" and m["metrics"]["global_step"] == 5  # was 6 of 5
    same_weights(out / "adapter", ref / "adapter")
    assert m["metrics"]["train_loss"] == manifest(ref)["metrics"]["train_loss"]


def test_reward_killed_in_its_gate_resumes_without_an_extra_step(tmp_path):
    _ranking_file(tmp_path / "r.jsonl", n=40)
    prefs = tmp_path / "prefs"
    assert main(["data", "build-preferences", str(tmp_path / "r.jsonl"), "--out", str(prefs),
                 "--set", "validation_fraction=0.25"]) == 0  # fmt: skip
    args = ["reward", "--config", "configs/reward.yaml", "model.name_or_path=tiny-random-llama",
            f"data.preferences_dir={prefs}", "train.learning_rate=3e-3", "train.groups_per_batch=4",
            "train.max_steps=6", "train.save_steps=3", "train.eval_steps=100", "gate.min_pairs=2",
            "gate.min_accuracy=0", *CONSTANT]  # fmt: skip
    ref, out = tmp_path / "ref", tmp_path / "reward"
    assert main([*args, f"output_dir={ref}"]) in (0, 1)
    killed_at("eval.gates:run_gate", 1, "before", [*args, f"output_dir={out}"])
    assert manifest(out)["status"] == "running"
    assert main([*args, f"output_dir={out}", "--resume"]) in (0, 1)
    m = manifest(out)
    assert (
        m["status"] == "complete" and m["metrics"]["global_step"] == 6
    )  # was 7 of 6, the weights moved by 3e-3
    same_weights(out / "adapter", ref / "adapter")
    state = json.loads((out / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
