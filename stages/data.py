"""`align data build`: instruction files -> a cleaned, deduplicated, split `datasets` folder (the data stage).

Reads every input with align/readers.py (every bad row named, every good row kept), then: drops assistant
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
from pathlib import Path

import numpy as np

from align.chat import COMMON_MARKERS, control_tokens_in, neutralise, special_strings
from align.config import UserError
from align.manifest import atomic_write_text, replace_dir
from align.readers import LoadReport, iter_conversations
from align.stage import StageContext, StageResult, print_skipped
from data_schemas.config import DataBuildConfig, ModelConfig

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


def run(cfg: DataBuildConfig, resume: bool = False, force: bool = False) -> StageResult:
    """Run `align data build`. Every bad row is named (file:line: field: reason) in the manifest's counts."""
    ctx = StageContext(cfg, resume, force)
    if ctx.finished:
        return ctx.existing_result()
    t0 = time.perf_counter()
    report = LoadReport()
    dropped_examples: dict[str, list[str]] = {}

    def drop(where: str, reason: str, message: str) -> None:
        report.drop(where, reason, message)
        dropped_examples.setdefault(reason, []).append(f"{where}: {message}")  # all of them go into report.md

    tokenizer = None
    specials = list(COMMON_MARKERS)
    if cfg.tokenizer:
        from align.models import load_tokenizer

        tokenizer = load_tokenizer(ModelConfig(name_or_path=cfg.tokenizer))
        specials = sorted(set(specials) | set(special_strings(tokenizer)), key=len, reverse=True)

    pii_counts: Counter = Counter()
    edits: Counter = Counter()
    exact_seen: dict[str, str] = {}
    near = (
        NearDuplicateIndex(cfg.dedup.num_perm, cfg.dedup.bands, cfg.dedup.threshold)
        if cfg.dedup.near
        else None
    )
    kept: list[dict] = []
    wheres: list[str] = []
    strata: list[str | None] = []
    for path in cfg.inputs:
        path = Path(path)
        if not path.exists():
            raise UserError(f"{path}: input file not found")
        for where, row, conv in iter_conversations(path, cfg.shape, cfg.system_prompt, report):
            msgs = [{"role": m.role, "content": m.content.strip()} for m in conv.messages]
            answer = " ".join(m["content"] for m in msgs if m["role"] == "assistant")
            if len(answer) < cfg.min_chars:
                drop(
                    where,
                    "too_short",
                    f"assistant text has {len(answer)} characters (min_chars {cfg.min_chars})",
                )
                continue
            found = sorted({s for m in msgs for s in control_tokens_in(m["content"], specials)})
            if found:
                if cfg.control_tokens == "reject":
                    drop(
                        where,
                        "control_tokens",
                        f"contains control token(s) {found}; rejected (control_tokens: reject)",
                    )
                    continue
                edits["neutralised_control_tokens"] += 1
                msgs = [{**m, "content": neutralise(m["content"], specials)} for m in msgs]
            if cfg.pii:
                before = sum(pii_counts.values())
                msgs = [{**m, "content": scrub_pii(m["content"], pii_counts)} for m in msgs]
                edits["rows_with_pii_scrubbed"] += int(sum(pii_counts.values()) > before)
            text = _conv_text(msgs)
            if cfg.dedup.exact:
                key = hashlib.sha1(_normalise(text).encode()).hexdigest()
                if key in exact_seen:
                    drop(where, "exact_duplicate", f"same text as {exact_seen[key]}")
                    continue
                exact_seen[key] = where
            if near is not None:
                dup = near.add_if_new(len(kept), _shingles(text))
                if dup is not None:
                    drop(
                        where,
                        "near_duplicate",
                        f"near duplicate (Jaccard >= {cfg.dedup.threshold}) of {wheres[near.original(dup)]}",
                    )
                    continue
            kept.append({"messages": msgs, "source": where})
            wheres.append(where)
            strata.append(None if cfg.stratify_by is None else str(row.get(cfg.stratify_by)))

    # token lengths with the model's own chat template (the length the trainer will see)
    lengths: list[int] = []
    if tokenizer is not None:
        final, final_strata = [], []
        # Render every template to text, then tokenize in batches: the fast tokenizer runs a batch in
        # parallel and the per-call overhead (about 0.3 ms) is paid once per batch, not per row.
        texts = [tokenizer.apply_chat_template(ex["messages"], tokenize=False) for ex in kept]
        counts_tok: list[int] = []
        for b in range(0, len(texts), 2048):
            enc = tokenizer(texts[b : b + 2048], add_special_tokens=False)["input_ids"]
            counts_tok.extend(len(x) for x in enc)
        for ex, st, n in zip(kept, strata, counts_tok, strict=True):
            if cfg.max_tokens is not None and n > cfg.max_tokens:
                drop(
                    ex["source"],
                    "too_long",
                    f"{n} tokens after the chat template (max_tokens {cfg.max_tokens})",
                )
                continue
            ex["num_tokens"] = n
            lengths.append(n)
            final.append(ex)
            final_strata.append(st)
        kept, strata = final, final_strata
    invalid = sum(
        v
        for k, v in report.dropped.items()
        if k not in ("exact_duplicate", "near_duplicate", "too_long", "too_short")
    )
    if not kept:
        raise UserError(
            f"no usable examples in {[str(p) for p in cfg.inputs]}: " + "; ".join(report.problems[:3])
        )
    if cfg.strict and report.dropped:
        print_skipped(report.problems, show=50, what="rejected")
        raise UserError(
            f"--strict: {sum(report.dropped.values())} row(s) dropped ({dict(report.dropped)}); nothing written"
        )

    val_idx = _split_indices(strata, cfg.validation_fraction, cfg.seed)
    train = [ex for i, ex in enumerate(kept) if i not in val_idx]
    val = [ex for i, ex in enumerate(kept) if i in val_idx]
    if cfg.stratify_by is not None:
        for ex, st in zip(kept, strata, strict=True):
            ex[cfg.stratify_by] = st

    with ctx.open(inputs=[(p, "instructions") for p in cfg.inputs]):
        return _write(
            ctx, cfg, report, kept, train, val, lengths, invalid, edits, pii_counts, dropped_examples, t0
        )


def _write(ctx, cfg, report, kept, train, val, lengths, invalid, edits, pii_counts, dropped_examples, t0):
    """dataset/ (train and validation splits), lengths.png, report.md; then the manifest 'complete'."""
    out = ctx.out
    from datasets import Dataset, DatasetDict

    parts = {"train": Dataset.from_list(train)}
    if val:
        parts["validation"] = Dataset.from_list(val)
    replace_dir(lambda p: DatasetDict(parts).save_to_disk(str(p)), out / "dataset")

    ctx.counts = {
        **report.as_dict(),
        "problems": report.problems,
        "examples_kept": len(kept),
        "train": len(train),
        "validation": len(val),
        "invalid_rows": invalid,
        "edits": dict(edits),
        "pii": dict(pii_counts),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if lengths:
        ctx.counts["tokens"] = {"min": min(lengths), "max": max(lengths), "mean": sum(lengths) / len(lengths)}
        _length_plot(lengths, out / "lengths.png", cfg.max_tokens)
    atomic_write_text(out / "report.md", _build_report(cfg, ctx.counts, dropped_examples, bool(lengths)))
    return ctx.complete({"examples": len(kept), "train": len(train), "validation": len(val)})


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
