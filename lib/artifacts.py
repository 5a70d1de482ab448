"""Where the policy and reward stages start (an SFT artifact or any transformers checkpoint), and the held-out data
their gates read (no torch here: the stage table and the pipeline read it at start; core.models.load_start loads
a Start's weights)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.config import UserError, load_config
from core.manifest import require_complete
from data_schemas.config import VIRTUAL_TOKEN_METHODS, ModelConfig, SFTConfig


@dataclass(frozen=True)
class Start:
    """Where a stage that builds on a model (reward, DPO, PPO) starts: an `align sft` artifact or any transformers
    checkpoint (a folder, an alias, or a hub id where there is network).

    The start's weights are `model` with the adapters of `merge` folded in, in order:
    - an SFT artifact with a weight adapter: its root base model, and its adapter/ merged;
    - an SFT artifact trained full-parameter: its model/ (or merged/) folder, nothing merged;
    - a checkpoint: itself.
    `artifact` is the align artifact (a lineage parent), None for a checkpoint; `parent` is what the policy and
    perplexity gates compare the trained model with (the artifact, else the checkpoint)."""

    model: ModelConfig
    merge: tuple[Path, ...] = ()
    artifact: Path | None = None

    @property
    def parent(self) -> str:
        return str(self.artifact) if self.artifact is not None else self.model.name_or_path

    @property
    def parents(self) -> list[Path]:
        """The align artifacts whose weights this start holds: the lineage parents of what trains on it."""
        return [self.artifact] if self.artifact is not None else []


def resolve_start(init_from: Path | str, like: ModelConfig | None = None) -> Start:
    """The Start of `init_from`. `like`: the stage's model settings (attention kernel, trust_remote_code, revision)
    that apply to whatever is loaded; the name is init_from's."""

    like = like or ModelConfig()
    given = Path(init_from)
    if (given / "manifest.json").exists():
        m = require_complete(given, "sft")
        if m.model is None:
            raise UserError(f"{given}: the manifest names no model")
        if (given / "adapter" / "adapter_config.json").exists():
            peft_type = json.loads((given / "adapter" / "adapter_config.json").read_text()).get(
                "peft_type", ""
            )
            if peft_type.lower() in VIRTUAL_TOKEN_METHODS:  # PEFT's type names are the methods' in capitals
                raise UserError(
                    f"{given}: its adapter is {peft_type.lower()} (virtual tokens), which cannot be merged into the "
                    "weights this stage starts from; train SFT with peft.method lora, adalora or ia3 (or "
                    "full-parameter) for a model to build on"
                )
            base = like.model_copy(update={"name_or_path": m.model.name})
            return Start(base, (given / "adapter",), given)
        for folder in ("model", "merged"):
            if (given / folder / "config.json").exists():
                return Start(like.model_copy(update={"name_or_path": str(given / folder)}), (), given)
        raise UserError(f"{given}: this sft artifact holds no model (no adapter/ or model/)")
    if given.exists() and not (given / "config.json").exists():
        raise UserError(
            f"{given}: neither an align sft artifact (no manifest.json) nor a transformers checkpoint folder (no "
            "config.json); init_from takes either"
        )
    if not given.exists() and str(init_from).startswith((".", "/", "~")):
        raise UserError(
            f"{init_from}: not found (init_from takes an align sft artifact or a checkpoint folder)"
        )
    # a checkpoint folder, an alias or a hub id: core.models.resolve_model_path says what is wrong with it on load
    return Start(like.model_copy(update={"name_or_path": str(init_from)}))


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
    if cfg.gate_data is not None:
        return cfg.gate_data
    if not (Path(cfg.init_from) / "manifest.json").exists():
        raise UserError(
            f"init_from {cfg.init_from} is a checkpoint, not an align sft artifact, so there is no SFT validation "
            "data to gate perplexity on: set gate_data (a held-out instruction file or `align data build` folder)"
        )
    return sft_validation_data(Path(cfg.init_from))
