"""The gate table: every gate a pipeline stage can run, looked up by name by `align run` and `align eval gate`.

Adding a gate means writing one module with its function `(candidate, parent, settings, out_dir, data) ->
GateResult` (usually around eval.gates.run_gate) and its settings model (a pydantic model with a description on
every field), and one row here. `align eval gate NAME` and a pipeline stage's `gates: {NAME: {...}}` come from the
row; the gate's section of the policy file (configs/gates.yaml) is validated by the row's settings model.
tests/eval/test_registry.py registers a toy gate and runs it through the CLI.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from core.config import UserError, validate
from core.tables import table
from data_schemas.config import BiasGateSettings, GatesConfig, PerplexityGateSettings, TaskGateSettings
from data_schemas.gates import GateResult


@dataclass(frozen=True)
class Gate:
    name: str
    module: str  # holds `function`
    function: str  # (candidate, parent, settings, out_dir, data) -> GateResult
    help: str
    needs_data: bool  # evaluated on the stage's held-out instruction data
    settings: type[BaseModel]  # its section of the gate policy (configs/gates.yaml)

    def run(self, candidate: str, parent: str, settings: Any, out_dir: Path, data: Path | None) -> GateResult:
        return getattr(importlib.import_module(self.module), self.function)(
            candidate, parent, settings, out_dir, data
        )


GATES: dict[str, Gate] = table(
    Gate(
        "perplexity",
        "eval.gates",
        "perplexity_gate",
        "candidate must not raise perplexity over its parent",
        True,
        PerplexityGateSettings,
    ),
    Gate(
        "task",
        "eval.task_gate",
        "task_gate",
        "candidate's generated answers must not score worse against the references (ROUGE-L, F1, EM, BLEU)",
        True,
        TaskGateSettings,
    ),
    Gate(
        "bias",
        "eval.bias",
        "bias_gate",
        "candidate must not be more biased than its parent (probes, CrowS, BBQ)",
        False,
        BiasGateSettings,
    ),
)


def gate(name: str, where: str = "gate") -> Gate:
    """The row named `name`, or one sentence naming the known ones."""
    if name not in GATES:
        raise UserError(f"{where}: {name!r} is not a gate; known: {', '.join(GATES)} (eval/registry.py)")
    return GATES[name]


def gate_settings(name: str, policy: dict[str, Any], source: str) -> Any:
    """A gate's settings from a gate policy (configs/gates.yaml as a mapping, overrides applied): its section,
    validated by its row's model. The built-in gates' sections are validated by GatesConfig too, so a typo anywhere
    in the policy is said; a section that names no gate is refused."""
    row = gate(name, source)
    stray = set(policy) - set(GatesConfig.model_fields) - set(GATES)
    if stray:
        raise UserError(f"{source}: {', '.join(sorted(stray))}: not a gate; known: {', '.join(GATES)}")
    validate(GatesConfig, {k: v for k, v in policy.items() if k in GatesConfig.model_fields}, source)
    return validate(row.settings, dict(policy.get(name) or {}), source)
