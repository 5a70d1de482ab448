"""Rewards for online RL as a weighted list: a learned reward model beside programmable rewards and verifiers.

Teams now mix a reward model with checks a program can make: an exact answer for maths, a format or a JSON schema,
unit tests for code, an LLM judge. Each is one row of `reward.functions` (data_schemas/config/rewards.py) and one
row of `KINDS` here: a factory that builds, from the row's settings, a function with one signature, TRL's

    reward(prompts, completions, columns) -> list[float | None]

`prompts` the chat messages before each answer, `completions` the answers' text, `columns` each prompt's other data
columns (the reference answer, the tests); None where the reward does not apply to a row. A new kind is a module
and a row of the table, not an `elif`.

`Rewards` sums the rows with their weights (a None adds nothing) and keeps every row's values, which PPO logs one by
one (`reward/<name>`). Every failure is a sentence: a function that raises is called again row by row to name the
row it fails on (its file and line, the prompt, the response), and one that returns the wrong number of values, a
non-number or a NaN is named with the row.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from core.chat import transcript
from core.config import UserError, printable
from data_schemas.config.rewards import reward_name
from lib.rewards import code, judge, verifiers


class RewardFn(Protocol):
    def __call__(
        self, prompts: list[list[dict]], completions: list[str], columns: list[dict[str, Any]]
    ) -> Sequence[float | None]: ...


@dataclass(frozen=True)
class Context:
    """What a factory may need besides its row: where the run writes (caches)."""

    out_dir: Path | None = None


def _model(spec, ctx: Context) -> RewardFn:
    from lib.reward_model import RewardScorer  # torch and transformers: loaded only for a reward model

    scorer = RewardScorer(spec.artifact)
    return lambda prompts, completions, columns: scorer.score(prompts, completions)


def _importable_from_here() -> None:
    """A reward function's module may sit in the working directory (as with `python -m`)."""
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))


def reward_inputs(rows: list) -> list[tuple[Path, str]]:
    """The files a run's rewards read, hashed into the run's key (a changed reward function is another run): a
    python reward's module file, a JSON schema file."""
    out = []
    for row in rows:
        if row.kind == "python":
            _importable_from_here()
            module = row.function.split(":")[0]
            try:
                spec = importlib.util.find_spec(module)
            except (ImportError, ValueError):
                spec = None
            if spec is None or not spec.origin or not Path(spec.origin).is_file():
                raise UserError(
                    f"reward function {row.function}: module {module} is not importable from the working directory "
                    "or an installed package"
                )
            out.append((Path(spec.origin), "reward function"))
        elif row.kind == "json_schema" and row.schema_file is not None:
            out.append((Path(row.schema_file), "reward schema"))
    return out


def _python(spec, ctx: Context) -> RewardFn:
    """`module:function` imported from the working directory or the installed packages, called with TRL's keyword
    form: function(prompts=..., completions=..., **columns as lists, **options)."""
    module_name, attr = spec.function.split(":")
    _importable_from_here()
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(
            f"reward function {spec.function}: cannot be imported ({type(e).__name__}: {e}); give module:function "
            "importable from the working directory or an installed package"
        ) from None
    if not callable(fn):
        raise UserError(f"reward function {spec.function}: is not callable")

    def call(prompts, completions, columns):
        keys = sorted({k for c in columns for k in c})
        by_column = {k: [c.get(k) for c in columns] for k in keys if k not in ("prompts", "completions")}
        return fn(prompts=prompts, completions=completions, **by_column, **spec.options)

    return call


def _code_tests(spec, ctx: Context) -> RewardFn:
    return code.code_tests_reward(spec)


def _judge(spec, ctx: Context) -> RewardFn:
    return judge.judge_reward(spec, ctx.out_dir)


