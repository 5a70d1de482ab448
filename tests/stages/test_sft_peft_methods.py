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


# ----------------------------------------------------------------------------------------------------------
# Virtual tokens: prompt tuning, P-tuning, prefix tuning
# ----------------------------------------------------------------------------------------------------------
INIT_TEXT = "Answer the question helpfully."


@pytest.fixture(scope="module")
def virtual(tmp_path_factory, tiny_model_path):
    """One short SFT run of each virtual-token method (8 tokens)."""
    root = tmp_path_factory.mktemp("virtual")
    for method in ("prompt_tuning", "p_tuning", "prefix_tuning"):
        extra = [f"peft.prompt_init_text={INIT_TEXT}"] if method == "prompt_tuning" else []
        assert _sft(root / method, f"peft.method={method}", "peft.num_virtual_tokens=8", *extra) == 0
    return root


@pytest.mark.parametrize(
    "method, peft_type, width",
    [("prompt_tuning", "PROMPT_TUNING", 128), ("p_tuning", "P_TUNING", 128), ("prefix_tuning", "PREFIX_TUNING", 256)],
)  # fmt: skip
def test_virtual_token_methods_train_their_tokens_only(virtual, tiny_model_path, method, peft_type, width):
    out = virtual / method
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == peft_type and cfg["num_virtual_tokens"] == 8
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    # width: hidden (128) for the input embeddings; prefix tuning: 2 layers x (key, value) x 1 kv head x 64
    assert list(weights) == ["prompt_embeddings"] and weights["prompt_embeddings"].shape == (8, width)
    assert not (out / "model").exists() and not (out / "merged").exists()
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["metrics"]["eval_loss"] > 0
    if method == "prompt_tuning":  # started from the init text's embeddings (repeated to 8), and moved
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tiny_model_path)
        ids = tok(INIT_TEXT, add_special_tokens=False)["input_ids"]
        ids = (ids * 8)[:8]
        emb = load_file(str(tiny_model_path / "model.safetensors"))["model.embed_tokens.weight"][ids]
        delta = (weights["prompt_embeddings"] - emb).abs()
        assert 0 < float(delta.max()) < 1.0  # near its start (lr 1e-2, 4 steps), not equal to it


def test_gate_scores_see_the_virtual_tokens(virtual, tiny_model_path):
    """The perplexity and bias scorers read the input's own positions of a prompt-tuned model (whose logits are 8
    longer) and never reuse a context cache built without the virtual tokens: their scores equal a hand-built
    forward with the learned embeddings prepended to the input embeddings."""
    from core.models import load_for_eval
    from eval.bias import score_rows
    from eval.perplexity import sequence_nll
    from lib.logprobs import token_logprobs

    model, tok, _ = load_for_eval(str(virtual / "prompt_tuning"), merge=True)  # cannot merge: stays virtual
    prompt = load_file(str(virtual / "prompt_tuning" / "adapter" / "adapter_model.safetensors"))[
        "prompt_embeddings"
    ]
    base = model.get_base_model()

    def by_hand(ids: list[int]) -> torch.Tensor:  # log p(token t | virtual tokens, tokens < t), t >= 1
        x = torch.tensor([ids])
        emb = torch.cat([prompt[None], base.get_input_embeddings()(x)], dim=1)
        logits = base(inputs_embeds=emb).logits[:, 8:]
        return token_logprobs(logits[:, :-1], x[:, 1:])[0]

    ctx = tok("The nurse said that", add_special_tokens=False)["input_ids"]
    conts = [
        tok(c, add_special_tokens=False)["input_ids"] for c in (" she was tired.", " he was tired today.")
    ]
    rows = [(ctx, c) for c in conts]  # a shared context: the cached path for plain models
    sums, counts = score_rows(model, tok, rows)
    for (c, cont), s, n in zip(rows, sums, counts, strict=True):
        lp = by_hand(c + cont)
        assert n == len(cont) and s == pytest.approx(float(lp[len(c) - 1 :].sum()), abs=1e-4)

    seq = ctx + conts[1]
    nll, k = sequence_nll(model, [{"input_ids": seq, "labels": seq}], 2, tok.pad_token_id)
    assert k == [len(seq) - 1] and nll[0] == pytest.approx(-float(by_hand(seq).sum()), abs=1e-4)


def test_policy_stages_refuse_a_virtual_token_sft_artifact(virtual):
    from core.config import UserError
    from lib.artifacts import resolve_start

    with pytest.raises(UserError, match="virtual tokens.*peft.method lora"):
        resolve_start(virtual / "p_tuning")


def test_virtual_token_settings_that_cannot_work_are_refused(tmp_path, capsys):
    base = ["sft", "--config", "configs/sft.yaml", f"output_dir={tmp_path / 'v'}", *BASE]
    assert main([*base, "peft.method=prompt_tuning", "merge_adapter=true"]) == 2
    assert "cannot be folded into the model" in capsys.readouterr().err
    assert main([*base, "peft.method=prefix_tuning", "train.gradient_checkpointing=true"]) == 2
    assert "train.gradient_checkpointing=false" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_plan_counts_what_peft_trains(tiny_model_path, method):
    """align plan's trainable count of each virtual-token method equals PEFT's own."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from core.models import peft_config
    from core.plan import virtual_trainable
    from data_schemas.config import LoraSettings, PeftSettings

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    peft = get_peft_model(
        model, peft_config(LoraSettings(), PeftSettings(method=method, num_virtual_tokens=12))
    )
    assert virtual_trainable(model.config, method, 12) == peft.get_nb_trainable_parameters()[0]


def test_adalora_pruned_ranks_save_and_load_back_exactly(tmp_path, tiny_model_path):
    """After AdaLoRA has pruned ranks (some to zero), the saved adapter loads back to the same function, and merges
    to it: PEFT warns that the rank pattern's keys 'did not match' and that zero-size tensors look unsharded;
    both warnings are spurious for this path, and this is the check."""
    from peft import PeftModel, get_peft_model

    from core.models import load_causal_lm, peft_config
    from data_schemas.config import LoraSettings, ModelConfig, PeftSettings

    cfg = ModelConfig(name_or_path="tiny-random-llama")
    torch.manual_seed(0)
    model = get_peft_model(
        load_causal_lm(cfg, "fp32"),
        peft_config(LoraSettings(r=8), PeftSettings(method="adalora"), total_steps=20),
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 1000, (2, 16))
    for step in range(20):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
    model.eval()
    model.save_pretrained(tmp_path)
    ranks = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    assert ranks and min(sum(v) for v in ranks.values()) < 12  # pruned below the starting rank (8 * 3 // 2)
    loaded = PeftModel.from_pretrained(load_causal_lm(cfg, "fp32"), tmp_path).eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        # not bit for bit: the pruned ranks load at their smaller size, so the products have other shapes and round
        # differently on some CPUs (4.8e-7 on an AVX512-BF16 machine); a wrong load moves logits by far more
        assert torch.allclose(loaded(input_ids=ids).logits, want, atol=1e-5)
        assert torch.allclose(loaded.merge_and_unload()(input_ids=ids).logits, want, atol=1e-5)
        assert (
            load_causal_lm(cfg, "fp32")(input_ids=ids).logits - want
        ).abs().max() > 1e-2  # the adapter matters
