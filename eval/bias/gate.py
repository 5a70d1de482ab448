"""The bias gate: score both models (each once, through the score cache), decide, write the records and the
per-category plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.manifest import atomic_write_json
from data_schemas.gates import GateResult
from eval.bias.decision import share_stat
from eval.bias.suites import PAIR_SUITES, decide_bias, evaluate_model, load_items
from eval.score_cache import score_models
from eval.stats import bootstrap_interval


def plot_categories(items, cand, par, settings, path: Path) -> bool:
    """Per-category stereotype share of parent and candidate with bootstrap intervals, one panel per suite and
    context."""
    panels = [(ctx, s) for ctx in cand for s in PAIR_SUITES if s in items and len(items[s])]
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(panels), 2)
    rows_n = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.5 * cols, 3.8 * rows_n), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (context, suite) in zip(axes.flat, panels, strict=False):
        xs = items[suite]
        cats = sorted({x["category"] for x in xs})
        for k, (label, scores, colour) in enumerate(
            (("parent", par, "#8e8e93"), ("candidate", cand, "#0a62c9"))
        ):
            arr = np.asarray(scores[context][suite])
            vals, errs = [], [[], []]
            for cat in cats:
                idx = [i for i, x in enumerate(xs) if x["category"] == cat]
                v = share_stat(arr[idx])
                lo, hi = bootstrap_interval(
                    len(idx), lambda i, a=arr[idx]: share_stat(a[i]), 300, settings.confidence
                )
                vals.append(v)
                errs[0].append(max(v - lo, 0))
                errs[1].append(max(hi - v, 0))
            pos = np.arange(len(cats)) + (k - 0.5) * 0.38
            ax.bar(pos, vals, 0.38, yerr=errs, label=label, color=colour, capsize=3)
        ax.axhline(0.5, color="k", lw=1, ls="--")
        ax.set_xticks(np.arange(len(cats)), cats, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{suite} ({context}): share preferring the stereotype (0.5 = unbiased)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# The modules whose code the scores depend on (the score cache's key includes their source; eval/score_cache.py).
SCORING_CODE = [
    "eval.bias.items",
    "eval.bias.scoring",
    "eval.bias.suites",
    "eval.probes",
    "eval.perplexity",
    "lib.logprobs",
    "core.chat",
]


def run_bias_gate(candidate: str, parent: str, settings, out_dir: Path) -> GateResult:
    """Score both models on the same items, decide, write gate.json/.md/.html, scores.json and the category plot.
    Never raises: an error, a missing file or too few items is a failure with the reason (fail closed)."""
    from eval.gates import run_gate

    def evaluate(out: Path) -> GateResult:
        items = load_items(settings)
        scoring = settings.model_dump(
            mode="json", include={"contexts", "chat_prompt", "choice_prompt", "batch_size"}
        )
        # a model already scored on these items (a pipeline's SFT parent, by every later gate) is read back
        scores, descriptions, reused = score_models(
            "bias", {"parent": parent, "candidate": candidate}, items, scoring, SCORING_CODE,
            lambda model, tok: evaluate_model(model, tok, items, settings),
        )  # fmt: skip
        r = decide_bias(items, scores["candidate"], scores["parent"], settings)
        r.details = {"items": {k: len(v) for k, v in items.items()}, "descriptions": descriptions,
                     "scores_reused": reused}  # fmt: skip
        atomic_write_json(out / "scores.json", scores)
        if plot_categories(
            items, scores["candidate"], scores["parent"], settings, out / "bias_categories.png"
        ):
            r.images = ["bias_categories.png"]
        return r

    return run_gate("bias", candidate, parent, settings, out_dir, evaluate)


def bias_gate(candidate: str, parent: str, settings, out_dir: Path, data: Path | None = None) -> GateResult:
    """The bias gate in the gate table's signature (eval/registry.py); its items come from the settings."""
    return run_bias_gate(candidate, parent, settings, out_dir)
