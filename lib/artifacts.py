"""The SFT artifact the policy and reward stages build on, and the held-out data their gates read (no torch here:
the stage table and the pipeline read it at start)."""

from __future__ import annotations

import json
from pathlib import Path

from core.config import UserError, load_config
from core.manifest import require_complete
from data_schemas.config import VIRTUAL_TOKEN_METHODS, ModelConfig, SFTConfig


def sft_base(init_from: Path):
    """(ModelConfig of the SFT artifact's base model, SFT folder), for stages that build on a LoRA SFT artifact."""

    m = require_complete(init_from, "sft")
    sft_dir = Path(init_from)
    if not (sft_dir / "adapter").exists():
        raise UserError(f"{sft_dir}: has no adapter/ (this stage builds on a LoRA SFT artifact)")
    peft_type = json.loads((sft_dir / "adapter" / "adapter_config.json").read_text()).get("peft_type", "")
    if peft_type.lower() in VIRTUAL_TOKEN_METHODS:  # PEFT's type names are the methods' in capitals
        raise UserError(
            f"{sft_dir}: its adapter is {peft_type.lower()} (virtual tokens), which cannot be merged into the "
            "weights this stage starts from; train SFT with peft.method lora, adalora or ia3 for a policy to build on"
        )
    return ModelConfig(name_or_path=m.model.name), sft_dir


def sft_validation_data(sft_dir: Path) -> Path:
    """The data the SFT artifact validated on: the default data for a policy's perplexity gate."""

    c = load_config(SFTConfig, sft_dir / "config.yaml")
    if c.data.validation_file is not None:
        return c.data.validation_file
    if Path(c.data.train_file).is_dir():
        return Path(c.data.train_file)  # a built dataset: its validation split is read by the gate loader
    raise UserError(
        f"{sft_dir}: its SFT config has no validation file; set gate_data for the perplexity gate"
    )


def policy_gate_data(cfg) -> Path:
    """The data a policy stage (DPO, PPO) is gated on: its gate_data, else its SFT parent's validation data.
    Stages resolve it before training, so a missing one is said at once, not after hours."""
    return cfg.gate_data or sft_validation_data(Path(cfg.init_from))
