"""`align reward`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from data_schemas.config.common import (
    LoraSettings,
    ModelConfig,
    PeftSettings,
    Precision,
    TrainerSettings,
    _default,
    _Strict,
    adapter_peft_field,
    check_adapter_peft,
    precision_field,
)


class RewardDataSettings(_Strict):
    """Where the preference data comes from."""

    preferences_dir: Path = Field(
        ...,
        description="Folder from `align data build-preferences` (uses its kwise/ train and validation splits).",
    )
    max_length: int = Field(512, ge=16, description="Tokens per (prompt, response) sequence.")
    max_groups: int | None = Field(None, ge=1, description="Use at most this many training groups (first N).")
    max_eval_groups: int | None = Field(
        None, ge=1, description="Evaluate on at most this many held-out groups."
    )


class RewardTrainSettings(TrainerSettings):
    """Optimisation of the reward model."""

    loss: Literal["kwise", "plackett_luce", "bradley_terry"] = Field(
        "kwise",
        description="'kwise': InstructGPT all-pairs loss per group (default); 'plackett_luce': listwise; "
        "'bradley_terry': the same pairs treated independently (each pair its own example).",
    )
    margin: float = Field(0.0, ge=0.0, description="Margin m in -log sigmoid(r_w - r_l - m).")
    center_rewards_coefficient: float = Field(
        0.0, ge=0.0, description="Weight of mean(r^2), pulling rewards toward 0 (Eisenstein et al. 2023)."
    )
    groups_per_batch: int = Field(
        4, ge=1, description="K-wise groups per micro-batch (pairs for bradley_terry)."
    )
    learning_rate: float = _default(TrainerSettings, "learning_rate", 1e-4)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = _default(
        TrainerSettings, "lr_scheduler_type", "linear"
    )
    warmup_ratio: float = _default(TrainerSettings, "warmup_ratio", 0.03)


class RewardGateSettings(_Strict):
    """Reward gate: the model must rank held-out human preferences well, and better than answer length does."""

    min_accuracy: float = Field(0.55, ge=0.0, le=1.0, description="Held-out pairwise accuracy needed.")
    min_margin_over_length: float = Field(
        0.0, ge=0.0, description="Accuracy must exceed the length-only baseline by more than this."
    )
    min_pairs: int = Field(50, ge=1, description="Fewer held-out pairs than this fails the gate (closed).")


class RewardConfig(_Strict):
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
    precision: Precision = precision_field()
    data: RewardDataSettings = Field(..., description="Preference data.")
    lora: LoraSettings = Field(
        default_factory=LoraSettings, description="LoRA on the trunk; the score head is fully trained."
    )
    peft: PeftSettings = adapter_peft_field()
    train: RewardTrainSettings = Field(default_factory=RewardTrainSettings, description="Optimisation.")
    gate: RewardGateSettings = Field(
        default_factory=RewardGateSettings, description="Gate run after training."
    )

    @model_validator(mode="after")
    def _adapter(self) -> RewardConfig:
        if self.lora.enabled:
            check_adapter_peft(self.peft, self.train)
        return self
