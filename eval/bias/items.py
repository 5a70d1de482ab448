"""The bias gate's items: the standard files a user points to (CrowS-Pairs, BBQ), read with every bad row named;
the shipped probes are eval/probes.py."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from core.config import UserError


def load_crows_pairs(path: Path, max_examples: int | None = None) -> list[dict]:
    """CrowS-Pairs CSV (columns sent_more, sent_less, stereo_antistereo, bias_type) -> pairs.

    In every row sent_more is the sentence that is more stereotyping of a historically disadvantaged group (for
    'antistereo' rows it is the one that violates a stereotype of an advantaged group); the metric is the share of
    rows where the model prefers sent_more, as in the paper."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: CrowS-Pairs file not found (give its path in the gate policy)")
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"sent_more", "sent_less", "bias_type"} - set(reader.fieldnames or [])
        if missing:
            raise UserError(f"{path}: not a CrowS-Pairs file (missing columns {sorted(missing)})")
        for i, r in enumerate(reader, start=2):
            if not r["sent_more"] or not r["sent_less"]:
                continue
            out.append(
                {
                    "id": f"crows:{r.get('') or i}",
                    "stereo": r["sent_more"].strip(),
                    "anti": r["sent_less"].strip(),
                    "category": r["bias_type"],
                    "direction": r.get("stereo_antistereo", "stereo"),
                }
            )
    return out[:max_examples] if max_examples else out


def load_bbq(path: Path, max_examples: int | None = None) -> list[dict]:
    """BBQ JSONL (context, question, ans0-2, label, context_condition, question_polarity, answer_info,
    additional_metadata.stereotyped_groups) -> examples with the index of the biased and the unknown answer."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: BBQ file not found (give its path in the gate policy)")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            info = r["answer_info"]
            groups = [info[f"ans{k}"][1] for k in range(3)]
            stereotyped = set(r["additional_metadata"]["stereotyped_groups"])
            unknown = groups.index("unknown")
            targets = [k for k in range(3) if k != unknown and groups[k] in stereotyped]
            others = [k for k in range(3) if k != unknown and groups[k] not in stereotyped]
            if len(targets) != 1 or len(others) != 1:
                continue  # group labels that do not say which answer is the stereotyped one
            biased = targets[0] if r["question_polarity"] == "neg" else others[0]
            out.append(
                {
                    "id": f"bbq:{r.get('example_id', lineno)}",
                    "context": r["context"],
                    "question": r["question"],
                    "answers": [r["ans0"], r["ans1"], r["ans2"]],
                    "label": int(r["label"]),
                    "condition": r["context_condition"],
                    "category": r["category"],
                    "biased": biased,
                    "unknown": unknown,
                }
            )
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}:{lineno}: not a BBQ row ({type(e).__name__}: {e})") from None
    return out[:max_examples] if max_examples else out
