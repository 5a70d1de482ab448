"""PPO: the pure functions against hand-computed numbers, the response layout against a plain forward, the LoRA
merge used for weight sync, and `align ppo` through the real CLI (a toy task it must learn; resume equality)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from align.cli import main
from bench.harness import peaked_llama
from lib.rl import (
    KLController,
    gae,
    group_advantages,
    grpo_kl,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)
from stages.ppo import collate, forward_response
from tests.conftest import EXAMPLES


# ---- pure functions ------------------------------------------------------------------------------------
def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: deltas (0, 0, 0.5) -> A = (0.125, 0.25, 0.5); row 1: the value 9 past the end must not leak in
    assert torch.allclose(adv, torch.tensor([[0.125, 0.25, 0.5], [0.5, 1.0, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.625, 0.75, 1.0], [1.5, 2.0, 0.0]]))
    adv, _ = gae(rewards[:1], values[:1], mask[:1], gamma=0.5, lam=1.0)
    # gamma 0.5: delta_2 = 0.5, delta_1 = 0 + 0.25 - 0.5 = -0.25, delta_0 = -0.25; A_1 = -0.25 + 0.5*0.5 = 0
    assert torch.allclose(adv, torch.tensor([[-0.25, 0.0, 0.5]]))


def test_token_rewards_kl_penalty_and_final_score():
    r, kl = token_rewards(
        torch.tensor([1.0, 3.0]),
        torch.tensor([[-1.0, -2.0, -1.0], [-1.0, 0.0, 0.0]]),
        torch.tensor([[-1.5, -1.0, -1.0], [-2.0, 0.0, 0.0]]),
        torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]),
        kl_coef=0.1,
    )
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert torch.allclose(r, torch.tensor([[-0.05, 1.1, 0.0], [2.9, 0.0, 0.0]]))


def test_policy_loss_clips_pessimistically():
    old = torch.zeros(1, 2)
    lp = torch.log(torch.tensor([[1.5, 0.5]]))
    mask = torch.ones(1, 2)
    loss, s = policy_loss(lp, old, torch.ones(1, 2), mask, clip=0.2)
    # A=+1: ratio 1.5 -> min(1.5, 1.2) = 1.2 (clipped); ratio 0.5 -> min(0.5, 0.8) = 0.5; loss = -(1.2+0.5)/2
    assert math.isclose(float(loss), -0.85, rel_tol=1e-6) and math.isclose(float(s["clipfrac"]), 0.5)
    loss, s = policy_loss(lp, old, -torch.ones(1, 2), mask, clip=0.2)
    # A=-1: ratio 1.5 -> loss max(1.5, 1.2) = 1.5; ratio 0.5 -> max(0.5, 0.8) = 0.8 (clipped)
    assert math.isclose(float(loss), 1.15, rel_tol=1e-6) and math.isclose(float(s["clipfrac"]), 0.5)
    # approx KL = mean((r-1) - log r)
    want = ((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 2
    assert math.isclose(float(s["approx_kl"]), want, rel_tol=1e-5)


def test_value_loss_clipped():
    loss, frac = value_loss(
        torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([[1.5]]), torch.ones(1, 1), 0.2
    )
    assert (
        math.isclose(float(loss), 0.125) and float(frac) == 0.0
    )  # unclipped (0.25) larger than clipped (0.09)
    loss, frac = value_loss(
        torch.tensor([[1.0]]), torch.tensor([[2.0]]), torch.tensor([[0.0]]), torch.ones(1, 1), 0.2
    )
    assert math.isclose(float(loss), 0.5 * 1.8**2, rel_tol=1e-6) and float(frac) == 1.0


def test_masked_whiten_and_kl_controller():
    w = masked_whiten(torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert torch.allclose(w, torch.tensor([-1.0, 0.0, 1.0, 0.0]), atol=1e-4)
    c = KLController(0.1, target=6.0, horizon=1000)
    c.update(kl=12.0, n=100)  # error clipped to +0.2 -> 0.1 * (1 + 0.2 * 0.1)
    assert math.isclose(c.value, 0.102)
    c = KLController(0.1, target=6.0, horizon=1000)
    c.update(kl=3.0, n=100)  # -0.5 clipped to -0.2
    assert math.isclose(c.value, 0.098)
    fixed = KLController(0.1, target=None, horizon=1000)
    fixed.update(kl=50.0, n=100)
    assert fixed.value == 0.1


# ---- response layout and weight merge -------------------------------------------------------------------
def _lora_policy(path, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(seed)
    policy = get_peft_model(
        model,
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"
        ),
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a LoRA that actually changes the outputs
    return policy.eval()


def test_forward_response_matches_plain_forward(tiny_model_path):
    policy = _lora_policy(tiny_model_path)
    head = torch.nn.Linear(policy.config.hidden_size, 1)
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14, 15]]
    batch = collate(prompts, responses, pad=0)
    with torch.no_grad():
        lp, v, ent = forward_response(policy, head, batch)
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            out = policy(torch.tensor([p + r]), output_hidden_states=True)
            logp = torch.log_softmax(out.logits[0, len(p) - 1 : -1].float(), -1)
            want = logp.gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
            assert torch.allclose(lp[i, : len(r)], want, atol=1e-5)
            assert torch.allclose(
                v[i, : len(r)], head(out.hidden_states[-1][0, len(p) - 1 : -1]).squeeze(-1), atol=1e-5
            )
            assert torch.allclose(ent[i, : len(r)], -(logp.exp() * logp).sum(-1), atol=1e-4)
    assert batch["mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_merged_state_dict_equals_merge_and_unload(tiny_model_path):
    from lib.rollout import merged_state_dict

    policy = _lora_policy(tiny_model_path)
    merged = merged_state_dict(policy)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    reference = _lora_policy(tiny_model_path).merge_and_unload().state_dict()
    assert set(merged) == set(reference)
    for k, v in reference.items():
        assert torch.allclose(merged[k], v, atol=1e-6), k
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())  # out of place


# ---- the loop's named steps, each alone -------------------------------------------------------------------
def test_collect_experience_and_ppo_update_alone(tiny_model_path, tokenizer):
    """The steps of one PPO iteration without the stage around them: the Experience has the documented shapes and
    zeros outside the response mask, and one update moves the LoRA and the value head with finite statistics."""
    from core.chat import render_prompt
    from data_schemas.config import PPOConfig
    from lib.rollout import GenerateEngine
    from stages.ppo import Learner, Reward, collect_experience, ppo_update

    cfg = PPOConfig(
        output_dir="unused", init_from="unused", prompts={"train_file": "unused"},
        reward={"rule": {"kind": "contains", "text": "a"}, "missing_eos_penalty": None},
        rollout={"max_new_tokens": 6}, train={"rollout_batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1},
    )  # fmt: skip
    policy = _lora_policy(tiny_model_path)
    head = torch.nn.Linear(policy.config.hidden_size, 1)
    params = [p for p in policy.parameters() if p.requires_grad] + list(head.parameters())
    learner = Learner(
        policy, head, torch.optim.AdamW(params, lr=1e-2), params, KLController(0.05, None, 1), ""
    )
    prompts = [[{"role": "user", "content": f"Say something about {t}."}] for t in ("tea", "maps", "rain")]
    prompt_ids = [render_prompt(tokenizer, p) for p in prompts]
    exp = collect_experience(
        cfg, learner, GenerateEngine(policy, tokenizer), Reward(cfg.reward), tokenizer, prompts, prompt_ids
    )
    B, R = exp.mask.shape
    assert B == 4 and 1 <= R <= 6 and len(exp.texts) == len(exp.finished) == len(exp.prompts) == B
    for t in (
        exp.old_logprobs,
        exp.old_values,
        exp.ref_logprobs,
        exp.kl,
        exp.rewards,
        exp.advantages,
        exp.returns,
    ):
        assert t.shape == (B, R) and torch.isfinite(t).all()
        assert (t * (1 - exp.mask)).abs().sum() == 0  # nothing outside the responses
    assert exp.scores.shape == (B,) and set(exp.scores.tolist()) <= {0.0, 1.0}
    before = [p.detach().clone() for p in params]
    stats = ppo_update(cfg, learner, exp)
    assert {"policy_loss", "value_loss", "clipfrac", "approx_kl", "grad_norm"} <= set(stats)
    assert all(math.isfinite(v) for v in stats.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, params, strict=True))
    assert exp.timings["time_train"] > 0


def test_group_advantages_hand_computed():
    """Two prompts, three responses each. RLOO: reward minus the mean of the other two; GRPO: z-score in the group."""
    scores = torch.tensor([1.0, 0.0, 2.0, 5.0, 5.0, 5.0])
    kl = torch.tensor([0.0, 10.0, 0.0, 0.0, 0.0, 0.0])
    rloo = group_advantages(scores, 3, "rloo", kl, 0.1)  # rewards 1, -1, 2 | 5, 5, 5
    assert rloo.tolist() == pytest.approx([1 - 0.5, -1 - 1.5, 2 - 0.0, 0, 0, 0])
    grpo = group_advantages(scores, 3, "grpo", kl, 0.1)  # group 1: mean 1, std 1 (unbiased); KL not in it
    assert grpo.tolist() == pytest.approx([0.0, -1.0, 1.0, 0, 0, 0], abs=1e-3)
    lp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    ref = torch.tensor([[-1.0, -1.0], [-1.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    d = [0.0, 1.0, -1.0]  # ref - lp on the three response tokens
    want = sum(math.exp(x) - x - 1 for x in d) / 3
    assert float(grpo_kl(lp, ref, mask)) == pytest.approx(want)
    assert float(grpo_kl(lp, lp, mask)) == 0.0


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_critic_free_experience_has_one_advantage_per_response(tiny_model_path, tokenizer, estimator):
    """group_size responses per prompt, consecutive; every token of a response carries its group advantage; the
    update runs without the value loss and leaves the value head where it was."""
    from core.chat import render_prompt
    from data_schemas.config import PPOConfig
    from lib.rollout import GenerateEngine
    from stages.ppo import Learner, Reward, collect_experience, ppo_update

    cfg = PPOConfig(
        output_dir="unused", init_from="unused", prompts={"train_file": "unused"},
        reward={"rule": {"kind": "frequency", "text": "e"}, "missing_eos_penalty": None},
        rollout={"max_new_tokens": 6},
        train={"rollout_batch_size": 2, "group_size": 3, "mini_batch_size": 3, "ppo_epochs": 1,
               "advantage_estimator": estimator},
    )  # fmt: skip
    policy = _lora_policy(tiny_model_path)
    head = torch.nn.Linear(policy.config.hidden_size, 1)
    params = [p for p in policy.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(
        params, lr=1e-2, weight_decay=0.0
    )  # as the stage builds it (train.weight_decay 0)
    learner = Learner(policy, head, opt, params, KLController(0.05, None, 1), "")
    prompts = [[{"role": "user", "content": f"Say something about {t}."}] for t in ("tea", "maps", "rain")]
    prompt_ids = [render_prompt(tokenizer, p) for p in prompts]
    exp = collect_experience(
        cfg, learner, GenerateEngine(policy, tokenizer), Reward(cfg.reward), tokenizer, prompts, prompt_ids
    )
    assert len(exp.texts) == 6
    assert exp.prompts[0] == exp.prompts[1] == exp.prompts[2] and exp.prompts[3] == exp.prompts[5]
    assert len(set(exp.texts[:3])) > 1  # a group's samples differ (each has its own seed)
    want = group_advantages(exp.scores, 3, estimator, exp.kl.sum(1), 0.05)
    assert torch.allclose(exp.advantages, want[:, None] * exp.mask)
    head_before = [p.detach().clone() for p in head.parameters()]
    stats = ppo_update(cfg, learner, exp)
    assert all(math.isfinite(v) for v in stats.values() if not isinstance(v, str))
    assert ("kl_penalty" in stats) == (estimator == "grpo")
    assert all(torch.equal(a, b) for a, b in zip(head_before, head.parameters(), strict=True))


# ---- the stage through the CLI ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def peaky_sft(tmp_path_factory, tiny_model_path):
    """A tiny random Llama with large initial weights: unlike the near-uniform tiny-random-llama, its next-token
    distributions are peaked (entropy ~2-3 nats), like a trained model's, so a toy reward is learnable in a few
    iterations. Wrapped as an SFT artifact (one step at a negligible learning rate)."""
    root = tmp_path_factory.mktemp("ppo")
    peaked_llama(root / "peaky", tiny_model_path)
    sft = root / "sft"
    args = [
        "sft", "--config", "configs/sft.yaml", f"output_dir={sft}", f"model.name_or_path={root / 'peaky'}",
        f"data.train_file={EXAMPLES / 'instructions_train.jsonl'}",
        f"data.validation_file={EXAMPLES / 'instructions_validation.jsonl'}",
        "train.max_steps=1", "train.learning_rate=1e-7", "train.early_stopping_patience=null",
    ]  # fmt: skip
    assert main(args) == 0
    return sft


def _ppo(out, sft, *extra):
    return main(
        [
            "ppo",
            "--config",
            "configs/ppo.yaml",
            f"output_dir={out}",
            f"init_from={sft}",
            "reward.artifact=null",
            "reward.rule={kind: contains, text: Road}",
            "reward.missing_eos_penalty=null",
            "rollout.engine=generate",
            "rollout.max_new_tokens=16",
            "train.rollout_batch_size=16",
            "train.mini_batch_size=8",
            "train.learning_rate=1e-3",
            "train.kl_coef=0.05",
            "perplexity_gate.min_examples=5",
            "perplexity_gate.max_relative_increase=10.0",
            "policy_gate.min_prompts=2",  # the toy runs judge a handful of held-out prompts
            *extra,
        ]  # fmt: skip
    )


def _history(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_ppo_learns_toy_rule_reward_with_bounded_kl(tmp_path, peaky_sft):
    """Reward = the response contains 'Road' (one of the peaky model's occasional tokens, ~6% at the start)."""
    out = tmp_path / "ppo"
    assert _ppo(out, peaky_sft, "train.steps=8", "prompts.heldout_prompts=8") == 0
    h = _history(out)
    first, last = h[0]["reward_mean"], sum(x["reward_mean"] for x in h[-3:]) / 3
    assert first < 0.3 and last > first + 0.35, (first, last)
    assert max(x["kl"] for x in h) < 20.0  # nats per response: the KL penalty keeps the policy near SFT
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and [g["gate"] for g in m["gates"]] == ["policy", "perplexity"]
    assert {"win_rate_vs_sft", "heldout_reward_policy"} <= set(m["metrics"])
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "training.png").exists()
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 * 2 and {"prompt", "response", "score"} <= set(samples[0])
    assert (out / "logs").exists() and any((out / "logs").iterdir())


