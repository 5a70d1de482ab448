"""Annotators' ranking files: validate, check across lines, measure agreement, aggregate, convert.

Reading keeps every good line: each bad one is reported as `file:line: field: reason` and counted. Across
lines: a prompt id must keep its prompt text and response texts (a mismatch drops the later line); one
annotator judging a prompt twice the same way is a duplicate (first kept); twice differently is a conflict
(by default neither line is trusted). Aggregation across annotators is a Borda count on average ranks
(lib/agreement.py), ties kept.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from core.chat import COMMON_MARKERS, chat_messages, control_tokens_in
from core.config import UserError
from core.manifest import atomic_write_text, refuse_overwriting_input
from core.readers import LoadReport, describe_row_error, has_split, iter_dataset_rows, iter_rows
from data_schemas.rankings import KWiseGroup, RankingLine
from lib.agreement import (
    borda_consensus,
    kendall_tau_b,
    kendalls_w,
    krippendorff_alpha_ordinal,
    tier_ranks,
)

_ALLOWED = "prompt_id, prompt, responses, ranking, annotator, created_at, notes"


def _problem(err: ValidationError) -> tuple[str, str]:
    return describe_row_error(err, _ALLOWED)


@dataclass
class Judgment:
    where: str
    line: RankingLine

    def ranks_by_text(self) -> dict[str, float]:
        text = {r.id: r.text.strip() for r in self.line.responses}
        return {text[i]: v for i, v in tier_ranks(self.line.tiers()).items()}


@dataclass
class RankingSet:
    judgments: list[Judgment] = field(default_factory=list)
    report: LoadReport = field(default_factory=LoadReport)
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    def by_prompt(self) -> dict[str, list[Judgment]]:
        out: dict[str, list[Judgment]] = defaultdict(list)
        for j in self.judgments:
            out[j.line.prompt_id].append(j)
        return out


def read_rankings(paths: list[Path], conflicts: str = "drop") -> RankingSet:
    """Validate ranking files line by line and across lines. `conflicts`: 'drop' (both lines) or 'keep-latest'."""
    rs = RankingSet(files=[Path(p) for p in paths])
    report = rs.report
    first_seen: dict[
        str, tuple[str, str, frozenset]
    ] = {}  # prompt_id -> (where, prompt text, response texts)
    by_pair: dict[tuple[str, str], list[int]] = defaultdict(
        list
    )  # (prompt_id, annotator) -> judgment indices
    accepted: list[Judgment | None] = []
    for path in rs.files:
        if not path.exists():
            raise UserError(f"{path}: ranking file not found")
        for lineno, row in iter_rows(path, report):
            where = f"{path}:{lineno}"
            try:
                line = RankingLine.model_validate(row)
            except ValidationError as e:
                kind, msg = _problem(e)
                report.drop(where, kind, msg)
                continue
            texts = frozenset(r.text.strip() for r in line.responses)
            seen = first_seen.get(line.prompt_id)
            if seen is None:
                first_seen[line.prompt_id] = (where, line.prompt_text(), texts)
            elif seen[1] != line.prompt_text():
                report.drop(
                    where,
                    "prompt_mismatch",
                    f"prompt: prompt_id '{line.prompt_id}' has a different prompt text here than at {seen[0]}; "
                    "use a new prompt_id for a different prompt",
                )
                continue
            elif seen[2] != texts:
                report.drop(
                    where,
                    "responses_mismatch",
                    f"responses: prompt_id '{line.prompt_id}' has different response texts here than at {seen[0]}; "
                    "every annotator must rank the same responses",
                )
                continue
            j = Judgment(where, line)
            key = (line.prompt_id, line.annotator)
            earlier = [accepted[i] for i in by_pair[key] if accepted[i] is not None]
            if earlier:
                same = all(_same_ranking(e, j) for e in earlier)
                if same:
                    report.drop(
                        where,
                        "duplicate_judgment",
                        f"annotator '{line.annotator}' already judged prompt '{line.prompt_id}' identically at "
                        f"{earlier[0].where}; duplicate ignored",
                    )
                    continue
                rs.conflicts.append(
                    {
                        "prompt_id": line.prompt_id,
                        "annotator": line.annotator,
                        "lines": [e.where for e in earlier] + [where],
                    }
                )
                latest = conflicts == "keep-latest"
                reason, said = (
                    ("conflict_superseded", f"re-judged prompt '{line.prompt_id}' differently at {where}; the later "
                     "judgment is kept (--conflicts keep-latest)") if latest else
                    ("conflict", f"judged prompt '{line.prompt_id}' differently at {where}; neither judgment is used "
                     "(resolve it, or use --conflicts keep-latest)")
                )  # fmt: skip
                for i in by_pair[key]:  # the earlier judgments: superseded, or both dropped
                    if accepted[i] is not None:
                        report.drop(accepted[i].where, reason, f"annotator '{line.annotator}' {said}")
                        accepted[i] = None
                if not latest:
                    report.drop(
                        where,
                        "conflict",
                        f"annotator '{line.annotator}' judged prompt '{line.prompt_id}' differently at "
                        f"{earlier[0].where}; neither judgment is used",
                    )
                    by_pair[key].append(len(accepted))
                    accepted.append(None)
                    continue
            by_pair[key].append(len(accepted))
            accepted.append(j)
    rs.judgments = [j for j in accepted if j is not None]
    report.kept = len(rs.judgments)
    return rs


def _same_ranking(a: Judgment, b: Judgment) -> bool:
    return a.ranks_by_text() == b.ranks_by_text()


# --------------------------------------------------------------------------------------------------------
# Summary and agreement
# --------------------------------------------------------------------------------------------------------
def summarise(rs: RankingSet, min_shared: int = 1) -> dict[str, Any]:
    groups = rs.by_prompt()
    k_hist = Counter(len(js[0].line.responses) for js in groups.values())
    per_annotator = Counter(j.line.annotator for j in rs.judgments)
    lines_with_ties = sum(1 for j in rs.judgments if any(len(t) > 1 for t in j.line.tiers()))
    # the contract: text holding control-token markers is counted (training neutralises it, docs/formats.md)
    marked = [j.where for j in rs.judgments if _has_markers(j.line)]
    all_tied = sum(1 for j in rs.judgments if j.line.all_tied())

    w_values: dict[str, float] = {}
    units: list[list[float]] = []
    tau: dict[str, list[float]] = defaultdict(list)
    for pid, js in groups.items():
        ranks = [j.ranks_by_text() for j in js]
        if len(js) >= 2:
            w = kendalls_w(ranks)
            if w is not None:
                w_values[pid] = w
            for text in ranks[0]:
                units.append([r[text] for r in ranks])
            for i, j in enumerate(js):
                others = [r for k, r in enumerate(ranks) if k != i]
                consensus = tier_ranks(borda_consensus(others))
                t = kendall_tau_b(ranks[i], consensus)
                if t is not None:
                    tau[j.line.annotator].append(t)
    alpha = krippendorff_alpha_ordinal(units)
    annotators = {
        a: {
            "judgments": per_annotator[a],
            "shared_prompts": len(tau.get(a, [])),
            "mean_tau_vs_consensus": (sum(tau[a]) / len(tau[a])) if tau.get(a) else None,
        }
        for a in sorted(per_annotator)
    }
    flagged = sorted(
        a
        for a, v in annotators.items()
        if v["mean_tau_vs_consensus"] is not None
        and v["shared_prompts"] >= min_shared
        and v["mean_tau_vs_consensus"] < 0.2
    )
    return {
        "files": [str(f) for f in rs.files],
        "lines_read": rs.report.read,
        "lines_kept": rs.report.kept,
        "lines_dropped": dict(rs.report.dropped),
        "prompts": len(groups),
        "responses_per_prompt": {str(k): v for k, v in sorted(k_hist.items())},
        "judgments_per_annotator": dict(sorted(per_annotator.items())),
        "lines_with_ties": lines_with_ties,
        "lines_all_tied": all_tied,
        "lines_with_control_tokens": len(marked),
        "control_token_lines": marked,
        "conflicts": rs.conflicts,
        "multiply_annotated_prompts": len(w_values),
        "kendalls_w": {
            "mean": (sum(w_values.values()) / len(w_values)) if w_values else None,
            "per_prompt": w_values,
        },
        "krippendorff_alpha_ordinal": alpha,
        "annotators": annotators,
        "flagged_annotators": flagged,
        "problems": rs.report.problems,
    }


def _has_markers(line: RankingLine) -> bool:
    prompt = line.prompt if isinstance(line.prompt, str) else " ".join(m.content for m in line.prompt)
    return bool(control_tokens_in(prompt, COMMON_MARKERS)) or any(
        control_tokens_in(r.text, COMMON_MARKERS) for r in line.responses
    )


# --------------------------------------------------------------------------------------------------------
# Aggregation into training sets
# --------------------------------------------------------------------------------------------------------
def aggregate(rs: RankingSet) -> list[KWiseGroup]:
    """One K-wise group per prompt: consensus tiers over all its annotators (Borda on average ranks)."""
    out = []
    for pid, js in rs.by_prompt().items():
        first = js[0].line
        texts = [r.text for r in first.responses]
        index = {t.strip(): i for i, t in enumerate(texts)}
        ranks = [j.ranks_by_text() for j in js]
        tiers = borda_consensus(ranks)
        out.append(
            KWiseGroup(
                prompt_id=pid,
                prompt=first.prompt_messages(),
                responses=texts,
                tiers=[sorted(index[t] for t in tier) for tier in tiers],
                annotators=len(js),
                agreement=kendalls_w(ranks) if len(js) > 1 else None,
            )
        )
    return out


def implied_pairs_of(tiers: list[list[int]], mode: str = "all") -> list[tuple[int, int]]:
    """(winner, loser) for every two responses in different tiers, best tier first ('all'), or the top tier against
    the rest ('top'); ties form no pair. The one copy: preferences, the reward stage's batches and the reward gate
    all pair a ranking through it."""
    heads = tiers if mode == "all" else tiers[:1]
    return [(a, b) for t, tier in enumerate(heads) for lower in tiers[t + 1 :] for a in tier for b in lower]


def implied_pairs(group: KWiseGroup, mode: str = "all") -> list[tuple[int, int]]:
    """(chosen, rejected) index pairs of a K-wise group (implied_pairs_of its tiers)."""
    return implied_pairs_of(group.tiers, mode)


def split_of(prompt_key: str, fraction: float, seed: int) -> str:
    """Deterministic, prompt-level split: stable across runs and when other prompts are added."""
    h = hashlib.sha256(f"{seed}:{prompt_key}".encode()).digest()
    return "validation" if int.from_bytes(h[:8], "big") / 2**64 < fraction else "train"


def prompt_key(messages: list[dict]) -> str:
    """What a split is keyed on: the prompt's content (roles and trimmed texts), not its id. Imported pairs and
    HH-RLHF rows get one id per (prompt, responses), so keying on the id would put one prompt in both splits and
    let a reward model be scored on prompts it trained on."""
    return json.dumps([[m["role"], m["content"].strip()] for m in messages], ensure_ascii=False)


# --------------------------------------------------------------------------------------------------------
# Converters into the ranking format
# --------------------------------------------------------------------------------------------------------
def _pid(prefix: str, *parts: str) -> str:
    return f"{prefix}-" + hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def _response_text(x) -> str | None:
    if isinstance(x, str):
        return x
    if isinstance(x, list) and x and isinstance(x[-1], dict) and x[-1].get("role") == "assistant":
        return x[-1].get("content")
    return None


def convert_pairwise(row: dict, annotator: str) -> list[dict]:
    """TRL preference rows: explicit {prompt, chosen, rejected} or implicit (chosen/rejected hold the prompt)."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if chosen is None or rejected is None:
        raise ValueError("chosen/rejected: both fields are required")
    if "prompt" in row:
        prompt = chat_messages(row["prompt"])
        a, b = _response_text(chosen), _response_text(rejected)
    else:
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise ValueError("prompt: missing (rows without a prompt need chosen/rejected as message lists)")
        if chosen[:-1] != rejected[:-1]:
            raise ValueError("chosen/rejected: the conversations differ before their last message")
        prompt = chat_messages(chosen[:-1], "chosen")
        a, b = _response_text(chosen), _response_text(rejected)
    if a is None or b is None:
        raise ValueError("chosen/rejected: must be strings or message lists ending with an assistant message")
    ptxt = json.dumps(prompt, sort_keys=True)
    return [
        {
            "prompt_id": _pid("pw", ptxt, a, b),
            "prompt": prompt if len(prompt) > 1 or prompt[0]["role"] != "user" else prompt[0]["content"],
            "responses": [{"id": "chosen", "text": a}, {"id": "rejected", "text": b}],
            "ranking": ["chosen", "rejected"],
            "annotator": str(row.get("annotator") or annotator),
        }
    ]


