"""The stage table: every stage, in pipeline order, looked up by name by the CLI, `align run`, `align plan`,
`align sweep` and each stage's own context (its plan shape and model-card facts). No other list of stage names
exists: the commands, the pipeline's order and sections, the launch flags, the memory check, the sweepable stages
and the cards all come from these rows.

Adding a stage means writing one module with `run(cfg, resume=False, force=False, callbacks=()) -> StageResult`
(core/stage.py) and its config model in data_schemas/config/<name>.py (with `stage: Literal["<name>"]`), then adding one
row here. Modules are imported only when a stage runs, so `align --help` stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import data_schemas.config as configs
from core.model_card import CardInfo
from core.plan import PlanShape
from core.stage import StageResult
from core.tables import table
from lib.artifacts import policy_gate_data, sft_validation_data


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # the module holding run(cfg, resume) -> StageResult
    config: str  # its config model in data_schemas.config
    help: str  # one line for `align --help`
    command: bool  # an `align <name>` command (data and preferences are `align data build[-preferences]`)
    gate_parent: Callable[[Any], str | None]  # the model a pipeline gate compares this stage's model with
    distributed: bool = False  # runs in every process of a multi-process launch (else in the main one only)
    gate_data: Callable[[Any, Path], Path | None] = lambda cfg, out: (
        None
    )  # held-out data its pipeline gates read
    policy_gate: bool = (
        False  # its built-in policy gate takes the gate policy's `policy:` section in `align run`
    )
    plan: PlanShape | None = None  # it trains: `align plan`, the fit check at its start, launch flags
    card: CardInfo | None = None  # the model card of its artifacts
    sweep: tuple[str, str, str] | None = (
        None  # (manifest metric, the Trainer's held-out name for it, direction)
    )

    @property
    def trains(self) -> bool:
        return self.plan is not None

    def config_model(self) -> type:

        return getattr(configs, self.config)

    def run(self, cfg: Any, resume: bool = False, force: bool = False, callbacks=()) -> StageResult:
        """Run the stage; `callbacks` are hooks (TrainerCallback objects) its training honours."""
        return importlib.import_module(self.module).run(cfg, resume=resume, force=force, callbacks=callbacks)


def _none(cfg: Any) -> None:
    return None


def _own_validation(cfg: Any, out: Path) -> Path:
    return sft_validation_data(out)


def _policy_data(cfg: Any, out: Path) -> Path:
    return policy_gate_data(cfg)


def _vllm_kv(cfg: Any) -> float | None:
    return None if cfg.rollout.engine == "generate" else float(cfg.rollout.vllm_kv_cache_gb or 0.0)


# What the policy stages (DPO, PPO) share: they build on a start (an SFT artifact or a checkpoint), which their gates
# compare against on its held-out data (or gate_data), in every process of a launch, with the built-in policy gate.
POLICY: dict[str, Any] = {
    "gate_parent": lambda cfg: str(cfg.init_from),
    "distributed": True,
    "gate_data": _policy_data,
    "policy_gate": True,
}

STAGES: dict[str, Stage] = table(
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
        gate_data=_own_validation,
        plan=PlanShape(
            lambda c: (c.train.per_device_train_batch_size, c.data.max_length),
            packed_rows=lambda c: getattr(c.train, "batching", "") == "padding_free",
            shardings=("ddp", "zero2", "zero3", "fsdp2"),
        ),
        card=CardInfo(
            ("sft", "trl"), "Instruction following, as the start of preference tuning (reward, DPO, PPO)."
        ),
        sweep=("eval_loss", "eval_loss", "minimize"),
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
        plan=PlanShape(
            lambda c: (2 * c.train.groups_per_batch, c.data.max_length),  # two responses per group at least
            scalar_head=True,
            shardings=("ddp", "zero2", "zero3", "fsdp2"),
        ),
        card=CardInfo(
            ("reward-model", "rlhf"),
            "Scoring (prompt, response) pairs for PPO, best-of-n or evaluation, on prompts like its training data.",
            "text-classification",
        ),
        sweep=("accuracy", "eval_accuracy", "maximize"),
    ),
    Stage(
        "dpo",
        "stages.dpo",
        "DPOConfig",
        "direct preference optimisation from an SFT artifact or a checkpoint (then the perplexity gate)",
        True,
        **POLICY,
        plan=PlanShape(
            lambda c: (2 * c.train.per_device_train_batch_size, c.data.max_length),  # both answers
            reference_copy=lambda c: c.full_parameter and c.reference == "model_copy",
            shardings=("ddp", "zero2", "zero3", "fsdp2"),
        ),
        card=CardInfo(
            ("dpo", "rlhf", "trl"), "Chat assistant tuned to the preferences in its ranking files."
        ),
        sweep=("heldout_loss", "eval_loss", "minimize"),
    ),
    Stage(
        "ppo",
        "stages.ppo",
        "PPOConfig",
        "PPO/GRPO with vLLM rollouts from an SFT artifact or a checkpoint (then the perplexity gate)",
        True,
        **POLICY,
        plan=PlanShape(
            lambda c: (c.train.mini_batch_size, c.prompts.max_prompt_length + c.rollout.max_new_tokens),
            engine_gib=_vllm_kv,
            reference_copy=lambda c: not c.lora.enabled,
            shardings=("ddp", "zero3", "fsdp2"),  # train.sharding or train.deepspeed (ZeRO-3)
            offloads=("none", "optimizer+weights"),
            offload_shardings=("fsdp2",),  # train.cpu_offload; not yet under its ZeRO-3 engine
        ),
        card=CardInfo(("ppo", "rlhf"), "Chat assistant tuned by PPO against its reward model."),
    ),
)
ORDER = list(STAGES)
