"""core/models.py: loading a model for evaluation within a memory limit (offloaded: accelerate's big-model
inference reads the weights that do not fit from their files, a layer at a time), against loading it whole."""

import json
import subprocess
import sys

import pytest
import torch

from bench.harness import peaked_llama
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model_path):
    return peaked_llama(tmp_path_factory.mktemp("models") / "ckpt", tiny_model_path, num_hidden_layers=4)


def test_checkpoint_bytes_are_read_from_the_headers(checkpoint):
    from safetensors.torch import load_file

    from core.models import checkpoint_bytes

    numel = sum(t.numel() for t in load_file(str(checkpoint / "model.safetensors")).values())
    assert checkpoint_bytes(checkpoint, "fp32") == 4 * numel
    assert checkpoint_bytes(checkpoint, "bf16") == 2 * numel
    assert checkpoint_bytes("some-org/some-model", "fp32") is None  # a hub id: not known without loading


def test_a_model_over_the_limit_is_offloaded_and_computes_what_the_whole_model_computes(
    checkpoint, tokenizer
):
    from core.models import checkpoint_bytes, load_for_eval, resident_limit
    from lib.generation import GenerateEngine

    whole, _, said_whole = load_for_eval(str(checkpoint))
    with resident_limit(checkpoint_bytes(checkpoint, "fp32") / 3):
        part, _, said = load_for_eval(str(checkpoint))
    assert "offloaded: at most" in said and "offloaded" not in said_whole
    assert "disk" in set(part.hf_device_map.values())
    ids = torch.tensor([[1, 17, 4, 99, 23, 5, 8], [3, 3, 41, 7, 12, 2, 60]])
    with torch.no_grad():
        assert torch.equal(whole(ids).logits, part(ids).logits)
    prompts = [tokenizer.encode("Name a colour.")[:6], tokenizer.encode("Two plus two is")[:5]]
    assert GenerateEngine(part, tokenizer).generate(prompts, 8, 0.0, 1.0, 0) == GenerateEngine(
        whole, tokenizer
    ).generate(prompts, 8, 0.0, 1.0, 0)


def test_under_a_limit_only_part_of_the_weights_is_in_memory(tmp_path):
    """In a fresh process, a forward of a 12-layer random Llama (186M parameters, 0.69 GiB; its largest unit the
    0.19 GiB embedding) raises the peak resident set above what loading left by its whole weights when loaded whole
    (safetensors are mapped, read in by the forward), and by about its largest unit under a 0.1 GiB limit."""
    from bench.harness import random_llama
    from core.models import resolve_model_path

    folder = tmp_path / "m"
    params = random_llama(folder, resolve_model_path("tiny-random-llama"), 12)
    code = (
        "import json, sys, torch; from core import dist; from core.models import load_for_eval, resident_limit\n"
        "limit = float(sys.argv[2]) or None\n"
        "with resident_limit(limit): m, _, said = load_for_eval(sys.argv[1])\n"
        "loaded = dist.peak_memory_gib()\n"
        "with torch.no_grad(): m(torch.tensor([[1, 2, 3, 4]]))\n"
        "print(json.dumps({'rise': dist.peak_memory_gib() - loaded, 'said': said}))"
    )

    def forward_rise(limit: float) -> dict:
        out = subprocess.run([sys.executable, "-c", code, str(folder), str(limit)], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    weights = params * 4 / 2**30
    whole, part = forward_rise(0), forward_rise(0.1 * 2**30)
    assert "offloaded" in part["said"] and "offloaded" not in whole["said"]
    assert whole["rise"] > 0.9 * weights
    assert part["rise"] < 0.4 * weights


def test_the_limit_is_half_of_what_this_process_may_use_and_no_more_than_the_block_says(monkeypatch):
    import core.models
    from core.models import eval_resident_limit, resident_limit

    gib = 2**30
    monkeypatch.setattr(core.models, "capacity", lambda dev: 10 * gib)
    monkeypatch.setattr(core.models, "memory_cap", lambda: None)
    assert eval_resident_limit() == 5 * gib
    with resident_limit(2 * gib):
        assert eval_resident_limit() == 2 * gib
    with resident_limit(20 * gib):
        assert eval_resident_limit() == 5 * gib  # the block can lower the limit, never raise it
    monkeypatch.setattr(core.models, "memory_cap", lambda: 4 * gib)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert eval_resident_limit() == 1 * gib  # this process's share of its cgroup's cap, halved
    monkeypatch.setattr(core.models, "capacity", lambda dev: None)
    monkeypatch.setattr(core.models, "memory_cap", lambda: None)
    assert eval_resident_limit() is None


def test_a_run_whose_processes_hold_whole_models_gates_without_a_share(checkpoint):
    from core.models import training_share
    from data_schemas.config import ModelConfig

    assert training_share(ModelConfig(name_or_path=str(checkpoint)), "fp32", sharded=False) is None
    assert (
        training_share(ModelConfig(name_or_path=str(checkpoint)), "fp32", sharded=True) is None
    )  # one process


def test_a_fresh_lora_is_drawn_from_its_seed_alone(tiny_model_path):
    """init_lora: B zeros (the adapter starts as the identity), A Kaiming-uniform within PEFT's bound
    1/sqrt(in_features), the same for the same seed whatever was drawn before, another for another seed."""
    import math

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from core.models import init_lora, lora_config
    from data_schemas.config.common import LoraSettings

    def drawn(seed: int, noise: int) -> dict:
        torch.manual_seed(noise)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_model_path), lora_config(LoraSettings(r=4))
        )
        init_lora(model, seed)
        return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}

    a, b, c = drawn(3, 0), drawn(3, 1), drawn(4, 0)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if ".lora_A." in k)
    for k, v in a.items():
        if ".lora_B." in k:
            assert not v.any()
        else:
            assert 0 < v.abs().max() <= 1 / math.sqrt(v.shape[1])
