"""Gates: compare a candidate with its parent and decide pass/fail, failing closed. One runner serves every gate.

`run_gate` owns what every gate shares: the record's header (what was compared, under which policy, the lineage of
both models), fail-closed handling (an exception, missing data or a NaN is a failure with its reason, never a
crash and never a pass), and writing gate.json + gate.md + gate.html. A gate itself is one function that evaluates
and returns a GateResult body (checks, reasons, metrics, tables, plots): adding a gate means writing that function
and one entry in GATES.

Perplexity gate (this module): pass iff the candidate's token-weighted perplexity is at most
parent_ppl * (1 + tolerance) on the same examples, with at least `min_examples` scored. The effect is reported as
the perplexity ratio with a paired bootstrap interval (eval/stats.py). Bias gate: eval/bias/. Reward gate:
eval/reward_gate.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from core.config import UserError
from core.manifest import atomic_write_json, now, read_gate
from core.readers import has_split, load_instructions
from data_schemas.config import PerplexityGateSettings
from data_schemas.gates import Check, GateResult, Override, Table
from eval.report import lineage_of, write_gate_reports
from eval.score_cache import score_models
from eval.stats import bootstrap_interval


# ==========================================================================================================
# The runner
# ==========================================================================================================
def run_gate(
    gate: str,
    candidate: str | Path,
    parent: str | Path | None,
    policy: BaseModel,
    out_dir: Path,
    evaluate: Callable[[Path], GateResult],
    data: str | Path | None = None,
) -> GateResult:
    """Evaluate a gate into out_dir and write its records. Never raises on evaluation errors: they fail the gate.

    evaluate(out_dir) returns the gate's body (checks, reasons, metrics, tables, images, worst examples); the
    runner adds the header (gate, candidate, parent, data, policy, lineage, times)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    header: dict[str, Any] = {
        "gate": gate,
        "candidate": str(candidate),
        "parent": None if parent is None else str(parent),
        "data": None if data is None else str(data),
        "policy": policy.model_dump(mode="json"),
        "started_at": now(),
        "lineage": {"candidate": lineage_of(str(candidate))}
        | ({} if parent is None else {"parent": lineage_of(str(parent))}),
    }
    try:
        body = evaluate(out_dir)
        result = body.model_copy(update=header)
    except Exception as e:  # fail closed, with the reason
        msg = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        result = GateResult(**header, reasons=[f"gate could not be evaluated: {msg}"])
        if not isinstance(e, UserError):
            result.traceback = traceback.format_exc()
    result.finished_at = now()
    write_gate(result, out_dir)
    return result


def write_gate(result: GateResult, out_dir: Path) -> None:
    """gate.json, then the reports (gate.md, gate.html) beside it."""
    atomic_write_json(Path(out_dir) / "gate.json", result.model_dump(mode="json"))
    write_gate_reports(result, out_dir)


def override_gate(gate_dir: Path, reviewer: str, reason: str) -> GateResult:
    """Record a named reviewer's override of a failed gate in gate.json, its reports and the candidate's manifest.
    The verdict stays 'fail' (reports show FAIL, OVERRIDDEN); promotion treats it as passed."""

    gate_dir = Path(gate_dir)
    r = read_gate(gate_dir)
    if r is None:
        raise UserError(f"{gate_dir}: no readable gate.json here (give the folder of one gate's report)")
    if not reviewer.strip() or not reason.strip():
        raise UserError("an override needs a named reviewer and a reason")
    if r.verdict == "pass":
        raise UserError(f"{gate_dir}: the gate passed; there is nothing to override")
    r.override = Override(
        reviewer=reviewer.strip(), reason=reason.strip(), at=now(), record_sha256=r.content_sha256()
    )
    write_gate(r, gate_dir)
    cand = _overridden_artifact(gate_dir, r)
    if cand is not None:
        data = json.loads((cand / "manifest.json").read_text())
        data.setdefault("overrides", []).append(
            {"gate": r.gate, "gate_dir": str(gate_dir), **r.override.model_dump()}
        )
        atomic_write_json(cand / "manifest.json", data)
    return r


def _overridden_artifact(gate_dir: Path, r: GateResult) -> Path | None:
    """The artifact whose manifest records the override: the one that holds this gate folder (a stage's own gate,
    <artifact>/gates/<name>/), or the candidate of a pipeline gate in the same run (<run>/gates/<stage>-<gate>/).
    A gate.json elsewhere that merely names an artifact as its candidate touches no manifest (issue 34 B8)."""
    own = gate_dir.parent.parent
    if gate_dir.parent.name == "gates" and (own / "manifest.json").exists():
        return own
    cand = Path(str(r.candidate or ""))
    if (cand / "manifest.json").exists() and cand.resolve().parent == gate_dir.resolve().parent.parent:
        return cand
    return None


# ==========================================================================================================
# The perplexity gate
# ==========================================================================================================
def perplexity_ratio_interval(
    cand_nll: list[float], par_nll: list[float], tokens: list[int], samples: int, confidence: float
) -> tuple[float, float]:
    """Interval of the perplexity ratio exp((sum NLL_cand - sum NLL_parent) / sum tokens), examples resampled
    jointly for both models."""
    c, p, t = np.asarray(cand_nll), np.asarray(par_nll), np.asarray(tokens, dtype=float)
    return bootstrap_interval(
        len(c), lambda i: float(np.exp((c[i].sum() - p[i].sum()) / max(t[i].sum(), 1))), samples, confidence
    )