def read_pairs(
    path: Path, validation_fraction: float, seed: int
) -> tuple[list[dict], list[dict], LoadReport]:
    """(train, held-out, report) of TRL preference rows ({prompt, chosen, rejected}, or chosen/rejected message
    lists sharing the prompt: convert_pairwise) from a file or a dataset folder, as ranking lines of two responses,
    chosen first. Held out: the folder's validation split (any of its names: core.readers.SPLIT_NAMES), else the
    prompts split_of puts there. Every row that is not a preference pair is named with its file and line."""
    report = LoadReport()
    path = Path(path)
    own_split = path.is_dir() and has_split(path, "validation")

    def lines(split: str):
        for where, row in iter_dataset_rows(path, report, split):
            try:
                (line,) = convert_pairwise(row, "pairs")
            except ValueError as e:
                report.drop(where, "invalid", str(e))
                continue
            report.kept += 1
            yield line

    train, val = [], []
    for line in lines("train"):
        held = not own_split and split_of(
            prompt_key(chat_messages(line["prompt"])), validation_fraction, seed
        )
        (val if held == "validation" else train).append(line)
    if own_split:
        val = list(lines("validation"))
    return train, val, report


def kwise_of_pair(line: dict) -> dict:
    """A two-response ranking line (read_pairs) as a K-wise group row, as `align data build-preferences` writes
    them: the chosen response in the first tier."""
    return KWiseGroup(
        prompt_id=line["prompt_id"], prompt=chat_messages(line["prompt"]),
        responses=[r["text"] for r in line["responses"]], tiers=[[0], [1]], annotators=1, agreement=None,
    ).model_dump(mode="json")  # fmt: skip


