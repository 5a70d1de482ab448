"""`align data build`: instruction files -> a cleaned, deduplicated, split `datasets` folder (the data stage).

Reads every input with core/readers.py (every bad row named, every good row kept), then: drops assistant
answers shorter than min_chars; neutralises or rejects control-token text; scrubs PII (optional); removes exact
duplicates (normalised text hash) and near duplicates (MinHash + LSH, verified by exact Jaccard); measures token
lengths with the model's own chat template and drops examples over max_tokens; splits train/validation
(stratified, seeded); writes dataset/, report.md, lengths.png and the manifest.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.chat import (
    COMMON_MARKERS,
    chat_text,
    control_tokens_in,
    neutralise_messages,
    special_strings,
)
from core.config import UserError
from core.manifest import atomic_write_text, replace_dir
from core.progress import steps
from core.readers import LoadReport, iter_conversations
from core.stage import StageContext, StageResult, print_skipped
from data_schemas.config import DataBuildConfig, ModelConfig
from stages.registry import STAGES

# ==========================================================================================================
# `align data build`: instruction files -> cleaned, deduplicated, split dataset folder
# ==========================================================================================================

_PII = [
    ("email", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b"), "[EMAIL]"),
    ("ip", re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b"), "[IP]"),
    ("card", re.compile(r"\b(?:\d[ -]?){12,18}\d\b"), "[CARD]"),
    # not part of a longer digit run (a 16-digit non-card number must not half-match as a phone)
    ("phone", re.compile(r"(?<![\w.])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{3,4}[ .-]\d{3,4}(?:[ .-]\d{2,4})?(?!\w)(?![ .-]?\d)"), "[PHONE]"),
]  # fmt: skip


def _luhn_ok(digits: str) -> bool:
    total, alt = 0, False
    for ch in reversed(digits):
        d = int(ch)
        if alt:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
        alt = not alt
    return total % 10 == 0


def scrub_pii(text: str, counts: Counter) -> str:
    """Replace emails, IPv4 addresses, card numbers (Luhn-valid, 13-19 digits) and phone numbers; count each."""
    for kind, pattern, repl in _PII:

        def sub(m, kind=kind, repl=repl):
            if kind == "card" and not _luhn_ok(re.sub(r"\D", "", m.group())):
                return m.group()
            counts[kind] += 1
            return repl

        text = pattern.sub(sub, text)
    return text


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _shingles(text: str, n: int = 3) -> set[str]:
    words = _normalise(text).split()
    if len(words) <= n:
        return {" ".join(words)}
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


class NearDuplicateIndex:
    """MinHash + LSH (Broder 1997; Leskovec et al., Mining of Massive Datasets ch. 3).

    Each document's shingles (word 3-grams) are hashed (crc32, deterministic across runs) and min-hashed under
    `num_perm` universal hash functions h(x) = (a x + b) mod p. The signature is cut into `bands` bands; two
    documents sharing any band become a candidate pair, and a candidate is a duplicate only if the exact Jaccard
    similarity of the shingle sets is at least `threshold`. Work is linear in the corpus (plus candidates).
    """

    _P = (1 << 31) - 1  # Mersenne prime: a, h < 2^31 so a*h + b < 2^63 fits uint64 exactly

    def __init__(self, num_perm: int, bands: int, threshold: float, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, self._P, size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, self._P, size=num_perm, dtype=np.uint64)
        self.rows = num_perm // bands
        self.bands = bands
        self.threshold = threshold
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
        self.sets: list[set[str]] = []
        self._ids: list[int] = []

    def signature(self, shingles: set[str]) -> np.ndarray:
        """MinHash signature [num_perm] of a shingle set."""
        h = np.fromiter((zlib.crc32(s.encode()) for s in shingles), dtype=np.uint64, count=len(shingles))
        h %= np.uint64(self._P)
        return ((h[:, None] * self.a + self.b) % np.uint64(self._P)).min(axis=0)

    def add_if_new(self, idx: int, shingles: set[str]) -> int | None:
        """Register a document unless it near-duplicates an earlier one; return that earlier one's index."""
        sig = self.signature(shingles)
        keys = [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]
        seen: set[int] = set()
        for band, key in enumerate(keys):
            for j in self.buckets[band].get(key, ()):
                if j in seen:
                    continue
                seen.add(j)
                other = self.sets[j]
                inter = len(shingles & other)
                if inter and inter / (len(shingles) + len(other) - inter) >= self.threshold:
                    return j
        pos = len(self.sets)
        self.sets.append(shingles)
        for band, key in enumerate(keys):
            self.buckets[band].setdefault(key, []).append(pos)
        self._ids.append(idx)
        return None

    def original(self, pos: int) -> int:
        return self._ids[pos]


