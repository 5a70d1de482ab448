"""core/zero3.py: the DeepSpeed config filled for align's own loop, and the checkpoint written one weight at a time
(here on an unpartitioned model in one process; tests/stages/test_ppo_sharded.py runs it partitioned in two)."""

import json

import pytest
import torch

from core import zero3
from core.config import UserError
from tests.conftest import ROOT

ZERO3 = ROOT / "configs" / "deepspeed" / "zero3.json"


def test_auto_values_are_filled_from_the_stage_settings():
    cfg = zero3.config(ZERO3, micro_batch=4, world=2, max_grad_norm=0.5, precision="bf16", hidden=64)
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["train_batch_size"] == 8
    assert cfg["gradient_accumulation_steps"] == 1 and cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    z = cfg["zero_optimization"]
    assert (
        z["stage"] == 3
        and z["reduce_bucket_size"] == 64 * 64
        and z["stage3_param_persistence_threshold"] == 640
    )
    assert zero3.stage_of(cfg) == 3
    assert not [k for k, v in zero3._flat(cfg) if v == "auto"]


def test_a_value_set_by_the_user_is_kept(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": 1000}, "gradient_clipping": 2.0})
    )
    cfg = zero3.config(path, micro_batch=1, world=1, max_grad_norm=1.0, precision="fp32", hidden=8)
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 1000 and cfg["gradient_clipping"] == 2.0


@pytest.mark.parametrize(
    "text, said",
    [
        (
            '{"zero_optimization": {"stage": 3}, "optimizer": {"params": {"lr": "auto"}}}',
            "optimizer.params.lr='auto'",
        ),
        ("{not json", "not a readable JSON file"),
        ("[1, 2]", "a JSON object"),
    ],
)
def test_what_cannot_be_used_is_one_sentence(tmp_path, text, said):
    path = tmp_path / "ds.json"
    path.write_text(text)
    with pytest.raises(UserError, match="train.deepspeed=") as e:
        zero3.config(path, micro_batch=1, world=1, max_grad_norm=1.0, precision="fp32", hidden=8)
    assert said in str(e.value)


def test_the_consolidated_checkpoint_is_the_model_in_files_of_bounded_size(tmp_path, tiny_model_path):
    """Files of at most shard_bytes each (bar one weight larger than that), an index over them, the tied head stored
    once, and plain transformers loads back the same weights."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # not the checkpoint's values
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    shard = 64 * 1024
    zero3.save_consolidated(model, tmp_path / "out", tokenizer, shard_bytes=shard)
    files = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(files) > 1
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f.name for f in files]
    for f in files:
        with safe_open(f, "pt") as fh:
            sizes = [fh.get_slice(k).get_shape() for k in fh.keys()]  # noqa: SIM118
        largest = max(torch.Size(s).numel() for s in sizes) * 4
        assert (
            f.stat().st_size <= shard + largest + 16 * 1024
        )  # one weight may cross the bound (header aside)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert ("lm_head.weight" in index["weight_map"]) != tied
    assert (tmp_path / "out" / "tokenizer_config.json").exists()
    assert not (tmp_path / "out.zero3").exists()


def test_one_file_is_named_as_transformers_looks_for_it_first(tmp_path, tiny_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    zero3.save_consolidated(model, tmp_path / "out")
    assert [f.name for f in (tmp_path / "out").glob("*.safetensors")] == ["model.safetensors"]
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
