"""The policy gate: did a DPO or PPO policy get better than its parent for the right reasons?

Both models answer the same held-out prompts (greedy, the same token limit) and a reward scores every answer. The
gate decides on pure functions of those answers, their rewards and lengths, and the training history:

- Win rate: the share of prompts where the policy's answer scores higher than the parent's (ties count half), with
  a bootstrap interval over prompts. It fails when the interval shows the policy *worse* than its parent (upper
  end below `min_win_rate`), and when fewer than `min_prompts` prompts were judged (fail closed: a win rate on 8
  prompts says nothing).
- Length-controlled win rate (after AlpacaEval-LC, Dubois et al. 2024): a logistic regression of "policy won" on
  the length difference, P(win) = sigmoid(a + b * (len_policy - len_parent) / s), s the spread of the differences;
  the length-controlled win rate is sigmoid(a), the win rate the policy would have at equal length. The share of
  the win-rate gain that length explains, (win - lc) / (win - 0.5), may be at most `max_length_explained`: a
  policy that won only by getting longer fails.
- Reward-length correlation (Spearman) of the policy's answers, and the length-controlled reward change (the
  policy-minus-parent reward after removing a least-squares reward-on-length slope fitted on both); reported, and
  the correlation checked against `max_reward_length_correlation` where set.
- KL to the parent over training (PPO's per-iteration KL, or DPO's sampled KL): the last value may be at most
  `max_kl` and no iteration may jump by more than `max_kl_jump` over the previous one (a spike is the first sign
  of a policy that found a hole in its reward).
- Reward drift: with a second, held-out reward model, the win rate under it; the training reward's win rate may
  exceed it by at most `max_reward_drift` (a policy that only fools the reward it trained on loses under another).
- Degeneration: the share of answers that repeat themselves (a word 4-gram three times or more, or fewer than 30%
  distinct words in an answer of 12 words or more) may rise by at most `max_degeneration_increase`.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.chat import render_prompt, transcript
from core.manifest import atomic_write_json
from data_schemas.gates import Check, GateResult, Table
from eval.stats import bootstrap_interval


@dataclass
class PolicySamples:
    """The evidence a policy gate decides on: n held-out prompts answered by both models."""

    prompts: list[Any]  # n prompts (text or chat messages)
    policy: list[str]  # the policy's answers
    parent: list[str]  # the parent's answers
    policy_lengths: list[int]  # answer lengths in tokens
    parent_lengths: list[int]
    policy_rewards: list[float]  # under the training reward
    parent_rewards: list[float]
    heldout_policy_rewards: list[float] | None = None  # under a held-out reward model, where one is given
    heldout_parent_rewards: list[float] | None = None
    kl_history: list[float] = field(default_factory=list)  # KL to the parent/reference per iteration (nats)
    reward_name: str = "training reward"


# ----------------------------------------------------------------------------------------------------------
# Pure statistics
# ----------------------------------------------------------------------------------------------------------
def wins(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 where a > b, 0.5 on ties, 0 where a < b."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return (a > b) + 0.5 * (a == b)


def length_controlled_win_rate(w: np.ndarray, dlen: np.ndarray, ridge: float = 1e-3) -> float:
    """sigmoid(a) of the logistic fit P(win) = sigmoid(a + b * dlen / s): statsmodels' binomial GLM (soft targets:
    ties are 0.5), with a small ridge penalty (`ridge` / 2 * |theta|^2 on the summed log-likelihood) so a perfectly
    separable fit stays finite. s = the standard deviation of dlen (1 when every length difference is the same: then
    length explains nothing and a is the plain logit). It equals align's former Newton fit within 2e-5
    (tests/eval/test_policy_gate.py)."""
    from statsmodels.genmod import families
    from statsmodels.genmod.generalized_linear_model import GLM  # statsmodels: 1 s to import, only in a gate

    w, dlen = np.asarray(w, dtype=float), np.asarray(dlen, dtype=float)
    if len(w) == 0:
        return float("nan")
    s = float(np.std(dlen))
    x = np.stack([np.ones_like(dlen), dlen / s if s > 0 else np.zeros_like(dlen)], axis=1)
    with warnings.catch_warnings():  # separable or all-tied samples are expected here; the ridge handles them
        warnings.simplefilter("ignore")
        fit = GLM(w, x, family=families.Binomial()).fit_regularized(alpha=ridge / len(w), L1_wt=0.0)
    return float(1 / (1 + math.exp(-fit.params[0])))


def spearman(x, y) -> float:
    """Spearman rank correlation (scipy's: average ranks for ties, Pearson on the ranks); 0 when either side does
    not vary (nothing to exploit, not NaN)."""
    from scipy.stats import spearmanr  # scipy: loaded only when a gate computes it

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    return float(spearmanr(x, y).statistic)


def length_controlled_reward_change(rp, rr, lp, lr) -> float:
    """Mean policy-minus-parent reward after removing the reward-on-length slope fitted on both models' answers."""
    r = np.concatenate([np.asarray(rp, float), np.asarray(rr, float)])
    ln = np.concatenate([np.asarray(lp, float), np.asarray(lr, float)])
    slope = float(np.polyfit(ln, r, 1)[0]) if np.ptp(ln) > 0 else 0.0
    return float(
        np.mean(np.asarray(rp) - slope * np.asarray(lp)) - np.mean(np.asarray(rr) - slope * np.asarray(lr))
    )


_WORD = re.compile(r"\w+", re.UNICODE)


def degenerate(text: str) -> bool:
    """A self-repeating answer: a word 4-gram three or more times, or < 30% distinct words in 12 or more words."""
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) >= 12 and len(set(words)) / len(words) < 0.3:
        return True
    grams = Counter(tuple(words[i : i + 4]) for i in range(len(words) - 3))
    return bool(grams) and max(grams.values()) >= 3


