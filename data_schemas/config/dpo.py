"""`align dpo`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, model_validator

from data_schemas.config.common import (
    AtLeastOne,
    TrainerSettings,
    WeightAdapterStage,
    _default,
    _Strict,
)
from data_schemas.config.gates import PolicyStageGates

__all__ = ["DPODataSettings", "DPOTrainSettings", "PolicyEvalSettings", "DPOConfig"]


class DPODataSettings(_Strict):
    """Preference pairs for DPO."""

    preferences_dir: Path | None = Field(
        None,
        description="Folder from `align data build-preferences` (its pairs/ train and validation splits).",
    )
    pairs_file: Path | None = Field(
        None,
        description="Or a JSONL of TRL-style pairs {prompt, chosen, rejected} (held out by validation_fraction).",
    )
    validation_fraction: NonNegativeFloat = Field(
        0.1, lt=1.0, description="Held-out share for pairs_file (by prompt)."
    )
    max_length: int = Field(512, ge=16, description="Tokens of prompt + response.")
    max_prompt_length: int = Field(
        256, ge=8, description="Prompt tokens kept (cut from the left, keeping its end)."
    )
    max_pairs: AtLeastOne | None = Field(None, description="Use at most this many training pairs.")
    max_eval_pairs: AtLeastOne | None = Field(
        None, description="Evaluate on at most this many held-out pairs."
    )

    @model_validator(mode="after")
    def _one_source(self) -> DPODataSettings:
        if (self.preferences_dir is None) == (self.pairs_file is None):
            raise ValueError("set exactly one of data.preferences_dir and data.pairs_file")
        if self.max_prompt_length >= self.max_length:
            raise ValueError("data.max_prompt_length must be smaller than data.max_length")
        return self


class DPOTrainSettings(TrainerSettings):
    """DPO optimisation (names follow TRL's DPOConfig)."""

    loss_type: list[
        Literal[
            "sigmoid",
            "hinge",
            "ipo",
            "robust",
            "bco_pair",
            "sppo_hard",
            "nca_pair",
            "aot",
            "aot_unpaired",
            "apo_zero",
            "apo_down",
            "exo_pair",
            "discopop",
            "sigmoid_norm",
        ]
    ] = Field(
        default_factory=lambda: ["sigmoid"], min_length=1, description="TRL loss type(s); several are summed."
    )
    beta: PositiveFloat = Field(0.1, description="Strength of the implicit KL constraint to the reference.")
    label_smoothing: NonNegativeFloat = Field(0.0, lt=0.5, description="Assumed label noise (cDPO, robust).")
    per_device_train_batch_size: AtLeastOne = Field(4, description="Pairs per micro-batch.")
    per_device_eval_batch_size: AtLeastOne = Field(8, description="Pairs per evaluation batch.")
    group_by_length: bool = Field(
        True,
        description="Batch pairs of similar length (random mega-batches, sorted inside): far less padding.",
    )
    learning_rate: float = _default(TrainerSettings, "learning_rate", 5e-5)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = _default(
        TrainerSettings, "lr_scheduler_type", "linear"
    )


class PolicyEvalSettings(_Strict):
    """After training: samples from the policy for KL to the reference, and the policy gate against SFT."""

    prompts: NonNegativeInt = Field(
        128,
        description="Held-out prompts (of the held-out pairs) sampled for KL and judged by the policy gate "
        "(0 skips both).",
    )
    kl_prompts: AtLeastOne = Field(16, description="Of those, how many are sampled for the KL estimate.")
    max_new_tokens: AtLeastOne = Field(64, description="Tokens per sampled response (KL estimate).")
    reward_model: Path | None = Field(
        None,
        description="An `align reward` artifact: enables the policy gate (win rate vs SFT under this reward, "
        "length control, degeneration). Without one the gate is not run, and the run says so.",
    )
    heldout_reward_model: Path | None = Field(
        None, description="A second reward artifact the policy gate also judges with (reward drift)."
    )


class DPOConfig(PolicyStageGates, WeightAdapterStage):
    """`align dpo`: direct preference optimisation (Rafailov et al. 2023) on TRL's DPOTrainer."""

    stage: Literal["dpo"] = Field("dpo", description="Stage name (fixed).")
    output_dir: Path = Field(..., description="Artifact directory.")
    init_from: Path = Field(
        ...,
        description="Where the policy starts, and the reference: an `align sft` artifact, or any transformers "
        "checkpoint (a folder, an alias, or a hub id where there is network).",
    )
    policy_init: Literal["new_adapter", "continue_sft_adapter"] = Field(
        "new_adapter",
        description="'new_adapter': merge the SFT adapter into the weights and train a fresh LoRA (reference = adapter "
        "disabled, no second copy of the weights); 'continue_sft_adapter': keep training the SFT adapter (reference = a "
        "frozen copy of that adapter).",
    )
    reference: Literal["adapter_disabled", "model_copy", "precomputed"] = Field(
        "adapter_disabled",
        description="Reference log-probs: on the fly with the adapter disabled (an adapter policy; a full-parameter "
        "one, lora.enabled false, takes model_copy in its place), on the fly from a frozen second copy of the start "
        "(model_copy), or once before training (precomputed: no second copy held while training).",
    )
    data: DPODataSettings = Field(..., description="Preference pairs.")
    train: DPOTrainSettings = Field(default_factory=DPOTrainSettings, description="Optimisation.")
    eval: PolicyEvalSettings = Field(
        default_factory=PolicyEvalSettings, description="Sampling-based evaluation."
    )

    @property
    def full_parameter(self) -> bool:
        """Every weight of the policy trains (lora.enabled false); else an adapter does."""
        return not self.lora.enabled and self.policy_init == "new_adapter"

    @model_validator(mode="after")
    def _adapter(self) -> DPOConfig:
        if self.policy_init == "continue_sft_adapter" and self.peft.method != "lora":
            raise ValueError(
                "peft.method applies to policy_init=new_adapter; continue_sft_adapter trains the SFT adapter as it is"
            )
        if self.policy_init == "continue_sft_adapter" and not self.lora.enabled:
            raise ValueError(
                "policy_init=continue_sft_adapter trains the SFT adapter; with lora.enabled false every weight trains "
                "(policy_init=new_adapter)"
            )
        if self.full_parameter and self.reference == "adapter_disabled":
            self.reference = "model_copy"  # a full-parameter policy has no adapter to disable
        if not self.full_parameter and self.reference == "model_copy":
            raise ValueError(
                "reference=model_copy is for a full-parameter policy (lora.enabled false); an adapter "
                "policy's reference is the adapter disabled, or precomputed"
            )
        if self.train.sharding == "fsdp2" and self.policy_init == "continue_sft_adapter":
            raise ValueError(
                "train.sharding=fsdp2 trains a full-parameter policy or a fresh LoRA on the sharded start: set "
                "policy_init=new_adapter (the SFT adapter is merged into the start), or train.sharding=ddp"
            )
        if self.train.sharding == "fsdp2" and not self.full_parameter and self.peft.method != "lora":
            raise ValueError(
                f"train.sharding=fsdp2 shards a full-parameter policy or a plain LoRA: peft.method={self.peft.method} "
                "runs under ddp, or set peft.method=lora"
            )
        if self.train.sharding == "fsdp2" and self.reference == "precomputed":
            raise ValueError(
                "train.sharding=fsdp2 computes the reference with the sharded model itself (reference=model_copy "
                "for a full-parameter policy, adapter_disabled for a LoRA); TRL's precomputation would load a whole "
                "second model in every process"
            )
        return self
