"""The real SmolLM2-135M-Instruct: a few SFT steps on human-written self-instruct tasks lower validation
perplexity, through the real CLI, and the perplexity gate agrees."""

import json
import math

import pytest
import torch

from align.cli import main
from tests.conftest import export_matches_align, shared_file


@pytest.mark.real_model
def test_sft_lowers_validation_perplexity_on_self_instruct(tmp_path, real_sft):
    """The artifact is the shared `real_sft` (tests/conftest.py: 6 steps on the self-instruct tasks, 15% held out,
    max length 256, learning rate 3e-4); the DPO and PPO real-model tests build on it."""
    out, code = real_sft
    assert code == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["model"]["name"] == "smollm2-135m-instruct"
    assert m["counts"]["train_file"]["rows_read"] == 175

    # evaluate on the held-out split the stage used: rebuild it the same way
    from core.config import load_config
    from core.readers import load_instructions
    from data_schemas.config import SFTConfig
    from stages.sft import split_train_validation

    cfg = load_config(SFTConfig, out / "config.yaml")
    convs, _ = load_instructions(cfg.data.train_file)
    _, val = split_train_validation(convs, cfg.data.validation_fraction, cfg.train.seed)
    val_file = tmp_path / "val.jsonl"
    val_file.write_text(
        "".join(json.dumps({"messages": [x.model_dump() for x in c.messages]}) + "\n" for c in val)
    )
    gate_dir = tmp_path / "gate"
    code = main(
        [
            "eval",
            "gate",
            "perplexity",
            "--candidate",
            str(out),
            "--parent",
            "smollm2-135m-instruct",
            "--data",
            str(val_file),
            "--out",
            str(gate_dir),
            "--config",
            "configs/gates.yaml",
            "perplexity.max_length=256",
        ]
    )
    g = json.loads((gate_dir / "gate.json").read_text())
    # examples whose answer is cut away entirely at max_length have no scored token and are not counted
    assert 20 <= g["metrics"]["candidate"]["examples"] <= len(val)
    assert g["metrics"]["candidate"]["perplexity"] < g["metrics"]["parent"]["perplexity"]
    assert code == 0 and g["verdict"] == "pass"
    export_matches_align(out, tmp_path / "export")  # plain transformers computes align's logits


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize(
    "setting",
    ["peft.method=ia3", "peft.method=adalora", "peft.method=prompt_tuning peft.prompt_init_text=Answer_helpfully",
     "peft.method=p_tuning", "peft.method=prefix_tuning", "lora.enabled=false partial.trainable=top_blocks partial.top_blocks=2",
     "lora.enabled=false partial.trainable=layernorm"],
)  # fmt: skip
def test_each_fine_tuning_method_trains_the_real_model(tmp_path, setting):
    """Four steps of each method on the real model and the real data: it completes, the validation loss is finite,
    and (partial) only the selected weights moved."""
    data = shared_file("self_instruct_seed_tasks.jsonl")
    out = tmp_path / "sft"
    args = ["sft", "--config", "configs/sft.yaml", f"output_dir={out}", f"data.train_file={data}",
            "data.validation_file=null", "data.validation_fraction=0.15", "data.max_length=256", "train.max_steps=4",
            "train.eval_steps=4", "train.save_steps=4", "train.early_stopping_patience=null", *setting.split()]  # fmt: skip
    assert main(args) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and math.isfinite(m["metrics"]["eval_loss"])
    if "partial" in setting:
        from safetensors.torch import load_file

        from core.models import resolve_model_path

        before = load_file(str(resolve_model_path("smollm2-135m-instruct") / "model.safetensors"))
        after = load_file(str(out / "model" / "model.safetensors"))
        moved = {k for k in after if not torch.equal(before[k], after[k])}
        if "top_blocks" in setting:  # 30 blocks: 28 and 29 (and the norm, and the tied head) only
            assert moved and all(
                ".layers.28." in k or ".layers.29." in k or "norm" in k or "embed" in k for k in moved
            )
        else:
            assert moved and all("norm" in k for k in moved)
