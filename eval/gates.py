"""Gates: compare a candidate with its parent on the same data and decide pass/fail, failing closed.

Perplexity gate: pass iff the candidate's token-weighted perplexity is at most parent_ppl * (1 + tolerance)
on the same examples, with at least `min_examples` scored. The effect is reported as the perplexity ratio
with a paired bootstrap interval (examples resampled together for both models). Any error, missing data or
too few examples is a failure with the reason: a gate never passes by accident.
"""

from __future__ import annotations

import json
import math
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from align.manifest import atomic_write_json, now
from data_schemas.config import PerplexityGateSettings


def paired_bootstrap_ratio(
    cand_nll: list[float],
    par_nll: list[float],
    tokens: list[int],
    samples: int,
    confidence: float,
    seed: int = 0,
) -> tuple[float, float]:
    """Interval of exp(mean_nll_cand - mean_nll_parent) = ppl ratio, resampling examples jointly."""
    rng = np.random.default_rng(seed)
    c, p, t = np.asarray(cand_nll), np.asarray(par_nll), np.asarray(tokens, dtype=float)
    n = len(c)
    idx = rng.integers(0, n, size=(samples, n))
    tt = t[idx].sum(1)
    ratios = np.exp((c[idx].sum(1) - p[idx].sum(1)) / np.maximum(tt, 1))
    a = (1 - confidence) / 2
    return float(np.quantile(ratios, a)), float(np.quantile(ratios, 1 - a))


def decide_perplexity(cand, parent, settings: PerplexityGateSettings) -> dict[str, Any]:
    """Pure decision from two PerplexityResults on the same examples."""
    reasons = []
    if cand.per_example_tokens != parent.per_example_tokens:
        reasons.append("candidate and parent were not scored on the same tokens (tokenizers differ?)")
    if cand.examples < settings.min_examples:
        reasons.append(
            f"only {cand.examples} examples scored; the policy needs at least {settings.min_examples}"
        )
    ratio = cand.perplexity / parent.perplexity if parent.perplexity > 0 else float("inf")
    limit = 1.0 + settings.max_relative_increase
    lo, hi = (float("nan"), float("nan"))
    if not reasons:
        lo, hi = paired_bootstrap_ratio(
            cand.per_example_nll,
            parent.per_example_nll,
            cand.per_example_tokens,
            settings.bootstrap_samples,
            settings.confidence,
        )
    if not math.isfinite(ratio):
        reasons.append("perplexity ratio is not finite")
    elif ratio > limit:
        reasons.append(
            f"candidate perplexity {cand.perplexity:.3f} is {100 * (ratio - 1):+.2f}% vs parent "
            f"{parent.perplexity:.3f}; the policy allows at most {100 * settings.max_relative_increase:+.2f}%"
        )
    checks = [
        {
            "metric": f"perplexity ({settings.scope} tokens)",
            "parent": parent.perplexity,
            "candidate": cand.perplexity,
            "delta": ratio - 1.0,
            "interval": [lo - 1.0, hi - 1.0],
            "limit": f"relative change <= {settings.max_relative_increase:+.3f}",
            "passed": math.isfinite(ratio) and ratio <= limit,
        },
        {
            "metric": "examples scored",
            "candidate": cand.examples,
            "limit": f">= {settings.min_examples}",
            "passed": cand.examples >= settings.min_examples,
        },
    ]
    return {
        "verdict": "fail" if reasons else "pass",
        "reasons": reasons,
        "checks": checks,
        "metrics": {
            "candidate": cand.as_dict(),
            "parent": parent.as_dict(),
            "ratio": ratio,
            "ratio_ci": [lo, hi],
            "confidence": settings.confidence,
            "limit_ratio": limit,
        },
    }


