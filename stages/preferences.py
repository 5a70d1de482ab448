"""`align data build-preferences`: ranking files -> K-wise groups (`kwise/`, for the reward model) and pairs
(`pairs/`, for DPO), split by prompt (the preferences stage).

Reads and validates the ranking files with lib/rankings.py (every bad line named, conflicts resolved as
configured), aggregates each prompt's judgments into tiers (Borda over annotators; ties kept as ties), and splits
by a hash of the prompt's content (not its id, which importers derive from the responses too), so one prompt
never lands in both splits. Prompts whose responses are all tied carry
no preference: they are counted, not trained on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.config import UserError
from core.manifest import atomic_write_text, replace_dir
from core.stage import StageContext, StageResult, print_skipped
from data_schemas.config import PreferencesConfig
from lib.rankings import aggregate, implied_pairs, prompt_key, read_rankings, split_of, summarise
from stages.registry import STAGES


def run(cfg: PreferencesConfig, resume: bool = False, force: bool = False, callbacks=()) -> StageResult:
    ctx = StageContext(cfg, resume, force, STAGES[cfg.stage], callbacks)
    if ctx.finished:
        return ctx.existing_result()
    rs = read_rankings(cfg.inputs, conflicts=cfg.conflicts)
    summary = summarise(rs)
    print_skipped(rs.report.problems, what="rejected")
    if not rs.judgments:
        raise UserError(f"no usable ranking lines in {[str(p) for p in cfg.inputs]}")
    if cfg.strict and rs.report.dropped:
        raise UserError(
            f"--strict: {sum(rs.report.dropped.values())} line(s) dropped ({dict(rs.report.dropped)}); nothing written"
        )
    groups = aggregate(rs)
    kw: dict[str, list[dict]] = {"train": [], "validation": []}
    pairs: dict[str, list[dict]] = {"train": [], "validation": []}
    no_preference = 0
    for g in groups:
        split = split_of(prompt_key(g.model_dump()["prompt"]), cfg.validation_fraction, cfg.seed)
        if len(g.tiers) < 2:
            no_preference += 1  # all tied: kept in the counts, nothing to learn from
            continue
        kw[split].append(g.model_dump(mode="json"))
        for a, b in implied_pairs(g, cfg.pairs):
            pairs[split].append(
                {
                    "prompt_id": g.prompt_id,
                    "prompt": g.model_dump(mode="json")["prompt"],
                    "chosen": g.responses[a],
                    "rejected": g.responses[b],
                    "annotators": g.annotators,
                }
            )
    with ctx.open(inputs=[(p, "rankings") for p in cfg.inputs]):
        from datasets import Dataset, DatasetDict  # lazy: datasets import costs seconds

        for name, parts in (("kwise", kw), ("pairs", pairs)):
            dd = DatasetDict({k: Dataset.from_list(v) for k, v in parts.items() if v})
            replace_dir(lambda p, dd=dd: dd.save_to_disk(str(p)), ctx.out / name)
        ctx.counts = {
            "lines_read": rs.report.read,
            "lines_kept": rs.report.kept,
            "lines_dropped": dict(rs.report.dropped),
            "problems": rs.report.problems,
            "prompts": len(groups),
            "prompts_without_preference": no_preference,
            "kwise": {k: len(v) for k, v in kw.items()},
            "pairs": {k: len(v) for k, v in pairs.items()},
            "conflicts": len(rs.conflicts),
            "lines_with_control_tokens": summary["lines_with_control_tokens"],  # neutralised when trained on
        }
        metrics = {
            "kendalls_w_mean": summary["kendalls_w"]["mean"],
            "krippendorff_alpha_ordinal": summary["krippendorff_alpha_ordinal"],
            "flagged_annotators": summary["flagged_annotators"],
        }
        atomic_write_text(ctx.out / "report.md", _preferences_report(cfg, ctx.counts, metrics, summary))
        return ctx.complete(metrics)


def counts_summary(result: StageResult) -> dict[str, Any]:
    """What `align data build-preferences` prints: groups and pairs per split, lines dropped per reason."""

    c = json.loads((Path(result.artifact) / "manifest.json").read_text())["counts"]
    return {"kwise": c["kwise"], "pairs": c["pairs"], "dropped": c["lines_dropped"]}


def _preferences_report(cfg, counts, metrics, summary) -> str:
    def f(x):
        return "n/a" if x is None else f"{x:.3f}"

    lines = [
        "# Preference data report",
        "",
        f"Inputs: {', '.join(f'`{p}`' for p in cfg.inputs)}",
        "",
        f"- lines read {counts['lines_read']}, kept {counts['lines_kept']}, dropped {counts['lines_dropped'] or 'none'}",
        f"- prompts {counts['prompts']} ({counts['prompts_without_preference']} all tied: no preference to learn)",
        f"- K-wise groups: train {counts['kwise']['train']}, validation {counts['kwise']['validation']} (split by prompt)",
        f"- pairs ({cfg.pairs}): train {counts['pairs']['train']}, validation {counts['pairs']['validation']}",
        f"- conflicts (one annotator, two different rankings): {counts['conflicts']} ({cfg.conflicts})",
        "",
        "## Agreement",
        "",
        f"- Kendall's W, mean over {summary['multiply_annotated_prompts']} multiply-annotated prompts: {f(metrics['kendalls_w_mean'])}",
        f"- Krippendorff's alpha (ordinal, ranks as values): {f(metrics['krippendorff_alpha_ordinal'])}",
        f"- annotators with low agreement with the others' consensus (mean tau-b < 0.2): {metrics['flagged_annotators'] or 'none'}",
        "",
        "Aggregation: Borda count on average ranks (ties share the mean of their places); responses with equal mean",
        "rank stay tied, and no pair is formed between tied responses.",
        "",
    ]
    if summary["problems"]:
        lines += ["## Rejected lines", ""] + [f"- `{p}`" for p in summary["problems"][:50]] + [""]
    return "\n".join(lines)
