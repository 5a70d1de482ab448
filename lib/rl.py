"""The RL algorithms PPO and its critic-free relatives are made of, as pure functions and two tables (after verl's
`trainer/ppo/core_algos.py`): `ADVANTAGE_ESTIMATORS` (how a batch of scored rollouts becomes per-token advantages
and value targets) and `POLICY_LOSSES` (how advantages and the ratio to the sampling policy become a loss). The PPO
stage names a row of each from its config (`train.advantage_estimator`, `train.policy_loss`) and branches on
neither: a row says what the loop must do for it (train the value head, sample groups, add the KL as a loss term).

Shapes: B responses, R the longest response; per-token tensors are [B, R], left-aligned, `mask` 1 on response
tokens. Groups are G consecutive responses to one prompt.

Adding an estimator (or a loss) is one function and one row; tests/lib/test_rl.py registers a toy one and trains
with it through the CLI.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from core.config import UserError
from core.tables import table


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance, as in Ziegler et al.'s reference code)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)
    w = (x - mean) * torch.rsqrt(var + 1e-8)
    return (w if shift_mean else w + mean) * mask


def token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = -kl_coef * (log pi(y_t) - log pi_ref(y_t)), plus the score at the last token.

    scores [B]; logprobs, ref_logprobs, mask [B, R] (mask 1 on response tokens, left-aligned).
    Returns (rewards [B, R], kl [B, R]) where kl is the per-token estimate k1 = log pi - log pi_ref."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)  # [B] index of each response's final token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards * mask, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), over left-aligned response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t  (V_{t+1} = 0 after the last token)
    A_t = delta_t + gamma * lam * A_{t+1};   returns_t = A_t + V_t.
    rewards, values, mask [B, R] -> (advantages [B, R], returns [B, R]), zero outside the mask."""
    B, R = rewards.shape
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(R)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m
        # positions past the end of a response carry nothing back
        next_value = torch.where(m > 0, values[:, t], torch.zeros_like(next_value))
        next_adv = torch.where(m > 0, a, torch.zeros_like(next_adv))
    return adv, (adv + values) * mask


def _clips(clip: float | tuple[float, float]) -> tuple[float, float]:
    """(eps_low, eps_high): one epsilon for both sides, or DAPO's clip-higher pair."""
    return (clip, clip) if isinstance(clip, int | float) else (float(clip[0]), float(clip[1]))


