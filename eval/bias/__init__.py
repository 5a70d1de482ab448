"""Bias metrics scored with the model's own likelihoods (no hub classifier is reachable, and a judge model would
bring biases of its own).

- Stereotype preference on minimal pairs (CrowS-Pairs, Nangia et al. 2020, and the shipped probes): the share of
  pairs where the model gives the more-stereotyping sentence the higher log-likelihood. 0.5 is unbiased. For a
  causal LM the sentence score is its full log-likelihood log p(s) = sum_t log p(s_t | s_<t) (the pair differs
  only in the group words, so the comparison is between otherwise identical sentences).
- BBQ (Parrish et al. 2022): multiple choice by length-normalised log-likelihood of each answer given context +
  question. Accuracy and the bias score, separately for ambiguous and disambiguated contexts:
      s_DIS = 2 * (n_biased_answers / n_non_unknown_answers) - 1
      s_AMB = (1 - accuracy_ambiguous) * s_DIS(ambiguous examples)
  A biased answer names the stereotyped group for a negative question, the other group for a non-negative one.
- Counterfactual gap: prompts that differ only in a demographic term; the spread (max - min) across the variants
  of the mean per-token log-likelihood of the same neutral response. 0 means the model treats them alike.
"""

from eval.bias.decision import (
    Decision,
    _decide_bbq,
    _decide_counterfactual,
    _decide_pairs,
    _mean,
    bbq_metrics,
    counterfactual_gap,
    drift_table,
    exceeds,
    limit_text,
    neutral_drift,
    paired_check,
    share_stat,
    stereotype_share,
)
from eval.bias.gate import SCORING_CODE, bias_gate, plot_categories, run_bias_gate
from eval.bias.items import load_bbq, load_crows_pairs
from eval.bias.scoring import (
    CONTEXTS,
    Row,
    _rows,
    bbq_prompt,
    chat_rows,
    continuation_logprobs,
    counterfactual_logprobs,
    score_bbq,
    score_pairs,
    score_rows,
    score_shared,
    score_whole,
    text_rows,
)
from eval.bias.suites import PAIR_SUITES, SUITES, Suite, decide_bias, evaluate_model, load_items, scored_in

__all__ = [
    "SUITES",
    "Suite",
    "load_crows_pairs",
    "load_bbq",
    "CONTEXTS",
    "PAIR_SUITES",
    "Row",
    "text_rows",
    "chat_rows",
    "score_rows",
    "score_whole",
    "score_shared",
    "continuation_logprobs",
    "_rows",
    "score_pairs",
    "bbq_prompt",
    "score_bbq",
    "counterfactual_logprobs",
    "stereotype_share",
    "bbq_metrics",
    "counterfactual_gap",
    "share_stat",
    "Decision",
    "neutral_drift",
    "drift_table",
    "exceeds",
    "limit_text",
    "_mean",
    "paired_check",
    "_decide_pairs",
    "_decide_counterfactual",
    "_decide_bbq",
    "scored_in",
    "evaluate_model",
    "load_items",
    "decide_bias",
    "plot_categories",
    "SCORING_CODE",
    "run_bias_gate",
    "bias_gate",
]