def _conv_text(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _split_indices(strata: list[str | None], fraction: float, seed: int) -> set[int]:
    """Validation indices: a seeded shuffle per stratum, round(n * fraction) from each."""
    groups: dict[str | None, list[int]] = {}
    for i, s in enumerate(strata):
        groups.setdefault(s, []).append(i)
    val: set[int] = set()
    rng = random.Random(seed)
    for key in sorted(groups, key=lambda k: (k is None, str(k))):
        idx = groups[key]
        rng.shuffle(idx)
        val.update(idx[: round(len(idx) * fraction)])
    return val


@dataclass
class Build:
    """What one data build has found so far: the kept examples (with their split strata and token lengths) and
    every dropped row, edit and PII replacement, counted by reason."""

    report: LoadReport = field(default_factory=LoadReport)
    dropped_rows: dict[str, list[str]] = field(default_factory=dict)  # reason -> every "file:line: message"
    edits: Counter = field(default_factory=Counter)
    pii: Counter = field(default_factory=Counter)
    kept: list[dict] = field(default_factory=list)
    strata: list[str | None] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)

    def drop(self, where: str, reason: str, message: str) -> None:
        self.report.drop(where, reason, message)
        self.dropped_rows.setdefault(reason, []).append(f"{where}: {message}")


def run(cfg: DataBuildConfig, resume: bool = False, force: bool = False, callbacks=()) -> StageResult:
    """Run `align data build`. Every bad row is named (file:line: field: reason) in the manifest's counts."""
    ctx = StageContext(cfg, resume, force, STAGES[cfg.stage], callbacks)
    if ctx.finished:
        return ctx.existing_result()
    t0 = time.perf_counter()
    tokenizer, specials = None, list(COMMON_MARKERS)
    if cfg.tokenizer:
        from core.models import load_tokenizer  # lazy: loads transformers

        tokenizer = load_tokenizer(ModelConfig(name_or_path=cfg.tokenizer))
        specials = sorted(set(specials) | set(special_strings(tokenizer)), key=len, reverse=True)
    b = Build()
    read_and_clean(cfg, b, specials)
    if tokenizer is not None:
        measure_lengths(cfg, b, tokenizer)
    if not b.kept:
        raise UserError(
            f"no usable examples in {[str(p) for p in cfg.inputs]}: " + "; ".join(b.report.problems[:3])
        )
    if cfg.strict and b.report.dropped:
        print_skipped(b.report.problems, show=50, what="rejected")
        raise UserError(
            f"--strict: {sum(b.report.dropped.values())} row(s) dropped ({dict(b.report.dropped)}); nothing written"
        )
    val_idx = _split_indices(b.strata, cfg.validation_fraction, cfg.seed)
    if cfg.stratify_by is not None:
        for ex, st in zip(b.kept, b.strata, strict=True):
            ex[cfg.stratify_by] = st
    train = [ex for i, ex in enumerate(b.kept) if i not in val_idx]
    val = [ex for i, ex in enumerate(b.kept) if i in val_idx]
    with ctx.open(inputs=[(p, "instructions") for p in cfg.inputs]):
        return _write(ctx, cfg, b, train, val, t0)


def read_and_clean(cfg: DataBuildConfig, b: Build, specials: list[str]) -> None:
    """Read every input; drop short answers, control-token rows (when rejecting) and duplicates; neutralise
    control tokens and scrub PII (when asked). Each drop is named with the row's file and line."""
    exact_seen: dict[str, str] = {}
    near = (
        NearDuplicateIndex(cfg.dedup.num_perm, cfg.dedup.bands, cfg.dedup.threshold)
        if cfg.dedup.near
        else None
    )
    wheres: list[str] = []
    with steps("data build: rows read", None) as advance:  # streamed: a count, no end known
        for path in cfg.inputs:
            for where, row, conv in iter_conversations(Path(path), cfg.shape, cfg.system_prompt, b.report):
                advance()
                msgs = [{"role": m.role, "content": m.content.strip()} for m in conv.messages]
                answer = " ".join(m["content"] for m in msgs if m["role"] == "assistant")
                if len(answer) < cfg.min_chars:
                    b.drop(
                        where,
                        "too_short",
                        f"assistant text has {len(answer)} characters (min_chars {cfg.min_chars})",
                    )
                    continue
                found = sorted({s for m in msgs for s in control_tokens_in(m["content"], specials)})
                if found:
                    if cfg.control_tokens == "reject":
                        b.drop(
                            where,
                            "control_tokens",
                            f"contains control token(s) {found}; rejected (control_tokens: reject)",
                        )
                        continue
                    b.edits["neutralised_control_tokens"] += 1
                    msgs = neutralise_messages(msgs, specials)
                if cfg.pii:
                    before = sum(b.pii.values())
                    msgs = [{**m, "content": scrub_pii(m["content"], b.pii)} for m in msgs]
                    b.edits["rows_with_pii_scrubbed"] += int(sum(b.pii.values()) > before)
                text = _conv_text(msgs)
                if cfg.dedup.exact:
                    key = hashlib.sha1(_normalise(text).encode()).hexdigest()
                    if key in exact_seen:
                        b.drop(where, "exact_duplicate", f"same text as {exact_seen[key]}")
                        continue
                    exact_seen[key] = where
                if near is not None:
                    dup = near.add_if_new(len(b.kept), _shingles(text))
                    if dup is not None:
                        b.drop(
                            where,
                            "near_duplicate",
                            f"near duplicate (Jaccard >= {cfg.dedup.threshold}) of {wheres[near.original(dup)]}",
                        )
                        continue
                b.kept.append({"messages": msgs, "source": where})
                wheres.append(where)
                b.strata.append(None if cfg.stratify_by is None else str(row.get(cfg.stratify_by)))