_HUMAN, _ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def _hh_turns(transcript: str) -> list[dict]:
    turns: list[dict] = []
    rest = transcript
    while rest:
        h, a = rest.find(_HUMAN), rest.find(_ASSISTANT)
        starts = [(i, tag) for i, tag in ((h, _HUMAN), (a, _ASSISTANT)) if i >= 0]
        if not starts:
            if turns:
                turns[-1]["content"] += rest
            break
        i, tag = min(starts)
        if turns:
            turns[-1]["content"] += rest[:i]
        turns.append({"role": "user" if tag == _HUMAN else "assistant", "content": ""})
        rest = rest[i + len(tag) :]
    merged: list[dict] = []
    for t in turns:  # a few transcripts have two turns of one speaker in a row: join them, keep the row
        t["content"] = t["content"].strip()
        if merged and merged[-1]["role"] == t["role"]:
            merged[-1]["content"] = f"{merged[-1]['content']}\n\n{t['content']}".strip()
        else:
            merged.append(t)
    return merged


def convert_hh(row: dict, annotator: str) -> list[dict]:
    """Anthropic HH-RLHF: the prompt is everything up to the last '\\n\\nAssistant:' of each transcript."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise ValueError("chosen/rejected: must both be transcript strings")
    ci, ri = chosen.rfind(_ASSISTANT), rejected.rfind(_ASSISTANT)
    if ci < 0 or ri < 0:
        raise ValueError("chosen/rejected: no '\\n\\nAssistant:' turn found")
    if chosen[:ci] != rejected[:ri]:
        raise ValueError("chosen/rejected: the transcripts differ before the last Assistant turn")
    prompt = _hh_turns(chosen[:ci])
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError(
            "chosen: the transcript does not end with a Human turn before the last Assistant turn"
        )
    a, b = chosen[ci + len(_ASSISTANT) :].strip(), rejected[ri + len(_ASSISTANT) :].strip()
    return [
        {
            "prompt_id": _pid("hh", chosen[:ci], a, b),
            "prompt": prompt,
            "responses": [{"id": "chosen", "text": a}, {"id": "rejected", "text": b}],
            "ranking": ["chosen", "rejected"],
            "annotator": annotator,
        }
    ]


def convert_oasst(tree: dict, annotator: str) -> list[dict]:
    """OpenAssistant message trees: every prompter message with >= 2 ranked assistant replies (rank 0 = best).

    The prompt is the thread from the root to that message. Replies without a rank, and deleted ones, are left
    out (OASST ranks are already a consensus of several rankers; `annotator` names that source).
    """
    root = tree.get("prompt")
    if not isinstance(root, dict):
        raise ValueError("prompt: an OpenAssistant tree needs a 'prompt' message object")
    out: list[dict] = []

    def message_id(node: dict, where: str) -> str:
        mid = node.get("message_id")
        if not isinstance(mid, str) or not mid:
            raise ValueError(f"{where}.message_id: required (a non-empty string) on every ranked message")
        return mid

    def walk(node: dict, thread: list[dict], where: str) -> None:
        if len(thread) > 64:
            raise ValueError(f"{where}: the thread is nested too deeply (limit 64 turns)")
        role = "user" if node.get("role") == "prompter" else "assistant"
        here = [*thread, {"role": role, "content": node.get("text", "")}]
        raw = node.get("replies") or []
        if not isinstance(raw, list):
            raise ValueError(f"{where}.replies: must be a list of message objects")
        replies = [r for r in raw if isinstance(r, dict) and not r.get("deleted")]
        if role == "user":
            ranked = [
                r
                for r in replies
                if isinstance(r.get("rank"), int)
                and not isinstance(r.get("rank"), bool)
                and isinstance(r.get("text"), str)
                and r["text"].strip()
            ]
            if len(ranked) >= 2:
                by_rank: dict[int, list[str]] = defaultdict(list)
                for k, r in enumerate(ranked):
                    by_rank[r["rank"]].append(message_id(r, f"{where}.replies[{k}]"))
                ranking = [ids[0] if len(ids) == 1 else ids for _, ids in sorted(by_rank.items())]
                out.append(
                    {
                        "prompt_id": message_id(node, where),
                        "prompt": here if len(here) > 1 else here[0]["content"],
                        "responses": [{"id": r["message_id"], "text": r["text"]} for r in ranked],
                        "ranking": ranking,
                        "annotator": annotator,
                    }
                )
        for k, r in enumerate(replies):
            walk(r, here, f"{where}.replies[{k}]")

    walk(root, [], "prompt")
    return out


def convert_scores(row: dict, annotator: str) -> list[dict]:
    """Per-response scores (Likert): higher is better; equal scores become ties."""
    scores = row.get("scores")
    if not isinstance(scores, dict) or not scores:
        raise ValueError("scores: must be an object mapping response id to a number")
    responses = row.get("responses") or []
    ids = [r.get("id") for r in responses if isinstance(r, dict)]
    missing = [i for i in ids if i not in scores]
    if missing:
        raise ValueError(f"scores: no score for response(s) {missing}")
    extra = [i for i in scores if i not in ids]
    if extra:
        raise ValueError(f"scores: score(s) for unknown response id(s) {extra}")
    for i, s in scores.items():
        if isinstance(s, bool) or not isinstance(s, int | float):
            raise ValueError(f"scores.{i}: must be a number, got {type(s).__name__}")
        if not math.isfinite(s):  # NaN compares false with everything: it would give an arbitrary ranking
            raise ValueError(f"scores.{i}: must be a finite number, got {s}")
    tiers: dict[float, list[str]] = defaultdict(list)
    for i in ids:
        tiers[float(scores[i])].append(i)
    ranking = [t[0] if len(t) == 1 else t for _, t in sorted(tiers.items(), reverse=True)]
    line = {k: v for k, v in row.items() if k != "scores"}
    line["ranking"] = ranking
    line.setdefault("annotator", annotator)
    return [line]


CONVERTERS = {
    "pairwise": convert_pairwise,
    "hh-rlhf": convert_hh,
    "oasst": convert_oasst,
    "scores": convert_scores,
}


def import_rankings(fmt: str, inputs: list[Path], out: Path, annotator: str | None = None) -> LoadReport:
    """Convert files into ranking JSONL; every produced line is validated against the contract first."""

    convert = CONVERTERS[fmt]
    refuse_overwriting_input(out, inputs)
    report = LoadReport()
    lines: list[str] = []
    for path in inputs:
        name = annotator or f"import:{fmt}:{Path(path).stem}"
        for lineno, row in iter_rows(Path(path), report):
            where = f"{path}:{lineno}"
            try:
                produced = convert(row, name)
            except ValueError as e:
                report.drop(where, "not_convertible", str(e))
                continue
            except (KeyError, IndexError, TypeError, AttributeError, RecursionError) as e:
                # a shape the converter did not foresee: still a named row, never a traceback
                report.drop(where, "not_convertible", f"not a {fmt} row ({type(e).__name__}: {str(e)[:120]})")
                continue
            if not produced:  # e.g. an OpenAssistant tree with no message that has two ranked replies
                report.drop(where, "nothing_to_import", f"holds no {fmt} judgment to import (nothing ranked)")
                continue
            kept = 0
            for obj in produced:
                try:
                    RankingLine.model_validate(obj)
                except ValidationError as e:
                    kind, msg = _problem(e)
                    report.drop(where, kind, msg)
                    continue
                lines.append(json.dumps(obj, ensure_ascii=False))
                kept += 1
            report.kept += int(kept > 0)
            report.examples_from_rows += kept
    if lines:  # a failed import (nothing converted) leaves an existing --out as it was
        atomic_write_text(out, "".join(x + "\n" for x in lines))
    return report


# --------------------------------------------------------------------------------------------------------
# `align data build-preferences`
# --------------------------------------------------------------------------------------------------------
