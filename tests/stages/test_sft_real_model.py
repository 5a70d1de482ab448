"""The real SmolLM2-135M-Instruct: a few SFT steps on human-written self-instruct tasks lower validation
perplexity, through the real CLI, and the perplexity gate agrees."""

import json

import pytest

from align.cli import main
from tests.conftest import shared_file


@pytest.mark.real_model
def test_sft_lowers_validation_perplexity_on_self_instruct(tmp_path):
    data = shared_file("self_instruct_seed_tasks.jsonl")
    out = tmp_path / "sft"
    code = main(
        [
            "sft",
            "--config",
            "configs/sft.yaml",
            f"output_dir={out}",
            f"data.train_file={data}",
            "data.validation_file=null",
            "data.validation_fraction=0.15",
            "data.max_length=256",
            "train.max_steps=6",
            "train.eval_steps=6",
            "train.save_steps=6",
            "train.learning_rate=3e-4",
            "train.warmup_ratio=0",
            "train.early_stopping_patience=null",
        ]
    )
    assert code == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["model"]["name"] == "smollm2-135m-instruct"
    assert m["counts"]["train_file"]["rows_read"] == 175

    # evaluate on the held-out split the stage used: rebuild it the same way
    from align.config import load_config
    from align.readers import load_instructions
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
