"""Verifiers: rewards a program computes from the response alone or against the row's reference.

- contains / frequency: a text in the response (1/0), or its occurrences per character (dense).
- exact_answer: the response's final answer against the row's reference answer. The final answer is the last
  `\\boxed{...}`, else what follows the last `####` (GSM8K's marker), "final answer" or "answer is"/"answer:", else
  (numeric references) the last number in the response. Both sides are normalised: case, spaces, surrounding `$`
  and `**`, a trailing period, thousands separators. Two numbers (integers, decimals, fractions `a/b`,
  percentages) are equal within a relative tolerance; otherwise the normalised strings must be equal. Rows without a
  reference get None (the reward does not apply).
- regex: the pattern anywhere in the response (or the whole response), 1/0.
- json_schema: the response (whole, or its last ```json fenced block) parses as JSON and validates under the schema
  (`jsonschema`, the schema's own draft), 1/0.
"""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction
from pathlib import Path

import jsonschema

from core.config import UserError


def contains(spec, ctx):
    text = spec.text.lower()
    return lambda prompts, completions, columns: [1.0 if text in c.lower() else 0.0 for c in completions]


def frequency(spec, ctx):
    text = spec.text.lower()
    return lambda prompts, completions, columns: [c.lower().count(text) / max(len(c), 1) for c in completions]


# ---------------------------------------------------------------------------------------------------------------
# exact answer
# ---------------------------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?%?|[-+]?\.\d+%?")
_MARKERS = re.compile(r"(?:####|final answer\s*(?:is)?\s*:?|answer\s*(?:is|:))", re.IGNORECASE)


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def final_answer(text: str, numeric: bool) -> str | None:
    """The answer a response ends on (see the module docstring), or None when it gives none."""
    boxed = _boxed(text)
    if boxed is not None:
        return boxed
    marks = list(_MARKERS.finditer(text))
    if marks:
        tail = text[marks[-1].end() :].strip()
        line = tail.splitlines()[0] if tail else ""
        if numeric:
            m = _NUMBER.search(line)
            if m:
                return m.group(0)
        return line or None
    if numeric:
        found = _NUMBER.findall(text)
        return found[-1] if found else None
    return None


def normalise_answer(text: str) -> str:
    t = text.strip().strip("*").strip()
    t = t.strip("$").strip()
    t = re.sub(r"\\text\{([^}]*)\}", r"\1", t)
    t = re.sub(r"\\d?frac\{([^}]*)\}\{([^}]*)\}", r"\1/\2", t)  # \frac{1}{2} -> 1/2
    t = t.replace("\\!", "").replace("\\,", "")
    t = t.rstrip(".").strip().lower()
    return " ".join(t.split())


def as_number(text: str) -> float | None:
    """A number written as an integer, decimal, fraction or percentage (thousands separators allowed), else None."""
    t = normalise_answer(text).replace(" ", "")
    percent = t.endswith("%")
    t = t.rstrip("%")
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", t):
        t = t.replace(",", "")
    try:
        x = float(Fraction(t)) if "/" in t else float(t)
    except (ValueError, ZeroDivisionError):
        return None
    if not math.isfinite(x):
        return None
    return x / 100 if percent else x


def answers_equal(got: str, want: str, numeric: bool, tolerance: float) -> bool:
    if numeric:
        a, b = as_number(got), as_number(want)
        if a is not None and b is not None:
            return math.isclose(a, b, rel_tol=tolerance, abs_tol=tolerance if b == 0 else 0.0)
    return normalise_answer(got) == normalise_answer(want)


def reference_answer(want: str) -> str:
    """The reference's own final answer where it is a worked solution (`... #### 42`, `\\boxed{42}`), else it."""
    if _boxed(want) is not None or _MARKERS.search(want):
        return final_answer(want, as_number(want) is None) or want
    return want


def exact_answer(spec, ctx):
    def score(prompts, completions, columns):
        out: list[float | None] = []
        for c, col in zip(completions, columns, strict=True):
            want = col.get(spec.answer_field)
            if want is None or str(want).strip() == "":
                out.append(None)  # no reference: the reward does not apply to this row
                continue
            ref = reference_answer(str(want))
            numeric = spec.numeric and as_number(ref) is not None
            got = final_answer(c, numeric)
            out.append(float(got is not None and answers_equal(got, ref, numeric, spec.tolerance)))
        return out

    return score


# ---------------------------------------------------------------------------------------------------------------
# format checks
# ---------------------------------------------------------------------------------------------------------------
def regex(spec, ctx):
    flags = (re.IGNORECASE if spec.ignore_case else 0) | (re.DOTALL if spec.dot_all else 0)
    try:
        pattern = re.compile(spec.pattern, flags)
    except re.error as e:
        raise UserError(f"reward regex: pattern {spec.pattern!r} is not a regular expression ({e})") from None
    match = pattern.fullmatch if spec.full_match else pattern.search
    return lambda prompts, completions, columns: [float(match(c) is not None) for c in completions]


_FENCED = re.compile(r"```(?:json)?\s*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def json_of(text: str):
    """The JSON value of a response: the whole text, else its last fenced block; raises ValueError if neither."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    blocks = _FENCED.findall(text)
    if not blocks:
        raise ValueError("no JSON")
    return json.loads(blocks[-1])


def json_schema(spec, ctx):
    if spec.schema_file is not None:
        try:
            schema = json.loads(Path(spec.schema_file).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{spec.schema_file}: not a readable JSON Schema ({e})") from None
    else:
        schema = spec.json_schema
    try:
        validator_cls = jsonschema.validators.validator_for(schema)
        validator_cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise UserError(f"reward json_schema: the schema is not valid JSON Schema ({e.message})") from None
    validator = validator_cls(schema)

    def score(prompts, completions, columns):
        out = []
        for c in completions:
            try:
                value = json_of(c)
            except ValueError:
                out.append(0.0)
                continue
            out.append(float(validator.is_valid(value)))
        return out

    return score