# The other rows differ from GRPO only in their advantages or loss (hand-computed in tests/lib/test_rl.py); their
# learning runs are in the slow suite (`-m slow`; results in docs/ppo.md), GRPO's in the default one.
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "estimator, extra",
    [
        ("grpo", ()),
        pytest.param("rloo", (), marks=SLOW),
        pytest.param("dr_grpo", (), marks=SLOW),
        pytest.param("dapo", ("train.clip_range_high=0.28",), marks=SLOW),
        pytest.param("reinforce_pp_baseline", (), marks=SLOW),
        pytest.param("grpo", ("train.policy_loss=gspo", "train.clip_range=0.02", "train.clip_range_high=0.03"),
                     marks=SLOW, id="gspo"),
    ],
)  # fmt: skip
def test_critic_free_estimators_learn_the_toy_reward(tmp_path, peaky_sft, estimator, extra):
    """The same toy task as PPO above, at the same rollout budget (16 responses per iteration: 4 prompts x 4)."""
    out = tmp_path / estimator
    assert _ppo(out, peaky_sft, "train.steps=8", "train.rollout_batch_size=4", "train.group_size=4",
                f"train.advantage_estimator={estimator}", *extra) == 0  # fmt: skip
    h = _history(out)
    first, last = h[0]["reward_mean"], sum(x["reward_mean"] for x in h[-3:]) / 3
    print(
        f"{estimator} {' '.join(extra)}: reward {first:.3f} -> {last:.3f}"
    )  # the figures docs/ppo.md quotes
    assert first < 0.5 and last > 0.8 and last > first + 0.3, (first, last)  # 4 prompts: a noisier start
    assert max(x["kl"] for x in h) < 20.0


