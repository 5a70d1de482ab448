"""PEFT methods in align sft: each trains only its own parameters; QLoRA without a GPU is one sentence."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from align.cli import main
from tests.stages.test_sft_cli import BASE


def _sft(out, *extra):
    args = ["sft", "--config", "configs/sft.yaml", f"output_dir={out}", *BASE, "train.max_steps=4",
            "train.learning_rate=1e-2", *extra]  # fmt: skip
    return main(args)


@pytest.mark.parametrize(
    "method, marker, peft_type",
    [("ia3", "ia3_l", "IA3"), ("adalora", "lora_", "ADALORA")],  # lora: tests/stages/test_sft_cli.py
)
def test_each_method_trains_its_adapter_only(tmp_path, tiny_model_path, method, marker, peft_type):
    out = tmp_path / method
    assert _sft(out, f"peft.method={method}") == 0
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == peft_type
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert weights and all(marker in k for k in weights), sorted(weights)[:4]
    assert any("lora_E" in k for k in weights) == (method == "adalora")  # AdaLoRA's SVD-form singular values
    assert not (out / "model").exists()  # the base weights are never written: they did not train
    if method == "ia3":  # IA3 starts at 1 (identity): training moved it
        assert any(not torch.allclose(v, torch.ones_like(v)) for v in weights.values())
    card = (out / "README.md").read_text()
    assert "peft" in card and method in card  # the model card names the method (config)


def test_qlora_without_a_gpu_is_refused_in_one_sentence(tmp_path, tiny_model_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: scripts/gpu_smoke.sh runs QLoRA")
    out = tmp_path / "q"
    assert _sft(out, "peft.method=qlora") == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "peft.method=lora" in err and "Traceback" not in err
    assert not (out / "manifest.json").exists()


def test_adalora_needs_max_steps(tmp_path, capsys):
    args = ["sft", "--config", "configs/sft.yaml", f"output_dir={tmp_path / 'a'}", *BASE, "train.max_steps=-1",
            "peft.method=adalora"]  # fmt: skip
    assert main(args) == 2
    assert "train.max_steps" in capsys.readouterr().err
