"""Task gate: a candidate's generated answers may not score worse against the references than its parent's.

Both models answer the same held-out instructions greedily (each conversation's turns before its last answer,
under the chat template; lib/generation.py), and each answer is scored against that last answer with
eval/task_metrics.py. The decision is on one metric (`metric`): the difference candidate - parent on the same
examples, with a paired bootstrap interval (eval/stats.py: the examples are resampled together for both models).
Per-example metrics (ROUGE-L, token F1, exact match) resample their per-example values; corpus BLEU resamples each
example's n-gram counts and recomputes the corpus score (counted here on a 0-1 scale). Pass iff

    delta >= -max_decrease                      (test: point)
    and, with test: interval, lower(delta) >= -max_decrease,

with at least `min_examples` answered; anything else (too few examples, a NaN, an error) fails closed. The report
lists every metric for both models, the examples that lost most, and writes every answer to answers.jsonl for the
reviewer to read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from data_schemas.config import TaskGateSettings
from data_schemas.gates import Check, GateResult, Table
from eval.gates import heldout_conversations, run_gate
from eval.stats import bootstrap_interval
from eval.task_metrics import METRICS, bleu_from_stats, bleu_stats, example_scores, prompts_and_references


def metric_values(metric: str, predictions: list[str], references: list[str]) -> tuple[np.ndarray, Callable]:
    """(per-example rows, stat(rows, idx) -> the metric on those rows, 0-1 scale)."""
    if metric == "bleu":
        rows = np.asarray(bleu_stats(predictions, references), dtype=float).reshape(len(predictions), -1)
        return rows, lambda r, i: bleu_from_stats(list(r[i].sum(axis=0))) / 100
    rows = np.asarray(example_scores(metric, predictions, references), dtype=float)
    return rows, lambda r, i: float(r[i].mean())


def decide_task(
    references: list[str], parent: list[str], candidate: list[str], settings: TaskGateSettings
) -> GateResult:
    """Pure decision from the two models' answers to the same examples."""
    n = len(references)
    reasons = []
    if n < settings.min_examples:
        reasons.append(f"only {n} examples answered; the policy needs at least {settings.min_examples}")
    p_rows, stat = metric_values(settings.metric, parent, references)
    c_rows, _ = metric_values(settings.metric, candidate, references)
    idx = np.arange(n)
    p_val, c_val = (stat(p_rows, idx), stat(c_rows, idx)) if n else (float("nan"), float("nan"))
    delta = c_val - p_val
    lo, hi = bootstrap_interval(
        n, lambda i: stat(c_rows, i) - stat(p_rows, i), settings.bootstrap_samples, settings.confidence
    )
    limit = -settings.max_decrease
    point_ok = math.isfinite(delta) and delta >= limit
    interval_ok = settings.test == "point" or (math.isfinite(lo) and lo >= limit)
    if not math.isfinite(delta):
        reasons.append(f"{settings.metric} is not finite (parent {p_val}, candidate {c_val})")
    elif not point_ok:
        reasons.append(
            f"{settings.metric} fell by {-delta:.4f} (parent {p_val:.4f} -> candidate {c_val:.4f}); the policy "
            f"allows at most {settings.max_decrease:.4f}"
        )
    elif not interval_ok:
        reasons.append(
            f"the {100 * settings.confidence:.0f}% interval of the change in {settings.metric} reaches {lo:.4f}, "
            f"below -{settings.max_decrease:.4f} (test: interval): no evidence that it did not regress"
        )
    checks = [
        Check(
            metric=f"{settings.metric} (0-1)",
            parent=p_val,
            candidate=c_val,
            delta=delta,
            interval=[lo, hi] if math.isfinite(lo) else None,
            limit=f"change >= {limit:+.4f}"
            + (" (interval lower end too)" if settings.test == "interval" else ""),
            passed=point_ok and interval_ok,
        ),
        Check(
            metric="examples answered",
            candidate=n,
            limit=f">= {settings.min_examples}",
            passed=n >= settings.min_examples,
        ),
    ]
    every = {role: {k: fn(answers, references) for k, fn in METRICS.items()}
             for role, answers in (("parent", parent), ("candidate", candidate))}  # fmt: skip
    table = Table(
        title="Generated answers against the references (BLEU 0-100, the others 0-1)",
        columns=["model", *METRICS],
        rows=[[role, *every[role].values()] for role in ("parent", "candidate")],
    )
    return GateResult(
        gate="task",
        reasons=reasons,
        checks=checks,
        tables=[table],
        metrics={"metric": settings.metric, "parent": every["parent"], "candidate": every["candidate"],
                 "delta": delta, "delta_ci": [lo, hi], "confidence": settings.confidence, "examples": n},
    )  # fmt: skip


def task_gate(candidate, parent, settings: TaskGateSettings, out_dir: Path, data: Path) -> GateResult:
    """The task gate in the gate table's signature (eval/registry.py)."""

    def evaluate(out: Path) -> GateResult:
        from core.models import load_for_eval
        from lib.generation import greedy_answers  # lazy: torch/transformers

        convs, report = heldout_conversations(data)
        convs = convs[: settings.max_examples] if settings.max_examples else convs
        prompts, refs = prompts_and_references(convs)
        answers, descriptions = {}, {}
        for role, ref in (("parent", parent), ("candidate", candidate)):
            model, tok, descriptions[role] = load_for_eval(str(ref), merge=True)
            answers[role] = greedy_answers(model, tok, prompts, settings.max_new_tokens, settings.batch_size)
            del model
        result = decide_task(refs, answers["parent"], answers["candidate"], settings)
        with open(out / "answers.jsonl", "w", encoding="utf-8") as f:
            for p, r, a, b in zip(prompts, refs, answers["parent"], answers["candidate"], strict=True):
                f.write(json.dumps({"prompt": p, "reference": r, "parent": a, "candidate": b}) + "\n")
        if settings.metric != "bleu":
            drop = np.asarray(example_scores(settings.metric, answers["candidate"], refs)) - np.asarray(
                example_scores(settings.metric, answers["parent"], refs)
            )
            result.worst_examples = [
                {"example": int(i), "prompt": prompts[i][-1]["content"][:200], "reference": refs[i][:200],
                 "parent": answers["parent"][i][:200], "candidate": answers["candidate"][i][:200],
                 f"{settings.metric} change": float(drop[i])}
                for i in np.argsort(drop)[:5] if drop[i] < 0
            ]  # fmt: skip
        result.details = {
            "data_counts": report.as_dict(),
            "descriptions": descriptions,
            "answers": "answers.jsonl",
        }
        return result

    return run_gate("task", candidate, parent, settings, out_dir, evaluate, data=data)
