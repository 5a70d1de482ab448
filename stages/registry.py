"""The stage table: every stage, in pipeline order, looked up by name by the CLI and by `align run`.

Adding a stage means writing one module with `run(cfg, resume=False, force=False) -> StageResult` (core/stage.py) and its
config model in data_schemas/config.py, then adding one entry here. Modules are imported only when a stage runs,
so `align --help` stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import data_schemas.config as configs
from core.stage import StageResult


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # the module holding run(cfg, resume) -> StageResult
    config: str  # its config model in data_schemas.config
    help: str  # one line for `align --help`
    command: bool  # an `align <name>` command (data and preferences are `align data build[-preferences]`)
    gate_parent: Callable[[Any], str | None]  # the model a pipeline gate compares this stage's model with
    distributed: bool = False  # runs in every process of a multi-process launch (else in the main one only)

    def config_model(self) -> type:

        return getattr(configs, self.config)

    def run(self, cfg: Any, resume: bool = False, force: bool = False) -> StageResult:
        return importlib.import_module(self.module).run(cfg, resume=resume, force=force)


def _none(cfg: Any) -> None:
    return None


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "data",
            "stages.data",
            "DataBuildConfig",
            "instruction files -> cleaned, split dataset",
            False,
            _none,
        ),
        Stage(
            "sft",
            "stages.sft",
            "SFTConfig",
            "supervised fine-tuning with LoRA",
            True,
            lambda cfg: cfg.model.name_or_path,
            distributed=True,
        ),
        Stage(
            "preferences",
            "stages.preferences",
            "PreferencesConfig",
            "ranking files -> K-wise groups and pairs",
            False,
            _none,
        ),
        Stage(
            "reward",
            "stages.reward",
            "RewardConfig",
            "reward model from K-wise human rankings (then its gate)",
            True,
            _none,
            distributed=True,
        ),
        Stage(
            "dpo",
            "stages.dpo",
            "DPOConfig",
            "direct preference optimisation on an SFT artifact (then the perplexity gate)",
            True,
            lambda cfg: str(cfg.init_from),
            distributed=True,
        ),
        Stage(
            "ppo",
            "stages.ppo",
            "PPOConfig",
            "PPO with vLLM rollouts on an SFT artifact (then the perplexity gate)",
            True,
            lambda cfg: str(cfg.init_from),
            distributed=True,
        ),
    )
}
ORDER = list(STAGES)
