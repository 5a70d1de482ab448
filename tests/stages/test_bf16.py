"""Every stage trains and writes a complete artifact in bf16: the precision CUDA machines get by default.

CI has no GPU, but bf16 runs on the CPU (emulated, slow, fine for the tiny model), and the dtype bugs a GPU run
would hit are the same: a reward head applied in bf16 to the fp32 hidden states that accelerate's mixed precision
returns failed on an H100 ("expected mat1 and mat2 to have the same dtype") before this test existed.
"""

from __future__ import annotations

import json

import torch

from align.cli import main
from tests.stages.test_dpo import _pairs_file, dpo
from tests.stages.test_dpo import sft as sft  # noqa: F401 (module fixture: a tiny SFT artifact)
from tests.stages.test_ppo import _ppo
from tests.stages.test_reward_cli import prefs as prefs  # noqa: F401 (module fixture: preferences)
from tests.stages.test_reward_cli import reward

BF16 = "precision=bf16"


def _complete(out) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete", m
    return m


def test_reward_trains_and_scores_in_bf16(tmp_path, prefs):
    out = tmp_path / "rm"
    assert reward(out, prefs, "train.max_steps=2", "gate.min_accuracy=0", BF16) in (0, 1)
    m = _complete(out)
    assert m["metrics"]["pairs"] > 0 and torch.isfinite(torch.tensor(m["metrics"]["accuracy"]))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "Say hi.", "response": "Hello!"}) + "\n")
    assert (
        main(["score", "--reward", str(out), "--input", str(rows), "--out", str(tmp_path / "s.jsonl")]) == 0
    )
    assert all(
        isinstance(json.loads(x)["reward"], float) for x in (tmp_path / "s.jsonl").read_text().splitlines()
    )


def test_dpo_and_ppo_train_in_bf16(tmp_path, sft):  # noqa: F811
    _pairs_file(tmp_path / "pairs.jsonl", n=16)
    assert dpo(tmp_path / "dpo", sft, tmp_path / "pairs.jsonl", "train.max_steps=2", BF16) in (0, 1)
    _complete(tmp_path / "dpo")
    args = ["train.steps=1", "train.rollout_batch_size=4", "train.mini_batch_size=4", BF16]
    assert _ppo(tmp_path / "ppo", sft, *args) in (0, 1)
    _complete(tmp_path / "ppo")