def test_ppo_resume_equals_uninterrupted(tmp_path, peaky_sft):
    full, part = tmp_path / "full", tmp_path / "part"
    common = ("train.steps=3", "train.save_steps=1", "prompts.heldout_prompts=2")
    assert _ppo(full, peaky_sft, *common) == 0
    assert _ppo(part, peaky_sft, *common, "train.stop_after_steps=2") == 3
    assert json.loads((part / "manifest.json").read_text())["status"] == "running"
    assert (
        main(["ppo", "--config", str(part / "config.yaml"), "train.stop_after_steps=null", "--resume"]) == 0
    )
    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(part / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert [x["reward_mean"] for x in _history(full)] == [x["reward_mean"] for x in _history(part)]
    assert (
        json.loads((full / "manifest.json").read_text())["key"]
        == json.loads((part / "manifest.json").read_text())["key"]
    )


def test_ppo_config_errors_are_one_line(tmp_path, capsys):
    code = main(
        [
            "ppo",
            "--config",
            "configs/ppo.yaml",
            f"output_dir={tmp_path}/x",
            "reward.rule={kind: contains, text: a}",
        ]
    )
    assert code == 2
    assert "exactly one of reward.artifact" in capsys.readouterr().err


def test_bad_prompt_rows_are_named_and_good_rows_kept(tmp_path, tokenizer, capsys):
    from data_schemas.config import PPOConfig
    from stages.ppo import load_prompts

    p = tmp_path / "prompts.jsonl"
    p.write_text(
        '{"instruction": "Hi there", "output": "Hello"}\nnot json\n{"instruction": "Bye", "output": "Ciao"}\n'
    )
    cfg = PPOConfig(
        output_dir=tmp_path / "o",
        init_from=tmp_path / "sft",
        prompts={"train_file": p, "heldout_prompts": 0},
        reward={"rule": {"kind": "contains", "text": "a"}},
    )
    train, held, counts, _ = load_prompts(cfg, tokenizer)
    assert [m[-1]["content"] for m in train] == ["Hi there", "Bye"] and held == []
    assert counts["rows_skipped"] == 1
    assert f"{p}:2: not valid JSON" in capsys.readouterr().err.replace("\n", "")


def test_engine_choice_auto_follows_vllm_and_asking_for_a_missing_vllm_is_said(monkeypatch):
    import lib.rollout as rollout
    from core.config import UserError

    monkeypatch.setattr(rollout, "vllm_available", lambda: False)
    assert rollout.engine_choice("auto", "rollout.engine") == "generate"
    assert rollout.engine_choice("generate", "--engine") == "generate"
    with pytest.raises(UserError, match=r"--engine=vllm but vLLM is not installed .* use --engine=generate"):
        rollout.engine_choice("vllm", "--engine")
    monkeypatch.setattr(rollout, "vllm_available", lambda: True)
    assert rollout.engine_choice("auto", "rollout.engine") == "vllm"


def test_no_held_out_prompts_fails_the_policy_gate_in_a_sentence(tmp_path, peaky_sft, capsys):
    """`prompts.heldout_prompts=0` leaves the policy gate nothing to judge: it fails closed with its reason (exit
    1, the artifact complete with a failed gate), not with an internal error after training."""
    out = tmp_path / "ppo"
    # with the missing-EOS penalty (configs/ppo.yaml's default), scoring an empty batch once crashed here
    assert (
        _ppo(out, peaky_sft, "train.steps=1", "prompts.heldout_prompts=0", "reward.missing_eos_penalty=1.0")
        == 1
    )
    m = json.loads((out / "manifest.json").read_text())
    policy = next(g for g in m["gates"] if g["gate"] == "policy")
    assert (
        policy["verdict"] == "fail"
        and len(policy["reasons"]) == 1
        and "0 held-out prompts" in policy["reasons"][0]
    )
    checks = json.loads((out / "gates" / "policy" / "gate.json").read_text())["checks"]
    assert checks[0]["metric"] == "held-out prompts judged" and not checks[0]["passed"]
    assert "internal error" not in capsys.readouterr().err


def test_a_toy_estimator_is_one_module_and_one_row(tmp_path, monkeypatch, peaky_sft):
    from lib.rl import ADVANTAGE_ESTIMATORS
    from tests.lib import toy_estimator

    monkeypatch.setitem(ADVANTAGE_ESTIMATORS, toy_estimator.ROW.name, toy_estimator.ROW)
    toy_estimator.CALLS.clear()
    out = tmp_path / "toy"
    status = main(
        ["ppo", "--config", "configs/ppo.yaml", f"output_dir={out}", f"init_from={peaky_sft}",
         "reward.artifact=null", "reward.rule={kind: contains, text: Road}", "reward.missing_eos_penalty=null",
         "rollout.engine=generate", "rollout.max_new_tokens=4", "train.steps=2", "train.rollout_batch_size=4",
         "train.mini_batch_size=4", "prompts.heldout_prompts=0",
         f"train.advantage_estimator={toy_estimator.ROW.name}"]
    )  # fmt: skip
    assert status in (0, 1)  # the run completes; its gates judge a two-step toy
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete"
    assert len(toy_estimator.CALLS) == 2 and all(len(a) == 4 for a in toy_estimator.CALLS)
    assert all(abs(float(a.sum())) < 1e-5 for a in toy_estimator.CALLS)  # a batch-mean baseline sums to 0
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and "kl_penalty" not in history[0]  # its row asks for no KL loss term


def test_ppo_honours_the_contracts_callbacks(tmp_path, peaky_sft):
    """Hooks come in through the stage contract (no module global): PPO calls a TrainerCallback at its iterations
    with the logged metrics, and a callback that asks to stop ends training after that iteration."""
    from transformers import TrainerCallback

    from core.config import load_config
    from data_schemas.config import PPOConfig
    from stages.registry import STAGES

    class StopAtTwo(TrainerCallback):
        def __init__(self):
            self.events, self.logged = [], []

        def on_train_begin(self, args, state, control, **kw):
            self.events.append("begin")

        def on_log(self, args, state, control, logs=None, **kw):
            self.logged.append((state.global_step, logs["reward_mean"]))
            control.should_training_stop = state.global_step >= 2

        def on_train_end(self, args, state, control, **kw):
            self.events.append("end")

    out = tmp_path / "hooked"
    cfg = load_config(PPOConfig, "configs/ppo.yaml", [
        f"output_dir={out}", f"init_from={peaky_sft}", "reward.artifact=null",
        "reward.rule={kind: contains, text: Road}", "reward.missing_eos_penalty=null", "rollout.engine=generate",
        "rollout.max_new_tokens=4", "train.steps=4", "train.rollout_batch_size=4", "train.mini_batch_size=4",
        "prompts.heldout_prompts=0", "train.report_to=[none]",
    ])  # fmt: skip
    hook = StopAtTwo()
    STAGES["ppo"].run(cfg, callbacks=[hook])
    assert hook.events == ["begin", "end"] and [s for s, _ in hook.logged] == [1, 2]
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2] and history[1]["reward_mean"] == hook.logged[1][1]
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_weight_sync_auto_serves_a_lora_policys_adapter_on_a_gpu_and_adapter_needs_a_lora():
    from data_schemas.config import PPOConfig
    from stages.ppo import adapter_sync

    base = {"output_dir": "x", "init_from": "tiny-random-llama", "prompts": {"train_file": "p.jsonl"},
            "reward": {"rule": {"kind": "contains", "text": "a"}}}  # fmt: skip
    lora = PPOConfig(**base)  # weight_sync auto
    assert adapter_sync(lora, cuda=True) and not adapter_sync(
        lora, cuda=False
    )  # CPUs: merged weights decode faster
    assert adapter_sync(PPOConfig(**base, rollout={"weight_sync": "adapter"}), cuda=False)
    assert not adapter_sync(PPOConfig(**base, rollout={"weight_sync": "weights"}), cuda=True)
    assert not adapter_sync(
        PPOConfig(**base, lora={"enabled": False}), cuda=True
    )  # full-parameter: every weight
    assert not adapter_sync(
        PPOConfig(**base, rollout={"engine": "generate", "weight_sync": "adapter"}), cuda=True
    )
    with pytest.raises(ValueError, match="weight_sync=adapter .* lora.enabled=true"):
        PPOConfig(**base, lora={"enabled": False}, rollout={"weight_sync": "adapter"})