# ----------------------------------------------------------------------------------------------------------
# The decision
# ----------------------------------------------------------------------------------------------------------
def policy_metrics(s: PolicySamples, settings) -> dict[str, Any]:
    """Every figure the gate reports, from the samples."""
    n = len(s.prompts)
    rp, rr = np.asarray(s.policy_rewards, float), np.asarray(s.parent_rewards, float)
    lp, lr = np.asarray(s.policy_lengths, float), np.asarray(s.parent_lengths, float)
    w = wins(rp, rr)
    conf, B = settings.confidence, settings.bootstrap_samples
    m: dict[str, Any] = {
        "prompts": n,
        "win_rate": float(w.mean()) if n else float("nan"),
        "win_rate_interval": list(bootstrap_interval(n, lambda i: float(w[i].mean()), B, conf)),
        "length_controlled_win_rate": length_controlled_win_rate(w, lp - lr),
        "reward_policy": float(rp.mean()) if n else float("nan"),
        "reward_parent": float(rr.mean()) if n else float("nan"),
        "length_policy": float(lp.mean()) if n else float("nan"),
        "length_parent": float(lr.mean()) if n else float("nan"),
        "reward_length_correlation_policy": spearman(rp, lp),
        "reward_length_correlation_parent": spearman(rr, lr),
        "length_controlled_reward_change": length_controlled_reward_change(rp, rr, lp, lr)
        if n
        else float("nan"),
        "degenerate_share_policy": float(np.mean([degenerate(t) for t in s.policy])) if n else float("nan"),
        "degenerate_share_parent": float(np.mean([degenerate(t) for t in s.parent])) if n else float("nan"),
    }
    if n:
        lc = lambda i: length_controlled_win_rate(w[i], (lp - lr)[i])  # noqa: E731
        m["length_controlled_win_rate_interval"] = list(bootstrap_interval(n, lc, min(B, 300), conf))
    gain = m["win_rate"] - 0.5
    m["length_explained_share"] = (
        (m["win_rate"] - m["length_controlled_win_rate"]) / gain
        if gain > settings.min_gain_to_explain
        else 0.0
    )
    if s.heldout_policy_rewards is not None and s.heldout_parent_rewards is not None:
        hw = wins(s.heldout_policy_rewards, s.heldout_parent_rewards)
        m["heldout_win_rate"] = float(hw.mean()) if n else float("nan")
        m["reward_drift"] = m["win_rate"] - m["heldout_win_rate"]
    if s.kl_history:
        kl = [float(x) for x in s.kl_history]
        m["kl_last"] = kl[-1]
        m["kl_max_jump"] = max([b - a for a, b in zip(kl, kl[1:], strict=False)], default=0.0)
        m["kl_history"] = kl
    return m


