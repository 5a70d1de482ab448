"""The rewards of online RL (`align ppo`'s `reward.functions`): a weighted list, one row per reward.

Each row names its `kind`; the kinds are the rows of lib/rewards.py's table, and each has its settings here. A
response's score is the weighted sum of its rewards (a reward that does not apply to a row, such as an exact-answer
check on a prompt without an answer, adds nothing), and every reward is logged on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

from data_schemas.config.common import _Strict

__all__ = ["RewardFunction", "REWARD_SPECS", "reward_name"]


class _Row(_Strict):
    weight: float = Field(1.0, description="Its weight in the sum of rewards (negative: a penalty).")
    name: str | None = Field(
        None,
        description="The name it is logged under (reward/<name>); default: its kind (and a number if repeated).",
    )


class ModelReward(_Row):
    """A reward model: an `align reward` artifact scores each (prompt, response)."""

    kind: Literal["model"]
    artifact: Path = Field(..., description="The `align reward` artifact.")


class ContainsReward(_Row):
    """1.0 when the response contains `text` (case-insensitive), else 0.0."""

    kind: Literal["contains"]
    text: str = Field(..., min_length=1, description="The text looked for.")


class FrequencyReward(_Row):
    """Occurrences of `text` (case-insensitive) per character of response: a dense signal."""

    kind: Literal["frequency"]
    text: str = Field(..., min_length=1, description="The text counted.")


class PythonReward(_Row):
    """Your own function, named by import path: `module:function`, called in batches as
    `function(prompts, completions, **columns) -> list[float | None]` (TRL's signature: `prompts` the chat messages
    before each answer, `completions` the answers' text, and every other column of the prompts' data as a list
    keyword; None where the reward does not apply)."""

    kind: Literal["python"]
    function: str = Field(
        ...,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="`package.module:function`, importable from where align runs (the working directory is on "
        "the path).",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments passed on every call."
    )


class ExactAnswerReward(_Row):
    """1.0 when the response's final answer equals the row's reference answer, else 0.0.

    The final answer is the last `\\boxed{...}`, else what follows the last `####` or "answer is"/"answer:", else
    (numeric) the last number in the response. Both sides are normalised (case, spaces, a trailing period, `$`,
    thousands separators); two numbers are equal within `tolerance` (relative), fractions and percentages read as
    numbers."""

    kind: Literal["exact_answer"]
    answer_field: str = Field(
        "answer", description="The column of the prompts' data with the reference answer."
    )
    numeric: bool = Field(True, description="Compare as numbers where both sides read as one.")
    tolerance: float = Field(1e-6, ge=0, description="Relative tolerance of a numeric comparison.")


class RegexReward(_Row):
    """1.0 when the response matches `pattern` (a format check: `<think>...</think>` then an answer), else 0.0."""

    kind: Literal["regex"]
    pattern: str = Field(..., min_length=1, description="A Python regular expression.")
    full_match: bool = Field(False, description="The whole response must match (else: anywhere in it).")
    ignore_case: bool = Field(False, description="Match without case.")
    dot_all: bool = Field(True, description="`.` matches newlines too.")


class JsonSchemaReward(_Row):
    """1.0 when the response is JSON (the whole response, or its last ```json block) valid under the schema."""

    model_config = ConfigDict(**_Strict.model_config, populate_by_name=True)

    kind: Literal["json_schema"]
    json_schema: dict[str, Any] | None = Field(None, alias="schema", description="The JSON Schema, inline.")
    schema_file: Path | None = Field(None, description="A file holding the JSON Schema.")

    @model_validator(mode="after")
    def _one_schema(self) -> JsonSchemaReward:
        if (self.json_schema is None) == (self.schema_file is None):
            raise ValueError("give exactly one of schema (inline) and schema_file")
        return self


class CodeTestsReward(_Row):
    """The share of the row's tests the response's code passes, each test run in a fresh subprocess with time,
    memory, process and file limits and no network (lib/rewards/code.py: limits, not a security boundary)."""

    kind: Literal["code_tests"]
    tests_field: str = Field(
        "tests",
        description="The column with the tests: a list of Python statements (asserts), each a test, or one string "
        "of them (one test).",
    )
    setup_field: str | None = Field(
        None, description="A column with code run before the response's (imports, helpers); none: nothing."
    )
    timeout_s: PositiveFloat = Field(5.0, description="Wall-clock limit of one test run (seconds).")
    memory_mb: PositiveInt = Field(512, description="Address-space limit of one test run (MiB).")


class JudgeReward(_Row):
    """An LLM judge behind an OpenAI-compatible chat endpoint (a local `vllm serve`, or any such server): it rates
    each response from 0 to 10 under `template`; the reward is that rating / 10. Timeouts, retries with backoff, and a
    cache on disk keyed by (model, template, prompt, response)."""

    kind: Literal["judge"]
    url: str = Field(..., pattern=r"^https?://", description="The endpoint's base URL (…/v1).")
    model: str = Field(..., min_length=1, description="The model name the endpoint serves.")
    api_key_env: str | None = Field(
        None, description="The environment variable holding the API key (never the key itself in a config)."
    )
    template: str | None = Field(
        None,
        description="The judge's instruction with {prompt} and {response}; default: a helpfulness and harmlessness "
        "rubric asking for a rating from 0 to 10.",
    )
    structured: bool = Field(
        True,
        description="Ask for the reply as JSON {\"rating\": 0..10} through the request's response_format (OpenAI's "
        "structured outputs, which vLLM enforces while decoding): even a small judge then always answers a rating. "
        "Off: the first number from 0 to 10 in a free reply.",
    )
    timeout_s: PositiveFloat = Field(60.0, description="Per request.")
    retries: int = Field(3, ge=0, description="Further tries of a failed request (backoff 1, 2, 4 s ...).")
    concurrency: PositiveInt = Field(8, description="Requests in flight at once.")
    max_tokens: PositiveInt = Field(16, description="Tokens the judge may write for its rating.")
    cache_dir: Path | None = Field(
        None,
        description="Where ratings are cached; default: <output_dir>/judge_cache (a resumed run reuses them).",
    )


REWARD_SPECS = (ModelReward, ContainsReward, FrequencyReward, PythonReward, ExactAnswerReward, RegexReward,
                JsonSchemaReward, CodeTestsReward, JudgeReward)  # fmt: skip

RewardFunction = Annotated[
    ModelReward
    | ContainsReward
    | FrequencyReward
    | PythonReward
    | ExactAnswerReward
    | RegexReward
    | JsonSchemaReward
    | CodeTestsReward
    | JudgeReward,
    Field(discriminator="kind"),
]


def reward_name(rows: list, i: int) -> str:
    """The name reward row i is logged under: its own, else its kind, numbered where the kind repeats."""
    row = rows[i]
    if row.name:
        return row.name
    same = [j for j, r in enumerate(rows) if r.kind == row.kind and not r.name]
    return row.kind if len(same) == 1 else f"{row.kind}_{same.index(i) + 1}"
