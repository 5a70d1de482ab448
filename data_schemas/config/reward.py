"""`align reward`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, NonNegativeFloat, model_validator

from data_schemas.config.common import (
    AtLeastOne,
    Fraction,
    ModelConfig,
    TrainerSettings,
    WeightAdapterStage,
    _default,
    _Strict,
)

__all__ = ["RewardDataSettings", "RewardTrainSettings", "RewardGateSettings", "RewardConfig"]


class RewardDataSettings(_Strict):
    """Where the preference data comes from."""

    preferences_dir: Path | None = Field(
        None,
        description="Folder from `align data build-preferences` (uses its kwise/ train and validation splits).",
    )
    pairs_file: Path | None = Field(
        None,
        description="Or TRL-style preference pairs {prompt, chosen, rejected} (or chosen/rejected conversations): a "
        "JSONL/JSON/CSV/Parquet file, or a dataset folder (save_to_disk or Hub-style split files, its validation "
        "split held out); each pair is a group of two responses, chosen first.",
    )
    validation_fraction: NonNegativeFloat = Field(
        0.1, lt=1.0, description="Held-out share of pairs_file's prompts when it has no validation split."
    )
    max_length: int = Field(512, ge=16, description="Tokens per (prompt, response) sequence.")
    max_groups: AtLeastOne | None = Field(
        None, description="Use at most this many training groups (first N)."
    )
    max_eval_groups: AtLeastOne | None = Field(
        None, description="Evaluate on at most this many held-out groups."
    )

    @model_validator(mode="after")
    def _one_source(self) -> RewardDataSettings:
        if (self.preferences_dir is None) == (self.pairs_file is None):
            raise ValueError("set exactly one of data.preferences_dir and data.pairs_file")
        return self


class RewardTrainSettings(TrainerSettings):
    """Optimisation of the reward model."""

    loss: str = Field(
        "kwise",
        description="A row of the reward-loss table (lib/reward_losses.py REWARD_LOSSES): 'kwise': InstructGPT "
        "all-pairs loss per group (default); 'plackett_luce': listwise; 'bradley_terry': the same pairs treated "
        "independently (each pair its own example).",
    )
    margin: NonNegativeFloat = Field(0.0, description="Margin m in -log sigmoid(r_w - r_l - m).")
    center_rewards_coefficient: NonNegativeFloat = Field(
        0.0, description="Weight of mean(r^2), pulling rewards toward 0 (Eisenstein et al. 2023)."
    )
    groups_per_batch: AtLeastOne = Field(
        4, description="K-wise groups per micro-batch (pairs for bradley_terry)."
    )
    learning_rate: float = _default(TrainerSettings, "learning_rate", 1e-4)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = _default(
        TrainerSettings, "lr_scheduler_type", "linear"
    )
    warmup_ratio: float = _default(TrainerSettings, "warmup_ratio", 0.03)


class RewardGateSettings(_Strict):
    """Reward gate: the model must rank held-out human preferences well, and better than answer length does."""

    min_accuracy: Fraction = Field(0.55, description="Held-out pairwise accuracy needed.")
    min_margin_over_length: NonNegativeFloat = Field(
        0.0, description="Accuracy must exceed the length-only baseline by more than this."
    )
    min_pairs: AtLeastOne = Field(50, description="Fewer held-out pairs than this fails the gate (closed).")


class RewardConfig(WeightAdapterStage):
    """`align reward`: a scalar reward model trained from K-wise human rankings."""

    stage: Literal["reward"] = Field("reward", description="Stage name (fixed).")
    output_dir: Path = Field(..., description="Artifact directory.")
    init_from: Path | None = Field(
        None,
        description="An `align sft` artifact to start from (its adapter is merged); else model.name_or_path.",
    )
    model: ModelConfig = Field(
        default_factory=ModelConfig, description="Base model (when init_from is not set)."
    )
    data: RewardDataSettings = Field(..., description="Preference data.")
    train: RewardTrainSettings = Field(default_factory=RewardTrainSettings, description="Optimisation.")
    gate: RewardGateSettings = Field(
        default_factory=RewardGateSettings, description="Gate run after training."
    )

    @model_validator(mode="after")
    def _sharding(self) -> RewardConfig:
        if self.train.sharding == "fsdp2" and self.lora.enabled and self.peft.method != "lora":
            raise ValueError(
                f"train.sharding=fsdp2 shards a full-parameter reward model or a plain LoRA on it: "
                f"peft.method={self.peft.method} runs under ddp (or train.deepspeed zero3), or set peft.method=lora"
            )
        return self