def decide_policy(s: PolicySamples, settings) -> GateResult:
    """Pass iff every check passes: enough prompts, not shown worse than the parent, the win not mostly length,
    KL within its limits, no reward drift beyond the limit, no rise in degenerate answers. Fails closed on NaN."""
    m = policy_metrics(s, settings)
    checks: list[Check] = []
    reasons: list[str] = []
    conf = int(settings.confidence * 100)
    n = m["prompts"]

    def check(ok: bool, reason: str, **kw) -> None:
        checks.append(Check(passed=ok, **kw))
        # with no prompts judged every later check is NaN and fails; the one reason that says why is enough
        if not checks[-1].passed and (n > 0 or not checks[:-1]):
            reasons.append(reason)

    bad = sum(not math.isfinite(x) for x in [*s.policy_rewards, *s.parent_rewards])
    if bad:  # a NaN reward would count as a loss or a tie: fail closed instead
        reasons.append(f"{bad} rewards are not finite (NaN or infinite); nothing can be decided")
    check(n >= settings.min_prompts, f"only {n} held-out prompts were judged; the policy needs at least "
          f"{settings.min_prompts} for a win rate that means something", metric="held-out prompts judged",
          candidate=n, limit=f">= {settings.min_prompts}")  # fmt: skip
    lo, hi = m["win_rate_interval"]
    check(
        hi >= settings.min_win_rate,
        f"the policy loses to its parent under the {s.reward_name}: win rate {m['win_rate']:.3f} ({conf}% interval "
        f"{lo:.3f} to {hi:.3f}) is below {settings.min_win_rate}",
        metric=f"win rate vs parent ({s.reward_name})", candidate=m["win_rate"], parent=0.5,
        delta=m["win_rate"] - 0.5, interval=[lo, hi], limit=f"upper {conf}% bound >= {settings.min_win_rate}",
    )  # fmt: skip
    check(
        m["length_explained_share"] <= settings.max_length_explained,
        f"the win comes from length: the policy's answers average {m['length_policy']:.1f} tokens vs "
        f"{m['length_parent']:.1f}, and at equal length its win rate would be {m['length_controlled_win_rate']:.3f} "
        f"instead of {m['win_rate']:.3f} ({100 * m['length_explained_share']:.0f}% of the gain is length; the policy "
        f"allows {100 * settings.max_length_explained:.0f}%)",
        metric="length-controlled win rate", candidate=m["length_controlled_win_rate"], parent=m["win_rate"],
        interval=m.get("length_controlled_win_rate_interval"),
        limit=f"length explains <= {100 * settings.max_length_explained:.0f}% of the gain over 0.5",
    )  # fmt: skip
    if settings.max_reward_length_correlation is not None:
        c = m["reward_length_correlation_policy"]
        check(
            c <= settings.max_reward_length_correlation,
            f"the {s.reward_name} of the policy's answers follows their length (Spearman {c:.2f}, limit "
            f"{settings.max_reward_length_correlation})",
            metric="reward-length correlation (policy answers)", candidate=c,
            parent=m["reward_length_correlation_parent"], limit=f"<= {settings.max_reward_length_correlation}",
        )  # fmt: skip
    if "kl_last" in m:
        if settings.max_kl is not None:
            check(m["kl_last"] <= settings.max_kl,
                  f"KL to the parent reached {m['kl_last']:.2f} nats per answer (limit {settings.max_kl})",
                  metric="KL to parent, last (nats/answer)", candidate=m["kl_last"],
                  limit=f"<= {settings.max_kl}")  # fmt: skip
        if settings.max_kl_jump is not None and len(m["kl_history"]) > 1:
            check(m["kl_max_jump"] <= settings.max_kl_jump,
                  f"KL to the parent jumped by {m['kl_max_jump']:.2f} nats in one iteration (limit "
                  f"{settings.max_kl_jump}): a spike", metric="largest KL jump between iterations (nats)",
                  candidate=m["kl_max_jump"], limit=f"<= {settings.max_kl_jump}")  # fmt: skip
    if "reward_drift" in m:
        check(
            m["reward_drift"] <= settings.max_reward_drift,
            f"the policy wins {m['win_rate']:.3f} under the {s.reward_name} but {m['heldout_win_rate']:.3f} under "
            f"the held-out reward model: it learned the training reward's quirks (drift {m['reward_drift']:+.3f}, "
            f"limit {settings.max_reward_drift})",
            metric="reward drift (training minus held-out reward win rate)", candidate=m["heldout_win_rate"],
            parent=m["win_rate"], delta=m["reward_drift"], limit=f"<= {settings.max_reward_drift}",
        )  # fmt: skip
    dp, dr = m["degenerate_share_policy"], m["degenerate_share_parent"]
    check(
        dp - dr <= settings.max_degeneration_increase,
        f"{100 * dp:.0f}% of the policy's answers repeat themselves vs {100 * dr:.0f}% of the parent's "
        f"(limit +{100 * settings.max_degeneration_increase:.0f} points)",
        metric="degenerate answers (share)", candidate=dp, parent=dr, delta=dp - dr,
        limit=f"change <= {settings.max_degeneration_increase:+.2f}",
    )  # fmt: skip
    table = Table(
        title="Answers of both models",
        columns=[
            "model",
            f"mean {s.reward_name}",
            "mean length (tokens)",
            "reward-length Spearman",
            "degenerate",
        ],
        rows=[
            ["policy", m["reward_policy"], m["length_policy"], m["reward_length_correlation_policy"], dp],
            ["parent", m["reward_parent"], m["length_parent"], m["reward_length_correlation_parent"], dr],
        ],
    )
    # the worst: where the policy's answer lost most reward against the parent's (ties: the longest growth first)
    change = np.asarray(s.policy_rewards, dtype=float) - np.asarray(s.parent_rewards, dtype=float)
    growth = np.asarray(s.policy_lengths) - np.asarray(s.parent_lengths)
    order = np.lexsort((-growth, change))
    worst = [
        {"prompt": transcript(s.prompts[i], 300), "policy answer": s.policy[i][:400],
         "parent answer": s.parent[i][:400], "reward change": float(change[i]), "policy reward": s.policy_rewards[i],
         "parent reward": s.parent_rewards[i], "length change": int(growth[i])}
        for i in order[:5]
    ]  # fmt: skip
    return GateResult(
        gate="policy", reasons=reasons, checks=checks, metrics=m, tables=[table], worst_examples=worst
    )


