"""The gate table: every gate a pipeline stage can run, looked up by name by `align run` and `align eval gate`.

Adding a gate means writing one function `(candidate, parent, settings, out_dir, data) -> GateResult` (usually
around eval.gates.run_gate), its settings model as a section of data_schemas.config.GatesConfig, and one entry
here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_schemas.gates import GateResult


@dataclass(frozen=True)
class Gate:
    name: str
    module: str  # holds `function`
    function: str  # (candidate, parent, settings, out_dir, data) -> GateResult
    help: str
    needs_data: bool  # evaluated on the stage's held-out instruction data

    def run(self, candidate: str, parent: str, settings: Any, out_dir: Path, data: Path | None) -> GateResult:
        return getattr(importlib.import_module(self.module), self.function)(
            candidate, parent, settings, out_dir, data
        )


GATES: dict[str, Gate] = {
    g.name: g
    for g in (
        Gate(
            "perplexity",
            "eval.gates",
            "perplexity_gate",
            "candidate must not raise perplexity over its parent",
            True,
        ),
        Gate(
            "task",
            "eval.task_gate",
            "task_gate",
            "candidate's generated answers must not score worse against the references (ROUGE-L, F1, EM, BLEU)",
            True,
        ),
        Gate(
            "bias",
            "eval.bias",
            "bias_gate",
            "candidate must not be more biased than its parent (probes, CrowS, BBQ)",
            False,
        ),
    )
}