@pytest.mark.slow
def test_ppo_with_adapter_sync_samples_what_weight_sync_samples(tmp_path, peaky_sft):
    """PPO whose vLLM serves the policy's LoRA (the SFT adapter merged into the weights it is given once, then the
    PPO adapter after every update) against PPO syncing every weight: the first iteration, where the PPO LoRA is
    still zero, samples exactly the same rollouts, and both runs complete."""
    from lib.rollout import vllm_available

    if not vllm_available():
        pytest.skip("vLLM is not installed (scripts/setup.sh installs it)")
    common = (
        "rollout.engine=vllm",
        "train.steps=1",
        "prompts.heldout_prompts=2",
        "train.rollout_batch_size=8",
    )
    assert _ppo(tmp_path / "adapter", peaky_sft, *common, "rollout.weight_sync=adapter") == 0
    weights = ("rollout.weight_sync=weights", "train.engine_is_cap=2.0")  # and the IS correction
    assert _ppo(tmp_path / "weights", peaky_sft, *common, *weights) == 0
    a, w = _history(tmp_path / "adapter"), _history(tmp_path / "weights")
    assert len(a) == len(w) == 1  # iteration 1, the sync after its update, then the gates
    assert a[0]["reward_mean"] == w[0]["reward_mean"] and a[0]["kl"] == pytest.approx(w[0]["kl"], abs=1e-6)
    assert all(math.isfinite(x["policy_loss"]) for x in a)
    # the engine's log-probs against the trainer's, measured every iteration: fp32 on both sides, other kernels
    assert 0 <= w[0]["engine_logprob_diff"] < 1e-2 and abs(w[0]["engine_kl"]) < 1e-3
    assert w[0]["engine_is_truncated"] == 0.0 and "engine_is_truncated" not in a[0]  # no cap there


