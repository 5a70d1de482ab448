"""core/sharded.py in two real processes (torchrun, gloo): FSDP2 built on the meta device, each process reading only
its shards from the checkpoint, against the same computations in one process with the whole model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from bench.harness import peaked_llama
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model_path):
    """A plain checkpoint folder whose MLP has 251 rows (gate and up projections): they do not split evenly across
    two processes, so the uneven last shard is exercised too; the head is tied to the embeddings."""
    return peaked_llama(
        tmp_path_factory.mktemp("sharded") / "ckpt",
        tiny_model_path,
        intermediate_size=251,
        num_hidden_layers=3,
    )


@pytest.fixture(scope="module")
def two(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded-run")
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "tests" / "core" / "sharded_worker.py"), str(checkpoint), str(out)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return out, [json.loads((out / f"rank-{k}.json").read_text()) for k in range(2)]


def test_each_process_holds_half_of_every_parameter(two, checkpoint):
    _, ranks = two
    whole = load_file(str(checkpoint / "model.safetensors"))
    for name, rows in ranks[0]["local_rows"].items():
        key = "model.embed_tokens.weight" if name == "lm_head.weight" else name
        n = whole[key].shape[0]
        assert rows == -(-n // 2) and ranks[1]["local_rows"][name] == n - rows  # torch.chunk's split
    assert "lm_head.weight" not in ranks[0]["local_rows"]  # tied: one parameter, sharded once


def test_sharded_load_computes_the_checkpoint(two, checkpoint):
    from transformers import AutoModelForCausalLM

    _, ranks = two
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [2, 4, 6, 8, 10, 12, 14, 16]])
    with torch.no_grad():
        want = model(input_ids=ids).logits[:, -1, :8]
    for r in ranks:
        assert torch.tensor(r["logits"]) == pytest.approx(want, abs=1e-5)


def test_a_sharded_adamw_step_equals_one_process_and_resume_equals_it(two, checkpoint):
    from transformers import AutoModelForCausalLM

    out, ranks = two
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [2, 4, 6, 8, 10, 12, 14, 16]])
    model(input_ids=ids, labels=ids).loss.backward()  # the global batch's mean: each process had half
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9))
    opt.step()
    assert ranks[0]["grad_norm"] == pytest.approx(norm, rel=1e-4) == ranks[1]["grad_norm"]
    stepped = load_file(str(out / "stepped" / "model.safetensors"))  # consolidated by the processes
    want = {k: v.detach() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert set(stepped) == set(want)
    for k, v in want.items():
        assert (stepped[k] - v).abs().max().item() < 1e-4, k
    # the folder is a plain checkpoint: transformers loads it, tied head included
    again = AutoModelForCausalLM.from_pretrained(out / "stepped", dtype=torch.float32)
    assert torch.equal(again.lm_head.weight, stepped["model.embed_tokens.weight"])
    resumed = load_file(str(out / "resumed" / "model.safetensors"))
    assert all(torch.equal(resumed[k], stepped[k]) for k in stepped)  # saved sharded, read back sharded
    assert len(list((out / "state").glob("*.distcp"))) == 2  # one file per process: nothing gathered