def measure_lengths(cfg: DataBuildConfig, b: Build, tokenizer) -> None:
    """Token lengths with the model's own chat template (what the trainer will see); drop those over max_tokens.

    Every template is rendered to text, then tokenized in batches: the fast tokenizer runs a batch in parallel and
    the per-call overhead (about 0.3 ms) is paid once per batch, not per row."""
    texts = [chat_text(tokenizer, ex["messages"]) for ex in b.kept]
    counts: list[int] = []
    for i in range(0, len(texts), 2048):
        counts.extend(len(x) for x in tokenizer(texts[i : i + 2048], add_special_tokens=False)["input_ids"])
    kept, strata = [], []
    for ex, st, n in zip(b.kept, b.strata, counts, strict=True):
        if cfg.max_tokens is not None and n > cfg.max_tokens:
            b.drop(
                ex["source"], "too_long", f"{n} tokens after the chat template (max_tokens {cfg.max_tokens})"
            )
            continue
        ex["num_tokens"] = n
        b.lengths.append(n)
        kept.append(ex)
        strata.append(st)
    b.kept, b.strata = kept, strata


def _write(ctx: StageContext, cfg: DataBuildConfig, b: Build, train: list[dict], val: list[dict], t0: float):
    """dataset/ (train and validation splits), lengths.png, report.md; then the manifest 'complete'."""
    out = ctx.out
    invalid = sum(
        v
        for k, v in b.report.dropped.items()
        if k not in ("exact_duplicate", "near_duplicate", "too_long", "too_short")
    )
    from datasets import Dataset, DatasetDict

    parts = {"train": Dataset.from_list(train)}
    if val:
        parts["validation"] = Dataset.from_list(val)
    replace_dir(lambda p: DatasetDict(parts).save_to_disk(str(p)), out / "dataset")

    ctx.counts = {
        **b.report.as_dict(),
        "problems": b.report.problems,
        "examples_kept": len(b.kept),
        "train": len(train),
        "validation": len(val),
        "invalid_rows": invalid,
        "edits": dict(b.edits),
        "pii": dict(b.pii),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if b.lengths:
        n = b.lengths
        ctx.counts["tokens"] = {"min": min(n), "max": max(n), "mean": sum(n) / len(n)}
        _length_plot(n, out / "lengths.png", cfg.max_tokens)
    atomic_write_text(out / "report.md", _build_report(cfg, ctx.counts, b.dropped_rows, bool(b.lengths)))
    return ctx.complete({"examples": len(b.kept), "train": len(train), "validation": len(val)})


def _length_plot(lengths: list[int], path: Path, limit: int | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
    ax.hist(lengths, bins=min(60, max(10, len(set(lengths)))), color="#3b6ea8")
    if limit:
        ax.axvline(limit, color="#b33", linestyle="--", label=f"max_tokens {limit}")
        ax.legend()
    ax.set_xlabel("tokens per example (chat template applied)")
    ax.set_ylabel("examples")
    ax.set_title("Example lengths after cleaning")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _build_report(cfg, counts: dict, dropped_examples: dict[str, list[str]], plot: bool) -> str:
    lines = ["# Data build report", "", f"Inputs: {', '.join(f'`{p}`' for p in cfg.inputs)}", ""]
    lines += [
        "| rows read | rows kept | examples kept | train | validation |",
        "|---|---|---|---|---|",
        f"| {counts['rows_read']} | {counts['rows_kept']} | {counts['examples_kept']} | {counts['train']} | {counts['validation']} |",
        "",
        "## Dropped, by reason",
        "",
    ]
    if counts["dropped"]:
        lines += ["| reason | count |", "|---|---|"] + [
            f"| {k} | {v} |" for k, v in sorted(counts["dropped"].items())
        ]
    else:
        lines.append("Nothing was dropped.")
    lines += ["", "## Edits", ""]
    lines.append(
        f"- control tokens neutralised: {counts['edits'].get('neutralised_control_tokens', 0)} example(s)"
    )
    lines.append(f"- PII scrubbed ({'on' if cfg.pii else 'off'}): {counts['pii'] or 'none found'}")
    if plot:
        t = counts["tokens"]
        lines += [
            "",
            "## Lengths",
            "",
            f"min {t['min']}, mean {t['mean']:.1f}, max {t['max']} tokens",
            "",
            "![lengths](lengths.png)",
        ]
    if dropped_examples:
        lines += ["", "## Dropped rows", ""]
        for reason, items in sorted(dropped_examples.items()):
            lines.append(f"**{reason}**")
            lines += [f"- `{x}`" for x in items]
            lines.append("")
    lines += [
        "",
        f"Near-duplicate method: MinHash ({cfg.dedup.num_perm} permutations, {cfg.dedup.bands} bands) over word 3-grams, verified by exact Jaccard >= {cfg.dedup.threshold}.",
        "",
    ]
    return "\n".join(lines)