def plot_policy(s: PolicySamples, path: Path) -> bool:
    """Reward against length for both models' answers (with least-squares lines), and KL over training."""
    if not s.prompts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if s.kl_history else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 3.8), squeeze=False)
    ax = axes[0][0]
    for label, ln, r, colour in (
        ("parent", s.parent_lengths, s.parent_rewards, "#8e8e93"),
        ("policy", s.policy_lengths, s.policy_rewards, "#0a62c9"),
    ):
        ax.scatter(ln, r, s=10, alpha=0.6, color=colour, label=label)
        if np.ptp(ln) > 0:
            a, b = np.polyfit(ln, r, 1)
            xs = np.linspace(min(ln), max(ln), 20)
            ax.plot(xs, a * xs + b, color=colour, lw=1.5)
    ax.set_xlabel("answer length (tokens)")
    ax.set_ylabel(s.reward_name)
    ax.set_title("reward vs length (a rising policy cloud = reward from length)", fontsize=9)
    ax.legend(fontsize=8)
    if s.kl_history:
        ax = axes[0][1]
        ax.plot(range(1, len(s.kl_history) + 1), s.kl_history, marker="o", ms=3)
        ax.set_xlabel("iteration")
        ax.set_title("KL to the parent per answer (nats)", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def run_policy_gate(candidate, parent, samples: PolicySamples, settings, out_dir: Path) -> GateResult:
    """Decide, and write gate.json/.md/.html, samples.json and policy.png (fail closed on any error)."""
    from eval.gates import run_gate

    def evaluate(out: Path) -> GateResult:
        r = decide_policy(samples, settings)
        atomic_write_json(
            out / "samples.json",
            [
                {"prompt": p, "policy": a, "parent": b, "policy_reward": x, "parent_reward": y}
                for p, a, b, x, y in zip(samples.prompts, samples.policy, samples.parent, samples.policy_rewards,
                                         samples.parent_rewards, strict=True)
            ],
        )  # fmt: skip
        if plot_policy(samples, out / "policy.png"):
            r.images = ["policy.png"]
        return r

    return run_gate("policy", candidate, parent, settings, out_dir, evaluate)


def policy_perplexity_gate(out: Path, sft_dir: Path, data: Path, settings):
    """The perplexity gate of a policy artifact (DPO, PPO) against its SFT parent, on `data` (policy_gate_data),
    run on the pending artifact before it is marked complete. The caller frees its training model first: the gate
    loads its own copies from the artifacts."""
    from eval.gates import run_perplexity_gate

    return run_perplexity_gate(out, sft_dir, data, settings, out / "gates" / "perplexity", allow_pending=True)


def policy_gate(
    out: Path,
    parent: Path | str,
    policy,
    tokenizer,
    prompts: list[list[dict]],
    reward,
    settings,
    kl_history: list[float],
    reward_name: str,
    heldout_reward=None,
    parent_model=None,
):
    """The policy gate of a policy artifact (DPO, PPO) against its parent (run_policy_gate), on the pending
    artifact before it is marked complete. `policy` is the PEFT model whose disabled adapter is the parent, or
    (full-parameter) any model, with `parent_model` holding the parent's weights;
    `reward(prompts, texts, finished) -> list[float]` scores answers (the training reward), `heldout_reward` the
    same for a second reward model. Both models answer every prompt greedily, in batches."""
    from lib.generation import GenerateEngine

    ids = [render_prompt(tokenizer, m) for m in prompts]
    engine = GenerateEngine(policy, tokenizer)
    answer = (settings.max_new_tokens, 0.0, 1.0, 0)  # greedy
    pol = engine.generate(ids, *answer, progress="policy gate: the policy's answers")
    if parent_model is not None:
        par = GenerateEngine(parent_model, tokenizer).generate(
            ids, *answer, progress="policy gate: the parent's"
        )
    else:
        with policy.disable_adapter():
            par = engine.generate(ids, *answer, progress="policy gate: the parent's answers")
    eos = tokenizer.eos_token_id

    def texts(rs):
        return [tokenizer.decode(r, skip_special_tokens=True) for r in rs]

    def finished(rs):
        return [bool(r) and r[-1] == eos for r in rs]

    tp, tr = texts(pol), texts(par)
    samples = PolicySamples(
        prompts=prompts,
        policy=tp,
        parent=tr,
        policy_lengths=[len(r) for r in pol],
        parent_lengths=[len(r) for r in par],
        policy_rewards=[float(x) for x in reward(prompts, tp, finished(pol))],
        parent_rewards=[float(x) for x in reward(prompts, tr, finished(par))],
        kl_history=[float(x) for x in kl_history if x is not None],
        reward_name=reward_name,
    )
    if heldout_reward is not None:
        samples.heldout_policy_rewards = [float(x) for x in heldout_reward(prompts, tp, finished(pol))]
        samples.heldout_parent_rewards = [float(x) for x in heldout_reward(prompts, tr, finished(par))]
    return run_policy_gate(out, parent, samples, settings, out / "gates" / "policy")


def scorer_reward(artifact: Path):
    """A reward artifact as `reward(prompts, texts, finished) -> list[float]` (the policy gate's shape)."""
    from lib.reward_model import RewardScorer

    scorer = RewardScorer(artifact)
    return lambda prompts, texts, finished: scorer.score(prompts, texts, progress="policy gate: rewards")