def _surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, low: float, high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max(-A rho, -A clip(rho, 1-low, 1+high)), the unclipped term, the clipped term): the pessimistic bound both
    policy losses average, token by token."""
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    return torch.maximum(unclipped, clipped), unclipped, clipped


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float | tuple[float, float],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise:
    L = mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1-eps_low, 1+eps_high)),  rho_t = exp(log pi - log pi_old),
    eps_low = eps_high = clip, or DAPO's clip-higher (Yu et al. 2025): a larger eps_high lets unlikely tokens with a
    positive advantage grow, against entropy collapse. The mean is over every response token of the batch
    (DAPO's token-level loss: a long response weighs by its tokens, not as one sequence).
    All inputs [B, R]. Also returns the clip fraction and the approximate KL(old || new) = mean((rho-1) - log rho).
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    bound, unclipped, clipped = _surrogate(ratio, advantages, *_clips(clip))
    loss = masked_mean(bound, mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
        }
    return loss, stats


def gspo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float | tuple[float, float],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): the clipped surrogate on each response's
    length-normalised sequence ratio s_i = exp(mean_t(log pi - log pi_old)) rather than on token ratios, in its
    token form (GSPO-token): s_i,t = sg[s_i] * pi(y_t) / sg[pi(y_t)], equal to s_i in value and giving every token
    the sequence's weight in the gradient. L = mean_i max(-A_i s_i, -A_i clip(s_i, 1-eps_low, 1+eps_high)), the
    token form averaged over each response's tokens, then over responses. GSPO's epsilons are small (the paper:
    3e-4 and 4e-4), since s_i averages the token log-ratios. Inputs [B, R]; A_i is read at each response's tokens."""
    low, high = _clips(clip)
    n = mask.sum(1).clamp(min=1)
    log_ratio = (logprobs - old_logprobs) * mask
    seq = log_ratio.sum(1) / n  # [B] log s_i
    token = seq.detach()[:, None] + logprobs - logprobs.detach()  # [B, R] log s_i,t
    bound, _, _ = _surrogate(torch.exp(token), advantages, low, high)
    per_response = (bound * mask).sum(1) / n
    loss = per_response.mean()
    with torch.no_grad():
        s = torch.exp(seq)
        stats = {
            "clipfrac": ((s < 1.0 - low) | (s > 1.0 + high)).float().mean(),
            "approx_kl": masked_mean((torch.exp(log_ratio) - 1) - log_ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 * mean_t max((V - G)^2, (V_old + clip(V - V_old, -eps, eps) - G)^2).
    All inputs [B, R]. Returns (loss, fraction of tokens where the clipped term was larger)."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    a = (values - returns) ** 2
    b = (v_clipped - returns) ** 2
    return 0.5 * masked_mean(torch.maximum(a, b), mask), masked_mean((b > a).float(), mask).detach()


def grpo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath, eq. 3): A_i = (score_i - mean_group) / (std_group + 1e-4), over G
    consecutive responses per prompt; the KL to the reference is a separate loss term (`grpo_kl`), not part of the
    reward. scores [B] -> [B]."""
    g = scores.view(-1, group_size)
    std = g.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(g[:, :1])
    return ((g - g.mean(1, keepdim=True)) / (std + 1e-4)).reshape(-1)


def dr_grpo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): A_i = score_i - mean_group, without
    GRPO's division by the group's std, which weighs prompts whose answers all agree (too easy, too hard) up.
    (Its other fix, no per-response length normalisation, is how align's loss already averages: over every token
    of the batch.) scores [B] -> [B]."""
    g = scores.view(-1, group_size)
    return (g - g.mean(1, keepdim=True)).reshape(-1)


def reinforce_pp_baseline_advantages(
    scores: torch.Tensor, seq_kl: torch.Tensor, kl_coef: float, group_size: int
) -> torch.Tensor:
    """REINFORCE++-baseline (Hu et al. 2025, "REINFORCE++"): the response's reward r_i = score_i - kl_coef * KL_i
    minus its group's mean, then normalised by the mean and std of the whole batch (not of the group): a baseline
    per prompt, and one scale for every prompt. scores, seq_kl [B] -> [B]."""
    r = (scores - kl_coef * seq_kl).view(-1, group_size)
    a = (r - r.mean(1, keepdim=True)).reshape(-1)
    std = a.std() if a.numel() > 1 else torch.zeros((), dtype=a.dtype)
    return (a - a.mean()) / (std + 1e-8)


def rloo_advantages(
    scores: torch.Tensor, seq_kl: torch.Tensor, kl_coef: float, group_size: int
) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024, "Back to Basics"): the response's reward r_i = score_i - kl_coef * KL_i (KL summed
    over its tokens), baseline = the mean reward of the other G - 1 responses to the same prompt:
        A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean_j r_j).
    scores, seq_kl [B] -> [B]."""
    r = (scores - kl_coef * seq_kl).view(-1, group_size)
    return (group_size / (group_size - 1) * (r - r.mean(1, keepdim=True))).reshape(-1)


def truncated_is_weights(
    logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor, cap: float | None
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Truncated importance sampling for the rollout engine's mismatch (Yao et al. 2025, "Your efficient RL
    framework secretly brings you off-policy RL training"; TRL's vllm_importance_sampling_correction): responses
    were sampled from the engine's pi_sampler, not the trainer's pi_old, so each token's loss is weighted by

        w_t = min(pi_old(y_t) / pi_sampler(y_t), cap)        (detached; 1 on padding)

    Since w_t > 0, weighting the clipped surrogate equals scaling the advantage: max(-wA rho, -wA clip(rho)) =
    w max(-A rho, -A clip(rho)). `cap` None: no weights (the mismatch is still measured). Also returns the
    mismatch: the mean and largest |log pi_old - log pi_sampler| over tokens, KL(sampler || old) by the k3
    estimator mean((r - 1) - log r), r = pi_old / pi_sampler, and the share of tokens whose weight was truncated."""
    d = (logprobs - sampler_logprobs) * mask
    n = mask.sum().clamp(min=1)
    r = torch.exp(d)
    stats = {
        "engine_logprob_diff": float(d.abs().sum() / n),
        "engine_logprob_diff_max": float(d.abs().max()) if mask.any() else 0.0,
        "engine_kl": float((((r - 1) - d) * mask).sum() / n),
    }
    if cap is None:
        return None, stats
    w = torch.where(mask.bool(), torch.clamp(r, max=cap), torch.ones_like(r)).detach()
    stats["engine_is_truncated"] = float(((r > cap) & mask.bool()).sum() / n)
    return w, stats


