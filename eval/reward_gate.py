"""The reward gate: a reward model must rank held-out human preferences well, and better than length alone does.

Pure functions of the held-out rewards (the reward stage scores the held-out groups, this module decides):
- every implied pair of a held-out group (w ranked above l; ties form no pair) is a hit of 1 when r_w > r_l, 0.5
  when r_w == r_l, 0 otherwise; accuracy = mean hit over all pairs;
- the length-only baseline scores the same pairs by response length (longer wins): a reward model that does not
  beat it has learned nothing a word count would not tell;
- pass iff pairs >= min_pairs, accuracy >= min_accuracy and accuracy > length baseline + min_margin_over_length.
"""

from __future__ import annotations

import math
from typing import Any

from data_schemas.config import RewardGateSettings
from data_schemas.gates import Check, GateResult, Table
from lib.rankings import implied_pairs_of


def pair_hits(groups: list[dict], rewards: list[list[float]]) -> list[list[float]]:
    """Per group, 1 / 0.5 / 0 for each implied pair ranked right / tied / wrong by the rewards."""
    return [
        [1.0 if r[a] > r[b] else 0.5 if r[a] == r[b] else 0.0 for a, b in implied_pairs_of(g["tiers"])]
        for g, r in zip(groups, rewards, strict=True)
    ]


def agreement_level(g: dict) -> str:
    w = g.get("agreement")
    if w is None or g.get("annotators", 1) < 2:
        return "single annotator"
    return "W >= 0.8" if w >= 0.8 else "0.5 <= W < 0.8" if w >= 0.5 else "W < 0.5"


def pairwise_metrics(groups: list[dict], rewards: list[list[float]]) -> dict[str, Any]:
    """Held-out accuracy over all implied pairs (ties excluded), by agreement level, and the length baseline."""
    by_level: dict[str, list[float]] = {}
    length_hits: list[float] = []
    all_hits: list[float] = []
    for g, hits in zip(groups, pair_hits(groups, rewards), strict=True):
        level = by_level.setdefault(agreement_level(g), [0.0, 0])
        level[0] += sum(hits)
        level[1] += len(hits)
        all_hits += hits
        length_hits += [
            1.0 if g["lengths"][a] > g["lengths"][b] else 0.5 if g["lengths"][a] == g["lengths"][b] else 0.0
            for a, b in implied_pairs_of(g["tiers"])
        ]
    total = len(all_hits)
    flat = [x for r in rewards for x in r]
    mean = sum(flat) / len(flat) if flat else float("nan")
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / len(flat)) if flat else float("nan")
    return {
        "pairs": total,
        "accuracy": sum(all_hits) / total if total else float("nan"),
        "length_baseline_accuracy": sum(length_hits) / total if total else float("nan"),
        "accuracy_by_agreement": {k: v[0] / v[1] for k, v in sorted(by_level.items()) if v[1]},
        "pairs_by_agreement": {k: v[1] for k, v in sorted(by_level.items())},
        "reward_mean": mean,
        "reward_std": std,
    }


def decide_reward_gate(metrics: dict[str, Any], gate: RewardGateSettings) -> GateResult:
    """Pass iff enough pairs, accuracy >= min_accuracy, and accuracy > length baseline + margin. Fails closed:
    a missing or NaN figure fails its check."""
    reasons = []
    pairs = metrics.get("pairs", 0)
    acc, base = metrics.get("accuracy"), metrics.get("length_baseline_accuracy")
    acc_ok = acc is not None and math.isfinite(acc)
    base_ok = base is not None and math.isfinite(base)
    if pairs < gate.min_pairs:
        reasons.append(f"only {pairs} held-out pairs; the policy needs at least {gate.min_pairs}")
    if not acc_ok:
        reasons.append("held-out accuracy could not be computed")
    else:
        if acc < gate.min_accuracy:
            reasons.append(f"held-out accuracy {acc:.3f} is below the required {gate.min_accuracy:.3f}")
        if not base_ok or acc <= base + gate.min_margin_over_length:
            reasons.append(
                f"held-out accuracy {acc:.3f} does not beat the length-only baseline {base:.3f} "
                f"by more than {gate.min_margin_over_length:.3f} (a reward that only prefers longer answers)"
            )
    checks = [
        Check(metric="held-out pairs", candidate=pairs, limit=f">= {gate.min_pairs}", passed=pairs >= gate.min_pairs),
        Check(metric="held-out pairwise accuracy", candidate=acc, limit=f">= {gate.min_accuracy}",
              passed=acc_ok and acc >= gate.min_accuracy),
        Check(metric="accuracy over the length-only baseline", parent=base, candidate=acc,
              delta=acc - base if acc_ok and base_ok else None, limit=f"> {gate.min_margin_over_length:+.3f}",
              passed=acc_ok and base_ok and acc > base + gate.min_margin_over_length),
    ]  # fmt: skip
    tables = []
    if metrics.get("accuracy_by_agreement"):
        tables.append(
            Table(
                title="Accuracy by annotator agreement (Kendall's W of the prompt's annotators)",
                columns=["agreement", "pairs", "accuracy"],
                rows=[
                    [k, metrics["pairs_by_agreement"][k], v]
                    for k, v in metrics["accuracy_by_agreement"].items()
                ],
            )
        )
    return GateResult(gate="reward", reasons=reasons, checks=checks, metrics=metrics, tables=tables)
