"""A toy gate, written as a user would add one: one module (its settings model and its function) and one row in
eval.registry.GATES (tests/eval/test_registry.py registers it).

The candidate's adapter may not hold more bytes than its parent's times `max_ratio`: a size budget for adapters."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from data_schemas.gates import Check, GateResult
from eval.gates import run_gate
from eval.registry import Gate


class SizeGateSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_ratio: float = Field(1.0, gt=0, description="Largest allowed candidate/parent size ratio.")


def _size(folder: str) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def size_gate(
    candidate: str, parent: str, settings: SizeGateSettings, out_dir: Path, data=None
) -> GateResult:
    def evaluate(out: Path) -> GateResult:
        c, p = _size(candidate), _size(parent)
        ratio = c / p
        check = Check(metric="size ratio", parent=1.0, candidate=ratio, delta=ratio - 1.0,
                      limit=f"ratio <= {settings.max_ratio}", passed=ratio <= settings.max_ratio)  # fmt: skip
        return GateResult(gate="size", checks=[check], metrics={"candidate_bytes": c, "parent_bytes": p})

    return run_gate("size", candidate, parent, settings, out_dir, evaluate)


ROW = Gate(
    "size", __name__, "size_gate", "candidate's files may not outgrow its parent's", False, SizeGateSettings
)