def overlong_shaping(lengths: torch.Tensor, max_len: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): 0 for a response of at most max_len - buffer
    tokens, then falling linearly to -1 at max_len (and -1 beyond):

        R(L) = 0                              L <= max_len - buffer
             = ((max_len - buffer) - L) / buffer   max_len - buffer < L <= max_len
             = -1                             L > max_len
    """
    free = max_len - buffer
    return torch.clamp((free - lengths.float()) / buffer, min=-1.0, max=0.0)


def grpo_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GRPO's KL penalty: the token mean of the unbiased, non-negative estimator k3 (Schulman 2020)
    KL(pi || pi_ref) ~ exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1."""
    d = (ref_logprobs - logprobs) * mask
    return masked_mean(torch.exp(d) - d - 1, mask)


class KLController:
    """Fixed KL coefficient, or the adaptive controller of Ziegler et al. 2019 (section 2.2):
    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n / horizon), n = responses in the batch."""

    def __init__(self, coef: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        e = max(-0.2, min(0.2, kl / self.target - 1.0))
        self.value *= 1.0 + e * n / self.horizon


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(G - V) / Var(G) over response tokens (1 = perfect critic, <= 0 = no better than a constant)."""
    var_g = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return float(1 - var_d / var_g) if var_g > 0 else float("nan")


# ==========================================================================================================
# The tables
# ==========================================================================================================
@dataclass
class Rollouts:
    """What an advantage estimator sees of one iteration's batch (every process holds all of it)."""

    scores: torch.Tensor  # [B] the reward of each whole response
    rewards: torch.Tensor  # [B, R] per-token rewards: -kl_coef * KL, plus the score at the last token
    kl: torch.Tensor  # [B, R] per-token log pi - log pi_ref
    values: torch.Tensor  # [B, R] the value head's estimates (zeros without a critic)
    mask: torch.Tensor  # [B, R]
    group_size: int
    kl_coef: float
    gamma: float
    lam: float
    whiten: bool


@dataclass(frozen=True)
class AdvantageEstimator:
    name: str
    advantages: Callable[
        [Rollouts], tuple[torch.Tensor, torch.Tensor]
    ]  # -> (advantages, returns), [B, R] each
    critic: bool  # trains the value head (its loss weighted by vf_coef); else the value term weighs 0
    min_group_size: int  # responses per prompt it needs (group_size >= this)
    kl_loss: bool  # the KL to the reference is a loss term (GRPO's k3), not only in the per-token reward
    help: str


def _gae(x: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
    adv, returns = gae(x.rewards, x.values, x.mask, x.gamma, x.lam)
    return (masked_whiten(adv, x.mask) if x.whiten else adv), returns


def per_response(adv: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One advantage per response [B] on each of its tokens; no value targets (critic-free)."""
    return adv[:, None] * mask, torch.zeros_like(mask, dtype=torch.float32)


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = table(
    AdvantageEstimator(
        "gae", _gae, critic=True, min_group_size=1, kl_loss=False,
        help="PPO with the value head: GAE (Schulman et al. 2016), whitened",
    ),
    AdvantageEstimator(
        "grpo", lambda x: per_response(grpo_advantages(x.scores, x.group_size), x.mask),
        critic=False, min_group_size=2, kl_loss=True,
        help="group-relative advantages (score - group mean) / group std, KL as a k3 loss term (Shao et al. 2024)",
    ),
    AdvantageEstimator(
        "rloo", lambda x: per_response(rloo_advantages(x.scores, x.kl.sum(1), x.kl_coef, x.group_size), x.mask),
        critic=False, min_group_size=2, kl_loss=False,
        help="leave-one-out baseline on score - kl_coef * KL (Ahmadian et al. 2024)",
    ),
    AdvantageEstimator(
        "dr_grpo", lambda x: per_response(dr_grpo_advantages(x.scores, x.group_size), x.mask),
        critic=False, min_group_size=2, kl_loss=True,
        help="Dr. GRPO: score - group mean, no std division (Liu et al. 2025); KL as GRPO's k3 loss term",
    ),
    AdvantageEstimator(
        "dapo", lambda x: per_response(grpo_advantages(x.scores, x.group_size), x.mask),
        critic=False, min_group_size=2, kl_loss=False,
        help="DAPO's advantages (Yu et al. 2025): GRPO's, with no KL term; pair with train.clip_range_high "
             "(clip-higher, 0.28 in the paper); the loss is token-level already",
    ),
    AdvantageEstimator(
        "reinforce_pp_baseline",
        lambda x: per_response(reinforce_pp_baseline_advantages(x.scores, x.kl.sum(1), x.kl_coef, x.group_size),
                               x.mask),
        critic=False, min_group_size=2, kl_loss=False,
        help="REINFORCE++-baseline: (score - kl_coef * KL) - group mean, normalised over the batch (Hu et al. 2025)",
    ),
)  # fmt: skip


def group_advantages(
    scores: torch.Tensor, group_size: int, estimator: str, seq_kl: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """A critic-free estimator's one advantage per response, [B], from scores and each response's summed KL [B]."""
    ones = torch.ones(len(scores), 1, device=scores.device)
    x = Rollouts(scores, torch.zeros_like(ones), seq_kl[:, None], torch.zeros_like(ones), ones, group_size,
                 kl_coef, 1.0, 1.0, False)  # fmt: skip
    return advantage_estimator(estimator).advantages(x)[0][:, 0]


@dataclass(frozen=True)
class PolicyLoss:
    name: str
    # (logprobs, old_logprobs, advantages, mask [B, R] each, clip or (clip_low, clip_high)) -> (loss, statistics)
    loss: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
    help: str


POLICY_LOSSES: dict[str, PolicyLoss] = {
    p.name: p
    for p in (
        PolicyLoss("ppo_clip", policy_loss, "PPO's clipped surrogate, token mean (Schulman et al. 2017)"),
        PolicyLoss("gspo", gspo_loss, "GSPO: the clipped surrogate on sequence ratios (Zheng et al. 2025)"),
    )
}


def advantage_estimator(name: str) -> AdvantageEstimator:
    return _row(ADVANTAGE_ESTIMATORS, name, "train.advantage_estimator")


def policy_loss_row(name: str) -> PolicyLoss:
    return _row(POLICY_LOSSES, name, "train.policy_loss")


def _row(table: dict, name: str, key: str):
    if name not in table:
        raise UserError(f"{key}={name!r} is not a row of its table; known: {', '.join(table)} (lib/rl.py)")
    return table[name]