def decide_perplexity(cand, parent, settings: PerplexityGateSettings) -> GateResult:
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
        lo, hi = perplexity_ratio_interval(
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
        Check(
            metric=f"perplexity ({settings.scope} tokens)",
            parent=parent.perplexity,
            candidate=cand.perplexity,
            delta=ratio - 1.0,
            interval=[lo - 1.0, hi - 1.0] if math.isfinite(lo) else None,
            limit=f"relative change <= {settings.max_relative_increase:+.3f}",
            passed=math.isfinite(ratio) and ratio <= limit,
        ),
        Check(
            metric="examples scored",
            candidate=cand.examples,
            limit=f">= {settings.min_examples}",
            passed=cand.examples >= settings.min_examples,
        ),
    ]
    table = Table(
        title="Perplexity on the same examples",
        columns=["model", "perplexity", "mean NLL", "tokens", "examples"],
        rows=[
            [role, r.perplexity, r.nll_sum / max(r.tokens, 1), r.tokens, r.examples]
            for role, r in (("parent", parent), ("candidate", cand))
        ],
    )
    return GateResult(
        gate="perplexity",
        reasons=reasons,
        checks=checks,
        tables=[table],
        metrics={
            "candidate": cand.as_dict(),
            "parent": parent.as_dict(),
            "ratio": ratio,
            "ratio_ci": [lo, hi],
            "confidence": settings.confidence,
            "limit_ratio": limit,
        },
    )


# The modules whose code the scores depend on (the score cache's key includes their source; eval/score_cache.py).
SCORING_CODE = ["eval.perplexity", "lib.logprobs", "core.chat"]


def run_perplexity_gate(
    candidate: str | Path,
    parent: str | Path,
    data_path: Path,
    settings: PerplexityGateSettings,
    out_dir: Path,
    allow_pending: bool = False,
) -> GateResult:
    """Score both models on the same examples, decide, write the records. `allow_pending` lets a stage gate its
    own artifact before marking it complete (the gate is part of completing it)."""

    def evaluate(out: Path) -> GateResult:
        from eval.perplexity import PerplexityResult, perplexity  # lazy: loads torch

        convs, report = heldout_conversations(data_path, text_rows=True)
        if settings.max_examples:
            convs = convs[: settings.max_examples]
        items = [c.model_dump(mode="json") for c in convs]
        scoring = settings.model_dump(mode="json", include={"scope", "max_length", "batch_size"})
        # a model already scored on these examples (a pipeline's SFT parent, by each child's gate) is read back
        stored, descriptions, reused = score_models(
            "perplexity", {"parent": parent, "candidate": candidate}, items, scoring, SCORING_CODE,
            lambda model, tok: dataclasses.asdict(
                perplexity(model, tok, convs, settings.scope, settings.max_length, settings.batch_size)
            ),
            allow_pending=allow_pending,
        )  # fmt: skip
        scores = {role: PerplexityResult(**s) for role, s in stored.items()}
        result = decide_perplexity(scores["candidate"], scores["parent"], settings)
        c, p = scores["candidate"], scores["parent"]
        shift = [
            (cn - pn) / max(t, 1)
            for cn, pn, t in zip(c.per_example_nll, p.per_example_nll, c.per_example_tokens, strict=False)
        ]
        worst = sorted(range(len(shift)), key=lambda i: -shift[i])[:5]
        result.worst_examples = [
            {
                "example": i,
                "prompt": convs[i].messages[-2].content[:200] if len(convs[i].messages) > 1 else "",
                "NLL change (nats/token)": shift[i],
            }
            for i in worst
            if shift[i] > 0
        ]
        result.images = _shift_plot(shift, out)
        result.details = {
            "data_counts": report.as_dict(),
            "descriptions": descriptions,
            "scores_reused": reused,
        }
        return result

    return run_gate("perplexity", candidate, parent, settings, out_dir, evaluate, data=data_path)


def heldout_conversations(data: str | Path, text_rows: bool = False):
    """(conversations, load report) of a gate's held-out data: a file, or a built dataset folder's validation split
    (its train split when it has none). `text_rows`: plain `text` rows count too (the perplexity gate scores them
    whole)."""
    path = Path(data)
    split = "validation" if path.is_dir() and has_split(path, "validation") else "train"
    return load_instructions(path, split=split, text_rows=text_rows)


def perplexity_gate(
    candidate, parent, settings: PerplexityGateSettings, out_dir: Path, data: Path
) -> GateResult:
    """The perplexity gate in the gate table's signature (eval/registry.py)."""
    return run_perplexity_gate(candidate, parent, data, settings, out_dir)


def _shift_plot(shift: list[float], out_dir: Path) -> list[str]:
    """Histogram of the per-example change in mean NLL (candidate - parent): where did the model get worse?"""
    if not shift:
        return []
    import matplotlib  # lazy: plotting is only needed here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    ax.hist(shift, bins=30, color="#0a62c9")
    ax.axvline(0, color="k", lw=1, ls="--")
    ax.set_xlabel("per-example change in mean NLL, candidate - parent (nats/token; > 0 = worse)")
    ax.set_ylabel("examples")
    fig.tight_layout()
    fig.savefig(out_dir / "perplexity_shift.png", dpi=100)
    plt.close(fig)
    return ["perplexity_shift.png"]
