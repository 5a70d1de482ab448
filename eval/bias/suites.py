"""The suite table: how each suite's items are loaded, in which contexts it is scored, how, and how it is decided.
`load_items`, `evaluate_model` and `decide_bias` go through the rows in table order (which is also the order of the
gate's checks) and branch on no suite's name; adding a suite is a loader, a scorer, a decider and one row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.progress import steps
from core.tables import table
from data_schemas.gates import Check, GateResult
from eval.bias.decision import (
    Decision,
    _decide_bbq,
    _decide_counterfactual,
    _decide_pairs,
    drift_table,
    neutral_drift,
)
from eval.bias.items import load_bbq, load_crows_pairs
from eval.bias.scoring import counterfactual_logprobs, score_bbq, score_pairs
from eval.probes import counterfactual_probes, minimal_pairs


@dataclass(frozen=True)
class Suite:
    name: str
    setting: str  # the entry of `suites` in the gate policy that turns it on
    load: Callable[[Any], list]  # settings -> items
    score: Callable[..., list]  # (model, tokenizer, items, settings, context) -> one model's scores
    decide: Callable[..., None]  # (decision, name, context, items, candidate scores, parent scores, settings)
    pairs: bool  # minimal pairs: also scored when the model is asked to choose (the choice context)


def _score_pairs(model, tok, xs, settings, context):
    return score_pairs(
        model, tok, xs, settings.batch_size, context, settings.chat_prompt, settings.choice_prompt
    )


def _pairs(d: Decision, name: str, context: str, xs, c, p, settings) -> None:
    _decide_pairs(d, name, context, xs, np.asarray(c), np.asarray(p), settings)


SUITES: dict[str, Suite] = table(
    Suite("probes", "probes", lambda s: minimal_pairs(), _score_pairs, _pairs, pairs=True),
    Suite(
        "crows_pairs", "crows_pairs", lambda s: load_crows_pairs(s.crows_pairs_path, s.max_examples),
        _score_pairs, _pairs, pairs=True,
    ),
    Suite(
        "counterfactual", "probes", lambda s: counterfactual_probes(),
        lambda m, t, xs, s, ctx: counterfactual_logprobs(m, t, xs, s.batch_size, ctx),
        lambda d, name, ctx, xs, c, p, s: _decide_counterfactual(d, ctx, c, p, s), pairs=False,
    ),
    Suite(
        "bbq", "bbq", lambda s: load_bbq(s.bbq_path, s.max_examples),
        lambda m, t, xs, s, ctx: score_bbq(m, t, xs, s.batch_size, ctx),
        lambda d, name, ctx, xs, c, p, s: _decide_bbq(d, ctx, xs, c, p, s), pairs=False,
    ),
)  # fmt: skip
PAIR_SUITES = tuple(n for n, s in SUITES.items() if s.pairs)


def scored_in(context: str, suite: str) -> bool:
    """Whether `suite` is scored (and decided) in `context`: every suite in text and chat; minimal pairs only in the
    choice context (BBQ's chat context is a choice already; a counterfactual probe has no second sentence)."""
    return context != "choice" or SUITES[suite].pairs


def load_items(settings) -> dict[str, list]:
    """The items of every suite of the policy (the same for both models and every context)."""
    return {
        row.name: row.load(settings)
        for setting in settings.suites
        for row in SUITES.values()
        if row.setting == setting
    }


def evaluate_model(model, tokenizer, items: dict[str, list], settings) -> dict[str, dict[str, list]]:
    """Raw scores of one model, {context: {suite: scores}} (pairs -> margins, bbq -> choices, counterfactual ->
    per-variant log-likelihoods), in every context of the policy (the choice context has minimal pairs only); a bar
    counts the items scored (core.progress)."""
    units = [(c, s) for c in settings.contexts for s in items if scored_in(c, s)]
    out: dict[str, dict[str, list]] = {c: {} for c in settings.contexts}
    with steps("bias gate: items", sum(len(items[s]) for _, s in units)) as advance:
        for context, suite in units:
            out[context][suite] = SUITES[suite].score(model, tokenizer, items[suite], settings, context)
            advance(len(items[suite]))
    return out


def decide_bias(
    items: dict[str, list], cand: dict[str, dict[str, list]], par: dict[str, dict[str, list]], settings
) -> GateResult:
    """Pure decision from both models' scores ({context: {suite: scores}}) on the same items. Every suite in every
    context is a check; any failed check, or a suite with too few items, fails the gate (and a NaN anywhere fails
    its check: data_schemas/gates.py). A model made more biased only as an assistant fails on the chat checks."""
    d = Decision()
    for context in cand:
        for row in SUITES.values():
            if row.name in items and scored_in(context, row.name):
                row.decide(d, row.name, context, items[row.name], cand[context][row.name], par[context][row.name],
                           settings)  # fmt: skip
    d.finish(settings)
    drift = {
        context: neutral_drift(cand[context]["counterfactual"], par[context]["counterfactual"])
        for context in cand
        if "counterfactual" in items and scored_in(context, "counterfactual")
    }
    if drift:
        d.tables.append(drift_table(drift, settings.drift_note))
    return GateResult(
        gate="bias",
        reasons=d.reasons or ([] if d.checks else ["no bias suite was evaluated"]),
        highlights=d.highlights,
        # validated anew: a check that compares a NaN cannot pass, however its decision set it (data_schemas/gates.py)
        checks=[Check.model_validate(c.model_dump()) for c in d.checks],
        tables=d.tables,
        metrics={"drift": drift} if drift else {},
        worst_examples=sorted(d.worst, key=lambda w: w["parent margin"] - w["candidate margin"])[:8],
    )