def run_perplexity_gate(
    candidate: str, parent: str, data_path: Path, settings: PerplexityGateSettings, out_dir: Path
) -> dict[str, Any]:
    """Evaluate both models, decide, write gate.json + gate.md. Never raises: errors are failures."""
    from eval.report import lineage_of, write_gate_reports

    images: list[Path] = []
    result: dict[str, Any] = {
        "gate": "perplexity",
        "candidate": str(candidate),
        "parent": str(parent),
        "data": str(data_path),
        "policy": settings.model_dump(),
        "started_at": now(),
        "lineage": {"candidate": lineage_of(candidate), "parent": lineage_of(parent)},
    }
    try:
        from align.models import load_for_eval
        from eval.perplexity import perplexity
        from stages.data import has_split, load_instructions

        data_path = Path(data_path)
        split = "validation" if data_path.is_dir() and has_split(data_path, "validation") else "train"
        convs, report = load_instructions(data_path, split=split)
        if settings.max_examples:
            convs = convs[: settings.max_examples]
        scores = {}
        for role, ref in (("parent", parent), ("candidate", candidate)):
            model, tok, desc = load_for_eval(str(ref))
            scores[role] = perplexity(
                model, tok, convs, settings.scope, settings.max_length, settings.batch_size
            )
            result[f"{role}_description"] = desc
            del model
        result.update(decide_perplexity(scores["candidate"], scores["parent"], settings))
        result["data_counts"] = report.as_dict()
        c, p = scores["candidate"], scores["parent"]
        shift = [
            (cn - pn) / max(t, 1)
            for cn, pn, t in zip(c.per_example_nll, p.per_example_nll, c.per_example_tokens, strict=False)
        ]
        images = _shift_plot(shift, Path(out_dir))
        worst = sorted(range(len(shift)), key=lambda i: -shift[i])[:5]
        result["worst_examples"] = [
            {
                "example": i,
                "prompt": convs[i].messages[-2].content[:200] if len(convs[i].messages) > 1 else "",
                "NLL change (nats/token)": shift[i],
            }
            for i in worst
            if shift[i] > 0
        ]
    except Exception as e:  # fail closed, with the reason
        from align.config import UserError

        msg = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        result.update({"verdict": "fail", "reasons": [f"gate could not be evaluated: {msg}"], "metrics": {}})
        if not isinstance(e, UserError):
            result["traceback"] = traceback.format_exc()
    result["finished_at"] = now()
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "gate.json", result)
    write_gate_reports(result, out_dir, images, markdown=perplexity_markdown(result))  # its richer table
    return result


def _shift_plot(shift: list[float], out_dir: Path) -> list[Path]:
    """Histogram of the per-example change in mean NLL (candidate - parent): where did the model get worse?"""
    if not shift:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    ax.hist(shift, bins=30, color="#0a62c9")
    ax.axvline(0, color="k", lw=1, ls="--")
    ax.set_xlabel("per-example change in mean NLL, candidate - parent (nats/token; > 0 = worse)")
    ax.set_ylabel("examples")
    fig.tight_layout()
    path = out_dir / "perplexity_shift.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def perplexity_markdown(r: dict[str, Any]) -> str:
    verdict = r["verdict"].upper()
    lines = [f"# Perplexity gate: **{verdict}**", ""]
    lines += [f"- candidate: `{r['candidate']}`", f"- parent: `{r['parent']}`", f"- data: `{r['data']}`", ""]
    if r["reasons"]:
        lines += ["## Why it failed", ""] + [f"- {x}" for x in r["reasons"]] + [""]
    m = r.get("metrics") or {}
    if m:
        c, p = m["candidate"], m["parent"]
        lo, hi = m["ratio_ci"]
        lines += [
            "| | perplexity | mean NLL | tokens | examples |",
            "|---|---|---|---|---|",
            f"| parent | {p['perplexity']:.3f} | {p['mean_nll']:.4f} | {p['tokens']} | {p['examples']} |",
            f"| candidate | {c['perplexity']:.3f} | {c['mean_nll']:.4f} | {c['tokens']} | {c['examples']} |",
            "",
            f"Ratio candidate/parent: **{m['ratio']:.4f}** ({int(m['confidence'] * 100)}% paired bootstrap "
            f"interval {lo:.4f} to {hi:.4f}); allowed at most {m['limit_ratio']:.4f}.",
            "",
        ]
    lines += ["Policy: `" + json.dumps(r["policy"]) + "`", ""]
    return "\n".join(lines)