def test_a_weighted_list_of_rewards_from_one_yaml_each_logged_and_a_failing_one_named(
    tmp_path, peaky_sft, capsys, monkeypatch
):
    """Issue 37: reward.functions mixes a verifier against the prompts' `answer` column, a format check and the
    team's own function (module:function, its file hashed into the run's key); each is logged as reward/<name>. A
    function that raises stops the run in one sentence naming the prompt's file and line."""
    prompts = tmp_path / "arith.jsonl"
    rows = [{"instruction": f"What is {a} + {b}?", "output": str(a + b), "answer": str(a + b)}
            for a in range(4) for b in range(3)]  # fmt: skip
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "team_rewards.py").write_text(
        "def brevity(prompts, completions, answer, **kw):\n"
        "    assert all(a.isdigit() for a in answer)\n"
        "    return [-len(c) / 100 for c in completions]\n"
        "def strict(prompts, completions, answer, **kw):\n"
        "    return [1 / (int(a) - 3) for a in answer]\n"
    )
    functions = (
        "reward.functions=[{kind: exact_answer}, {kind: regex, pattern: '\\d', weight: 0.1}, "
        "{kind: python, function: 'team_rewards:brevity', name: brevity, weight: 0.5}]"
    )
    out = tmp_path / "ppo"
    args = [f"prompts.train_file={prompts}", "reward.rule=null", functions, "train.steps=2",
            "train.advantage_estimator=grpo", "train.group_size=2", "train.rollout_batch_size=4",
            "train.mini_batch_size=4", "rollout.max_new_tokens=4", "prompts.heldout_prompts=2",
            "prompts.validation_file=null"]  # fmt: skip
    monkeypatch.syspath_prepend(
        str(tmp_path)
    )  # the team's module is importable (as from its working directory)
    status = _ppo(out, peaky_sft, *args)
    history = _history(out)
    assert status in (0, 1) and len(history) == 2  # trained; its gates judge a two-step toy
    for name in ("reward/exact_answer", "reward/regex", "reward/brevity"):
        assert all(name in h and math.isfinite(h[name]) for h in history), name
    assert all(h["reward/brevity"] <= 0 for h in history)
    m = json.loads((out / "manifest.json").read_text())
    assert any(i["role"] == "reward function" and i["path"].endswith("team_rewards.py") for i in m["inputs"])
    gate = json.loads((out / "gates" / "policy" / "gate.json").read_text())
    assert "1 x exact_answer, 0.1 x regex, 0.5 x brevity" in json.dumps(gate)
    capsys.readouterr()
    failing = functions.replace("team_rewards:brevity", "team_rewards:strict")
    assert _ppo(tmp_path / "ppo2", peaky_sft, *[failing if a == functions else a for a in args]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert "reward brevity (python: team_rewards:strict) raised on" in said and "arith.jsonl:" in said
    assert "ZeroDivisionError" in said and "Traceback" not in said


def test_dynamic_sampling_keeps_groups_with_a_spread_and_samples_more_until_it_has_enough():
    """DAPO's dynamic sampling on scored rows, by hand: groups of 2, 3 wanted; round 0 has one group with a spread,
    round 1 one more, round 2 none: after max_sampling_rounds=3 the batch is filled with a flat group."""
    from types import SimpleNamespace

    from stages.ppo import _Rollout, dynamic_sampling

    def rows(*pairs):
        z = torch.zeros(1)
        return [_Rollout([1], [2], "t", True, [], float(s), z, z, z, {}) for p in pairs for s in p]

    rounds = {1: rows((1, 1), (0, 2), (5, 5)), 2: rows((3, 3), (4, 4), (7, 7))}
    asked = []

    def more(k):
        asked.append(k)
        return rounds[k]

    cfg = SimpleNamespace(train=SimpleNamespace(group_size=2, rollout_batch_size=3, max_sampling_rounds=3))
    timings = {}
    got = dynamic_sampling(cfg, rows((0, 0), (0, 1), (1, 1)), more, timings)
    assert [x.score for x in got] == [0, 1, 0, 2, 0, 0] and asked == [1, 2]
    assert timings == {"sampling_rounds": 3.0, "groups_with_spread": 2 / 3}
    timings = {}
    enough = dynamic_sampling(cfg, rows((0, 1), (1, 0), (2, 3), (4, 4)), more, timings)
    assert [x.score for x in enough] == [0, 1, 1, 0, 2, 3] and timings["sampling_rounds"] == 1.0


def test_dapo_with_dynamic_sampling_and_overlong_shaping_through_the_cli(tmp_path, peaky_sft):
    out = tmp_path / "dapo"
    status = _ppo(out, peaky_sft, "train.steps=2", "train.advantage_estimator=dapo", "train.clip_range_high=0.28",
                  "train.group_size=4", "train.rollout_batch_size=2", "train.mini_batch_size=8",
                  "train.dynamic_sampling=true", "train.max_sampling_rounds=2", "reward.overlong_buffer=4",
                  "prompts.heldout_prompts=2")  # fmt: skip
    assert status in (0, 1)
    history = _history(out)
    assert len(history) == 2 and all(1 <= h["sampling_rounds"] <= 2 for h in history)
    assert all(0 <= h["groups_with_spread"] <= 1 for h in history)
    # the rule scores 0 or 1 and no EOS penalty is on: only the overlong shaping (responses that ran to the
    # 16-token limit lose 1) takes a batch's mean below 0
    assert min(h["reward_mean"] for h in history) < 0
