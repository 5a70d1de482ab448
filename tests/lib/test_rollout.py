"""Rollout engines: vLLM's weights really follow the trainer's (greedy tokens and log-probs match after a sync and
differ from before it), and the vLLM and transformers-generate paths agree on greedy decoding."""

import pytest
import torch

from lib.rollout import GenerateEngine, merged_state_dict, vllm_available
from tests.stages.test_ppo import _lora_policy

pytestmark = pytest.mark.skipif(
    not vllm_available(), reason="vLLM is not installed (scripts/setup.sh installs it)"
)

PROMPTS = [[1, 504, 3060, 314, 260], [1, 11, 3456, 429], [1, 2095, 7, 88, 15, 904, 223]]


@pytest.fixture(scope="module")
def engine(tiny_model_path, tokenizer):
    from lib.rollout import VLLMEngine

    e = VLLMEngine(tiny_model_path, tokenizer, max_model_len=128, precision="fp32", seed=0)
    yield e
    e.close()
    assert e.llm is None
    e.close()  # closing twice is harmless


def _vllm_greedy_with_logprobs(engine, prompts, n):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(temperature=0.0, max_tokens=n, logprobs=0, ignore_eos=True)
    outs = engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    ids = [list(o.outputs[0].token_ids) for o in outs]
    lps = [
        [d[t].logprob for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)]
        for o in outs
    ]
    return ids, lps


@torch.no_grad()
def _trainer_logprobs(model, prompt, resp):
    full = torch.tensor([prompt + resp])
    logp = torch.log_softmax(model(full).logits[0, len(prompt) - 1 : -1].float(), -1)
    return logp.gather(-1, torch.tensor(resp)[:, None]).squeeze(-1)


def test_weight_sync_moves_vllm_to_the_trainers_weights(engine, tiny_model_path, tokenizer):
    policy = _lora_policy(tiny_model_path, seed=1)
    n = 12
    with policy.disable_adapter():
        base_greedy = GenerateEngine(policy, tokenizer).generate(PROMPTS, n, 0.0, 1.0, 0)
        engine.update_weights(merged_state_dict(policy))  # adapter disabled: the base weights
    before, _ = _vllm_greedy_with_logprobs(engine, PROMPTS, n)
    assert [b[: len(g)] for b, g in zip(before, base_greedy, strict=True)] == base_greedy

    engine.update_weights(merged_state_dict(policy))  # now with the LoRA merged in
    after, vllm_lps = _vllm_greedy_with_logprobs(engine, PROMPTS, n)
    assert after != before  # the update reached the engine
    trainer_greedy = GenerateEngine(policy, tokenizer).generate(PROMPTS, n, 0.0, 1.0, 0)
    assert [a[: len(g)] for a, g in zip(after, trainer_greedy, strict=True)] == trainer_greedy
    for p, a, lp in zip(PROMPTS, after, vllm_lps, strict=True):
        # fp32 on both sides; different kernels (vLLM's paged attention vs sdpa): agree to 1e-3 nats per token
        assert torch.allclose(_trainer_logprobs(policy, p, a), torch.tensor(lp), atol=1e-3)


def test_vllm_and_generate_agree_greedy(engine, tiny_model_path, tokenizer):
    policy = _lora_policy(tiny_model_path, seed=2)
    engine.update_weights(merged_state_dict(policy))
    v = engine.generate(PROMPTS, 10, 0.0, 1.0, 0)
    g = GenerateEngine(policy, tokenizer).generate(PROMPTS, 10, 0.0, 1.0, 0)
    assert v == g


def test_vllm_sampling_is_reproducible_by_seed(engine):
    a = engine.generate(PROMPTS, 8, 1.0, 1.0, seed=7)
    c = engine.generate(PROMPTS, 8, 1.0, 1.0, seed=8)
    assert a == engine.generate(
        PROMPTS, 8, 1.0, 1.0, seed=7
    )  # same seed, same rollouts (resume relies on it)
    assert a != c


def test_streamed_weights_are_the_merged_dict_and_the_base_leaves_the_adapter_out(tiny_model_path):
    from lib.rollout import merged_weights

    policy = _lora_policy(tiny_model_path, seed=3)
    streamed = merged_weights(policy)
    assert not isinstance(streamed, dict)  # a generator: one merged projection alive at a time
    as_dict = merged_state_dict(policy)
    pairs = list(streamed)
    assert [k for k, _ in pairs] == list(as_dict) and all(torch.equal(v, as_dict[k]) for k, v in pairs)
    with policy.disable_adapter():
        off = merged_state_dict(policy)  # the adapter disabled: the base weights
    base = dict(merged_weights(policy, merge=False))
    assert base.keys() == off.keys() and all(torch.equal(base[k], off[k]) for k in off)
    q = "model.layers.0.self_attn.q_proj.weight"  # a LoRA-touched weight: merged differs from the base
    assert not torch.equal(as_dict[q], base[q])


def test_adapter_sync_serves_the_policys_lora_through_vllm(tiny_model_path, tokenizer, tmp_path):
    """vLLM built for LoRA (rollout.weight_sync=adapter) is given the base weights once and then only the adapter
    (a PEFT folder, kilobytes): its greedy tokens and log-probs are the trained policy's, and after the adapter
    changes (a training step), vLLM serves the new one, not the one it loaded before."""
    from lib.rollout import EngineSpec, make_engine, save_adapter, sync

    policy = _lora_policy(tiny_model_path, seed=4)
    spec = EngineSpec(policy, tokenizer, tiny_model_path, 128, "fp32", 0, {"lora_rank": 4})
    engine = make_engine("vllm", "rollout.engine", spec)
    try:
        assert engine.adapter_sync and engine.lora is not None
        folder = save_adapter(policy, tmp_path / "a")
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}
        assert (folder / "adapter_model.safetensors").stat().st_size < 1_000_000  # the adapter, not the model
        n = 12
        got, lps = _vllm_greedy_with_logprobs_lora(engine, PROMPTS, n)
        want = GenerateEngine(policy, tokenizer).generate(PROMPTS, n, 0.0, 1.0, 0)
        assert [g[: len(w)] for g, w in zip(got, want, strict=True)] == want
        for p, a, lp in zip(PROMPTS, got, lps, strict=True):
            assert torch.allclose(_trainer_logprobs(policy, p, a), torch.tensor(lp), atol=1e-3)
        with policy.disable_adapter():
            base = GenerateEngine(policy, tokenizer).generate(PROMPTS, n, 0.0, 1.0, 0)
        assert want != base  # the adapter matters, so serving it is what made vLLM agree
        with torch.no_grad():  # a training step moves the LoRA
            for name, param in policy.named_parameters():
                if "lora_B" in name:
                    param.mul_(-1.0)
        sync(engine, policy)
        moved = engine.generate(PROMPTS, n, 0.0, 1.0, 0)
        assert moved == GenerateEngine(policy, tokenizer).generate(PROMPTS, n, 0.0, 1.0, 0) and moved != got
    finally:
        engine.close()
    assert not engine.adapter_folder.parent.exists()  # its folder goes with it


def _vllm_greedy_with_logprobs_lora(engine, prompts, n):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(temperature=0.0, max_tokens=n, logprobs=0, ignore_eos=True)
    outs = engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False,
                               lora_request=engine.lora)  # fmt: skip
    ids = [list(o.outputs[0].token_ids) for o in outs]
    lps = [
        [d[t].logprob for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)]
        for o in outs
    ]
    return ids, lps
