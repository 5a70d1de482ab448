"""Typed gate results: what every gate (perplexity, bias, reward, and any new one) writes to gate.json.

A gate is a list of checks, each a metric of the candidate (and usually of its parent) against a limit. The verdict
is derived from the checks and reasons, never set by hand: a gate passes only when it has at least one check, every
check passed, every number a check compares is finite, and no reason to fail was recorded. So a gate that crashed,
scored nothing, or produced NaN fails closed by construction.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


def _finite(x: Any) -> bool:
    if isinstance(x, bool) or x is None:
        return True
    if isinstance(x, int | float):
        return math.isfinite(x)
    if isinstance(x, list | tuple):
        return all(_finite(v) for v in x)
    return True


class Check(BaseModel):
    """One comparison of a gate: a metric of the candidate (and the parent) against the policy's limit."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field(..., description="What is measured, in words a reviewer reads.")
    candidate: Any = Field(None, description="The candidate's value.")
    parent: Any = Field(None, description="The parent's value, where the check compares with it.")
    delta: float | None = Field(None, description="candidate - parent (or the relative change), if compared.")
    interval: list[float] | None = Field(
        None, description="Confidence interval of the delta (paired bootstrap)."
    )
    p_value: float | None = Field(
        None,
        description="One-sided p-value of 'the change is above 0', where the decision tested it (before the "
        "family-wise correction the limit names).",
    )
    limit: str = Field("—", description="The policy's limit, in words (e.g. 'change <= +0.050').")
    passed: bool = Field(
        ..., description="Whether the check passed (forced false when a number is not finite)."
    )

    @model_validator(mode="after")
    def _fail_on_nan(self) -> Check:
        # A NaN compares false with everything, so a hand-written `x <= limit` can pass on it: not here.
        if self.passed and not all(_finite(v) for v in (self.candidate, self.parent, self.delta)):
            self.passed = False
        return self


class Table(BaseModel):
    """A table shown in the report (per-category results, accuracy by agreement, ...)."""

    model_config = ConfigDict(extra="forbid")

    title: str
    columns: list[str]
    rows: list[list[Any]]
    highlight: list[int] = Field(
        default_factory=list,
        description="Rows (0-based) the report marks: e.g. a category that moved significantly.",
    )
    note: str | None = Field(None, description="How to read the table (what a marked row means).")


class Override(BaseModel):
    """A named reviewer's decision to promote despite a failed gate."""

    model_config = ConfigDict(extra="forbid")

    reviewer: str = Field(..., min_length=1)
    reason: str = Field(..., min_length=1)
    at: str
    record_sha256: str | None = Field(
        None,
        description="The content hash of the gate record overridden (GateResult.content_sha256): an override holds "
        "for that record only, not for an edited one nor for another gate of the same name.",
    )


_LATER_FIELDS = ("highlights",)
_LATER_TABLE_FIELDS = ("highlight", "note")


class GateResult(BaseModel):
    """gate.json. `verdict` is recomputed from reasons and checks on every validation (fail closed)."""

    model_config = ConfigDict(extra="forbid")

    gate: str = Field(..., description="Gate name: perplexity, bias, reward, ...")
    verdict: Literal["pass", "fail"] = Field("fail", description="Derived: pass only if every check passed.")
    reasons: list[str] = Field(default_factory=list, description="Why it failed, one sentence each.")
    highlights: list[str] = Field(
        default_factory=list,
        description="What moved, one sentence each, shown at the top of the report whatever the verdict (e.g. the "
        "bias categories whose change's interval excludes 0).",
    )
    checks: list[Check] = Field(default_factory=list, description="The comparisons the verdict rests on.")
    candidate: str | None = Field(None, description="The model under test (artifact folder or model name).")
    parent: str | None = Field(None, description="The model it is compared with.")
    data: str | None = Field(None, description="The evaluation data, where the gate reads a file.")
    policy: dict[str, Any] = Field(default_factory=dict, description="The gate settings in force.")
    metrics: dict[str, Any] = Field(default_factory=dict, description="The gate's figures in full.")
    tables: list[Table] = Field(default_factory=list, description="Tables for the report.")
    worst_examples: list[dict[str, Any]] = Field(default_factory=list, description="Items that moved most.")
    images: list[str] = Field(default_factory=list, description="Plots beside gate.json (file names).")
    lineage: dict[str, Any] = Field(default_factory=dict, description="Manifests of candidate and parent.")
    details: dict[str, Any] = Field(
        default_factory=dict, description="Counts and descriptions of the inputs."
    )
    override: Override | None = Field(None, description="A reviewer's override of a failed gate.")
    key: str | None = Field(None, description="Pipeline key: candidate key + parent + settings.")
    started_at: str | None = None
    finished_at: str | None = None
    seconds: float | None = None
    traceback: str | None = Field(None, description="Where the evaluation broke (an align bug), if it did.")

    @model_validator(mode="after")
    def _derive_verdict(self) -> GateResult:
        if not self.checks and not self.reasons:
            self.reasons = ["no check was evaluated"]
        failed = [c.metric for c in self.checks if not c.passed]
        if failed and not self.reasons:
            self.reasons = [f"check failed: {m}" for m in failed]
        self.verdict = "pass" if not self.reasons and not failed else "fail"
        return self

    @property
    def passed(self) -> bool:
        """Passed, or failed and overridden by a named reviewer with a reason, for this very record."""
        return self.verdict == "pass" or self.override_holds

    @property
    def override_holds(self) -> bool:
        """An override counts only for the record it names (a record edited since, or an override copied from
        another record, promotes nothing)."""
        return self.override is not None and self.override.record_sha256 == self.content_sha256()

    def content_sha256(self) -> str:
        """sha256 of the record without its override: what a manifest, pipeline.json and an override name. Any
        edit of a check, limit, reason, candidate or policy changes it."""
        body = self.model_dump(mode="json", exclude={"override"})
        # fields added after records were first hashed count only when set, so an older record keeps its hash
        # (and the override that names it)
        for name in _LATER_FIELDS:
            if not body.get(name):
                body.pop(name, None)
        for t in body.get("tables", []):
            for name in _LATER_TABLE_FIELDS:
                if not t.get(name):
                    t.pop(name, None)
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def fail(self, reason: str) -> None:
        """Record a reason to fail (and so fail the gate)."""
        self.reasons.append(reason)
        self.verdict = "fail"