# kind -> factory(settings row, context) -> RewardFn
KINDS: dict[str, Callable[[Any, Context], RewardFn]] = {
    "model": _model,
    "contains": verifiers.contains,
    "frequency": verifiers.frequency,
    "python": _python,
    "exact_answer": verifiers.exact_answer,
    "regex": verifiers.regex,
    "json_schema": verifiers.json_schema,
    "code_tests": _code_tests,
    "judge": _judge,
}


@dataclass
class Scored:
    """A batch's rewards: the weighted total per response, and each row's own values (None: not applicable)."""

    total: list[float]
    parts: dict[str, list[float | None]]

    def means(self) -> dict[str, float]:
        """Each reward's mean over the responses it applied to (NaN where it applied to none)."""
        return {name: mean_applied(vals) for name, vals in self.parts.items()}


def mean_applied(values: Sequence[float | None]) -> float:
    """The mean of the values a reward gave (None: it did not apply), NaN where it gave none."""
    got = [v for v in values if v is not None]
    return sum(got) / len(got) if got else float("nan")


class Rewards:
    """The weighted list of a run's rewards, built once (a reward model loads, a function is imported)."""

    def __init__(self, rows: list, ctx: Context | None = None):
        if not rows:
            raise UserError("reward.functions: is empty; give at least one reward")
        ctx = ctx or Context()
        self.rows = [
            (reward_name(rows, i), row.weight, row, KINDS[row.kind](row, ctx)) for i, row in enumerate(rows)
        ]

    @property
    def names(self) -> list[str]:
        return [name for name, *_ in self.rows]

    def __call__(
        self,
        prompts: list[list[dict]],
        completions: list[str],
        columns: list[dict[str, Any]] | None = None,
        wheres: list[str | None] | None = None,
    ) -> Scored:
        n = len(completions)
        columns = columns if columns is not None else [{} for _ in range(n)]
        wheres = wheres if wheres is not None else [None] * n
        total, parts = [0.0] * n, {}
        for name, weight, row, fn in self.rows:
            vals = _checked(name, row, fn, prompts, completions, columns, wheres)
            parts[name] = vals
            total = [t + weight * v if v is not None else t for t, v in zip(total, vals, strict=True)]
        return Scored(total, parts)


def _row_words(i: int, prompts, completions, wheres) -> str:
    where = f"{printable(wheres[i])}, " if wheres[i] else ""
    prompt = transcript(prompts[i], 80) if prompts[i] else ""
    return f"{where}prompt {prompt!r}, response {completions[i][:80]!r}"


def _checked(name, row, fn, prompts, completions, columns, wheres) -> list[float | None]:
    """fn's values for the batch, each a finite float or None; any failure a UserError naming the row."""
    what = f"reward {name} ({row.kind}{': ' + row.function if row.kind == 'python' else ''})"
    try:
        vals = list(fn(prompts, completions, columns))
    except UserError:
        raise
    except Exception as batch_error:
        for i in range(len(completions)):  # find the row it fails on
            try:
                fn(prompts[i : i + 1], completions[i : i + 1], columns[i : i + 1])
            except Exception as e:
                raise UserError(
                    f"{what} raised on {_row_words(i, prompts, completions, wheres)}: {type(e).__name__}: {e}"
                ) from None
        raise UserError(
            f"{what} raised on the batch of {len(completions)} (no single row fails alone): "
            f"{type(batch_error).__name__}: {batch_error}"
        ) from None
    if len(vals) != len(completions):
        raise UserError(
            f"{what} returned {len(vals)} values for {len(completions)} responses; return one per response"
        )
    out: list[float | None] = []
    for i, v in enumerate(vals):
        if v is None:
            out.append(None)
            continue
        try:
            x = float(v)
        except (TypeError, ValueError):
            x = float("nan")
            bad = f"returned {v!r}, not a number"
        else:
            bad = f"returned {x}, not a finite number"
        if not math.isfinite(x):
            raise UserError(f"{what} {bad} for {_row_words(i, prompts, completions, wheres)}")
        out.append(x)
    return out
