"""`align sft`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from data_schemas.config.common import (
    AtLeastOne,
    InstructionDataSettings,
    LoraSettings,
    ModelConfig,
    PartialSettings,
    PeftSettings,
    Precision,
    TrainerSettings,
    _Strict,
    precision_field,
)

__all__ = ["SFTTrainSettings", "SFTConfig"]


class SFTTrainSettings(TrainerSettings):
    """SFT optimisation."""

    per_device_train_batch_size: AtLeastOne = Field(8, description="Examples per micro-batch.")
    per_device_eval_batch_size: AtLeastOne = Field(8, description="Examples per evaluation batch.")
    batching: Literal["padding_free", "padded"] = Field(
        "padding_free",
        description="'padding_free' concatenates a micro-batch into one row with a block-diagonal causal mask "
        "and restarting positions (no pad tokens, exact same loss); 'padded' right-pads to the longest example.",
    )


class SFTConfig(_Strict):
    """`align sft`: supervised fine-tuning of a causal LM on instruction data, with LoRA by default."""

    stage: Literal["sft"] = Field("sft", description="Stage name (fixed).")
    output_dir: Path = Field(..., description="Artifact directory this stage writes.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    precision: Precision = precision_field()
    data: InstructionDataSettings = Field(..., description="Instruction data.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapter.")
    peft: PeftSettings = Field(default_factory=PeftSettings, description="The PEFT method of the adapter.")
    partial: PartialSettings = Field(
        default_factory=PartialSettings,
        description="Partial fine-tuning, unfreezing schedule and layer-wise learning rates (with lora.enabled false).",
    )
    train: SFTTrainSettings = Field(default_factory=SFTTrainSettings, description="Optimisation.")
    merge_adapter: bool = Field(
        False,
        description="Also write merged/ (base weights with the adapter folded in). Under ZeRO-3 a plain LoRA is "
        "folded into the base's safetensors one file at a time (no whole model in memory; the base's dtype).",
    )

    @model_validator(mode="after")
    def _checks(self) -> SFTConfig:
        no_validation = self.data.validation_file is None and self.data.validation_fraction == 0.0
        if no_validation and self.train.early_stopping_patience is not None:
            raise ValueError(
                "train.early_stopping_patience needs validation data (data.validation_fraction > 0)"
            )
        if self.peft.method == "qlora" and self.merge_adapter:
            raise ValueError(
                "merge_adapter with peft.method=qlora would fold the adapter into 4-bit weights; merge the saved "
                "adapter onto the full-precision base instead (merge_adapter=false)"
            )
        if self.peft.virtual_tokens and self.merge_adapter:
            raise ValueError(
                f"merge_adapter with peft.method={self.peft.method}: virtual tokens are inputs, not weights, and "
                "cannot be folded into the model; set merge_adapter=false"
            )
        if self.peft.method == "prefix_tuning" and self.train.gradient_checkpointing:
            raise ValueError(
                "peft.method=prefix_tuning with train.gradient_checkpointing: the recomputed forward would append "
                "the prefix's keys and values a second time; set train.gradient_checkpointing=false"
            )
        if self.peft.method == "adalora" and self.train.max_steps <= 0:
            raise ValueError(
                "peft.method=adalora schedules its rank budget over train.max_steps; set it (> 0)"
            )
        if self.lora.enabled and not self.partial.is_default:
            raise ValueError(
                "partial: partial fine-tuning trains the model's own weights; set lora.enabled=false to use it"
            )
        if self.train.sharding == "fsdp2" and self.lora.enabled and self.peft.method != "lora":
            raise ValueError(
                f"train.sharding=fsdp2 shards a full-parameter model or a plain LoRA: peft.method={self.peft.method} "
                "runs under ddp or train.deepspeed (set peft.method=lora, or lora.enabled=false)"
            )
        if self.train.sharding == "fsdp2" and not self.partial.is_default:
            raise ValueError("train.sharding=fsdp2 trains every weight; partial fine-tuning runs under ddp")
        return self
