"""Settings every stage shares: the strict base model, the model to load, LoRA and the other PEFT methods,
partial fine-tuning, instruction data, precision, the Trainer fields, and what a content key leaves out."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    field_validator,
    model_validator,
)

__all__ = [
    "Fraction",
    "PositiveFraction",
    "Confidence",
    "AtLeastOne",
    "Seed",
    "ModelConfig",
    "LoraSettings",
    "VIRTUAL_TOKEN_METHODS",
    "PeftSettings",
    "WEIGHT_ADAPTER_METHODS",
    "adapter_peft_field",
    "check_adapter_peft",
    "UnfreezeSchedule",
    "PartialSettings",
    "InstructionDataSettings",
    "Precision",
    "precision_field",
    "OPERATIONAL_FIELDS",
    "TRACKERS",
    "key_config",
    "RunSettings",
    "TrainerSettings",
    "WeightAdapterStage",
]

# Constrained numbers the configs share (pydantic's own NonNegativeFloat, PositiveFloat, ... beside them)
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]  # a share, 0 to 1
PositiveFraction = Annotated[float, Field(gt=0, le=1.0)]  # a share above 0
Confidence = Annotated[float, Field(gt=0.5, lt=1.0)]  # the level of an interval
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]  # numpy and torch take seeds in [0, 2^32)
AtLeastOne = Annotated[int, Field(ge=1)]  # a count: one or more


class _Strict(BaseModel):
    # unknown keys are typos; an infinite or NaN number is never a setting (learning_rate=.inf trained NaN weights)
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    """Which pretrained model to start from and how to load it."""

    name_or_path: str = Field(
        "smollm2-135m-instruct",
        description="A built-in alias (smollm2-135m-instruct, tiny-random-llama), a local checkpoint folder, "
        "or a hub id (needs network).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    attn_implementation: Literal["sdpa_segments", "sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa_segments",
        description="Attention kernel. sdpa_segments (align's, the default): PyTorch SDPA per packed sequence, "
        "reading the layout from position ids (no mask, no cost across sequences; plain sdpa otherwise); sdpa / "
        "eager: transformers' kernels, packed rows get a dense block-diagonal mask; flash_attention_2: needs the "
        "flash-attn package and a GPU.",
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the checkpoint to run. Off unless you trust the source."
    )


class LoraSettings(_Strict):
    """PEFT LoRA adapter settings (Hu et al. 2021)."""

    enabled: bool = Field(True, description="Train a LoRA adapter; false trains all weights.")
    r: AtLeastOne = Field(16, le=1024, description="LoRA rank.")
    alpha: PositiveFloat = Field(32.0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: NonNegativeFloat = Field(
        0.0,
        lt=1.0,
        description="Dropout on the LoRA input. 0 by default, as in torchtune and LLaMA-Factory: on CPUs drawing "
        "the random masks took a third of a LoRA step (docs/benchmarks.md).",
    )
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Names of the linear modules that get adapters ('all-linear' is accepted by PEFT).",
    )


VIRTUAL_TOKEN_METHODS = ("prompt_tuning", "prefix_tuning", "p_tuning")


class PeftSettings(_Strict):
    """Which PEFT method the adapter is (with lora.enabled true); LoRA-family sizes come from the lora block."""

    method: Literal["lora", "qlora", "adalora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning"] = Field(
        "lora",
        description="'lora' (Hu et al. 2021); 'qlora', LoRA on a 4-bit NF4 base (Dettmers et al. 2023; CUDA and "
        "bitsandbytes); 'adalora', LoRA whose ranks are re-allocated by importance during training, from "
        "1.5 x lora.r down to lora.r (Zhang et al. 2023; needs train.max_steps); 'ia3', learned rescaling of keys, "
        "values and feed-forward activations (Liu et al. 2022; PEFT's module defaults, far fewer parameters). "
        "Virtual tokens, the base model untouched (SFT only; trained on padded batches, never merged): "
        "'prompt_tuning', num_virtual_tokens learned input embeddings before every sequence (Lester et al. 2021); "
        "'p_tuning', the same embeddings produced by a small MLP encoder (Liu et al. 2021, GPT Understands, Too); "
        "'prefix_tuning', learned keys and values at every layer (Li & Liang 2021).",
    )
    num_virtual_tokens: AtLeastOne = Field(
        20, le=512, description="Virtual tokens of prompt_tuning, p_tuning and prefix_tuning."
    )
    prompt_init_text: str | None = Field(
        None,
        description="prompt_tuning: start the virtual tokens from this text's token embeddings, repeated to "
        "num_virtual_tokens (Lester et al. found it better than random for small models); null: random.",
    )

    @property
    def virtual_tokens(self) -> bool:
        """A method that prepends learned tokens (or keys and values) instead of changing weights."""
        return self.method in VIRTUAL_TOKEN_METHODS


WEIGHT_ADAPTER_METHODS = ("lora", "adalora", "ia3")


def adapter_peft_field() -> Any:
    return Field(
        default_factory=PeftSettings,
        description="The adapter's PEFT method: lora, adalora or ia3 here (qlora and the virtual-token methods "
        "are SFT's).",
    )


def check_adapter_peft(peft: PeftSettings, train: TrainerSettings) -> None:
    """Reward and DPO train weight adapters only: virtual tokens would shift the positions their scorers read."""
    if peft.method not in WEIGHT_ADAPTER_METHODS:
        raise ValueError(
            f"peft.method={peft.method} is offered in align sft only; this stage takes "
            f"{', '.join(WEIGHT_ADAPTER_METHODS)}"
        )
    if peft.method == "adalora" and train.max_steps <= 0:
        raise ValueError("peft.method=adalora schedules its rank budget over train.max_steps; set it (> 0)")


class UnfreezeSchedule(_Strict):
    """Gradual unfreezing (ULMFiT): more blocks train as training goes on, from the top down."""

    every_steps: AtLeastOne = Field(..., description="Optimizer steps between two unfreezings.")
    blocks_per_step: AtLeastOne = Field(1, description="Transformer blocks unfrozen each time, from the top.")


class PartialSettings(_Strict):
    """Partial fine-tuning of the base model's own weights (when lora.enabled is false); core/partial.py."""

    trainable: Literal["all", "top_blocks", "head", "layernorm", "bias"] = Field(
        "all",
        description="What trains: 'all' weights; the 'top_blocks' (with the final norm and head); the 'head' alone "
        "(tied embeddings train with it); 'layernorm' weights alone; 'bias' terms alone (BitFit).",
    )
    top_blocks: AtLeastOne = Field(2, description="Blocks trained from the top with trainable=top_blocks.")
    unfreeze: UnfreezeSchedule | None = Field(
        None,
        description="Unfreeze blocks from the top during training, starting from `trainable` (null: never).",
    )
    layerwise_lr_decay: PositiveFloat | None = Field(
        None,
        le=1.0,
        description="Discriminative learning rates: block i of L at lr * decay^(L - i), the head at lr, the "
        "embeddings at lr * decay^(L + 1) (null: one rate).",
    )

    @property
    def is_default(self) -> bool:
        return self.trainable == "all" and self.unfreeze is None and self.layerwise_lr_decay is None


class InstructionFiles(_Strict):
    """Instruction data as every stage that reads it takes it."""

    train_file: Path = Field(
        ...,
        description="Instruction data: a JSONL/JSON/CSV/Parquet file in alpaca, chat 'messages' or self-instruct "
        "shape, or a dataset folder built by `align data build` (PPO's prompts: the turns before each "
        "conversation's last assistant answer).",
    )


class InstructionDataSettings(InstructionFiles):
    """Where the instruction data comes from and how it is cut into sequences."""

    validation_file: Path | None = Field(
        None,
        description="Separate validation data; when absent, validation_fraction of train_file is held out.",
    )
    validation_fraction: NonNegativeFloat = Field(
        0.1,
        lt=1.0,
        description="Share of train_file held out for validation when no validation_file.",
    )
    shape: Literal["auto", "alpaca", "chat", "self_instruct", "prompt_completion", "sharegpt", "text"] = (
        Field(
            "auto",
            description="Row shape; 'auto' detects it per row. 'text': plain-text rows learned whole, without the chat "
            "template (language modelling).",
        )
    )
    max_length: int = Field(512, ge=16, description="Maximum tokens per example after the chat template.")
    truncation_side: Literal["right", "left"] = Field(
        "right",
        description="Which end to cut from examples longer than max_length. Cut examples are counted and "
        "reported, never dropped silently; an example left with no assistant token is reported as skipped.",
    )
    system_prompt: str | None = Field(
        None,
        description="System message prepended to conversations that have none (else the template's default).",
    )
    control_tokens: Literal["neutralise", "reject"] = Field(
        "neutralise",
        description="Text containing the tokenizer's control tokens (e.g. <|im_start|>): 'neutralise' breaks them "
        "so they tokenize as plain text; 'reject' drops the row. Either way it is counted.",
    )


Precision = Literal["auto", "fp32", "bf16", "fp16"]


def cpu_offload_field() -> Any:
    """train.cpu_offload, as every training stage's train block holds it."""
    return Field(
        False,
        description="With train.sharding=fsdp2: every process keeps its shards of the weights, their gradients and "
        "AdamW's moments in host memory (FSDP2's CPUOffloadPolicy), copying one unit at a time to the accelerator "
        "to gather and compute it; the optimizer steps on the host. Accelerator memory falls to the gathered units, "
        "activations and runtime (what lets 70B full-parameter GRPO fit 8 x 80 GB: align plan), for host-device "
        "copies every step and a CPU optimizer step. ZeRO's offload is set in the train.deepspeed JSON instead.",
    )


def check_sharding_engines(t) -> None:
    """The checks every training stage's train block makes of its sharding settings (`sharding`, `deepspeed`,
    `cpu_offload`): one engine at a time, offload only where FSDP2 shards."""
    if t.sharding == "fsdp2" and t.deepspeed is not None:
        raise ValueError(
            "train.sharding=fsdp2 and train.deepspeed are two sharding engines; choose one (deepspeed=null, or "
            "sharding=ddp)"
        )
    if t.cpu_offload and t.sharding != "fsdp2":
        raise ValueError(
            "train.cpu_offload keeps FSDP2's shards in host memory: set train.sharding=fsdp2 (DeepSpeed's "
            "offload is set in its JSON: zero_optimization.offload_optimizer / offload_param)"
        )


def precision_field() -> Any:
    return Field(
        "auto",
        description="Training/inference precision. 'auto' picks bf16 only where the device runs it fast "
        "(CUDA with native bf16, or CPUs with AMX), else fp32. The one place precision is set.",
    )


# Fields that say where to write, when to pause and where to log: they do not change the product, so they stay
# out of every content key (a stage's manifest key and the pipeline's stage key), and a paused run resumed with
# another stop_after_steps keeps its key.
# transformers' `report_to` integrations (transformers.integrations.INTEGRATION_TO_CALLBACK; a test keeps the two
# lists equal): the module each imports, and the pip package that installs it.
TRACKERS: dict[str, tuple[str, str]] = {
    "azure_ml": ("azureml.core", "azureml-core"),
    "clearml": ("clearml", "clearml"),
    "codecarbon": ("codecarbon", "codecarbon"),
    "comet_ml": ("comet_ml", "comet-ml"),
    "dagshub": ("dagshub", "dagshub"),
    "dvclive": ("dvclive", "dvclive"),
    "flyte": ("flytekit", "flytekit"),
    "kubeflow": ("kubeflow", "kubeflow"),
    "mlflow": ("mlflow", "mlflow"),
    "neptune": ("neptune", "neptune"),
    "swanlab": ("swanlab", "swanlab"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "trackio": ("trackio", "trackio"),
    "wandb": ("wandb", "wandb"),
}


OPERATIONAL_FIELDS: dict[str, Any] = {"output_dir": True, "train": {"stop_after_steps", "report_to"}}


def key_config(cfg: BaseModel) -> dict[str, Any]:
    """The config as it enters content keys: everything but OPERATIONAL_FIELDS."""
    exclude = {k: v for k, v in OPERATIONAL_FIELDS.items() if k in type(cfg).model_fields}
    if "train" in exclude and not isinstance(getattr(cfg, "train", None), BaseModel):
        exclude.pop("train")
    return cfg.model_dump(mode="json", exclude=exclude)


class RunSettings(_Strict):
    """What every training loop has: optimiser basics, seed, checkpoints, pausing and logging."""

    learning_rate: PositiveFloat = Field(2e-4, description="Peak learning rate.")
    weight_decay: NonNegativeFloat = Field(0.0, description="AdamW weight decay.")
    max_grad_norm: PositiveFloat = Field(1.0, description="Gradient clipping norm.")
    seed: Seed = Field(42, description="Seed for data order, dropout, sampling and initialisation.")
    save_steps: AtLeastOne = Field(50, description="Write a resumable checkpoint every N steps.")
    stop_after_steps: AtLeastOne | None = Field(
        None,
        description="Stop this invocation cleanly after this step (for time-boxed or preemptible jobs); the "
        "artifact stays 'running' and `--resume` continues it.",
    )
    report_to: list[str] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Experiment trackers to log to: any of transformers' integrations ("
        + ", ".join(TRACKERS)
        + "), or none. Each must be installed (a missing one is said before the model loads, with its pip line).",
    )

    # the trackers this stage can log through, and how a name outside them is said (PPO narrows both)
    report_to_choices: ClassVar[tuple[str, ...]] = tuple(TRACKERS)
    report_to_refusal: ClassVar[str] = "unknown tracker {names}; choose from {choices} or none"

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, v: list[str]) -> list[str]:
        unknown = [x for x in v if x not in cls.report_to_choices and x != "none"]
        if unknown:
            raise ValueError(
                cls.report_to_refusal.format(
                    names=", ".join(unknown), choices=", ".join(cls.report_to_choices)
                )
            )
        return v


class TrainerSettings(RunSettings):
    """Settings of the stages trained by a transformers Trainer (SFT, reward, DPO). Names follow
    transformers' TrainingArguments; each stage changes defaults only (see `_default`)."""

    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: Fraction = Field(0.05, description="Share of steps with linear warmup.")
    gradient_accumulation_steps: AtLeastOne = Field(1, description="Micro-batches per optimizer step.")
    num_train_epochs: PositiveFloat = Field(
        1.0, description="Epochs over the training data (ignored if max_steps > 0)."
    )
    max_steps: int = Field(-1, description="Total optimizer steps; -1 means use num_train_epochs.")
    eval_steps: AtLeastOne = Field(50, description="Evaluate on the held-out split every N steps.")
    save_total_limit: AtLeastOne = Field(2, description="Checkpoints kept on disk.")
    logging_steps: AtLeastOne = Field(1, description="Log training metrics every N steps.")
    early_stopping_patience: AtLeastOne | None = Field(
        None,
        description="Stop when the held-out loss has not improved for this many evaluations (needs held-out data).",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each block's activations during backward instead of keeping them: activation "
        "memory falls to the block inputs plus one block's, for one more forward pass per step. TRL turns it on "
        "by default; align keeps it off, since memory is rarely what binds a small model (SFT of SmolLM2-135M, "
        "8 steps of 8 x 512 tokens on 2 CPU cores: 51 s and 5.6 GiB peak without it, 59 s and 3.2 GiB with it), "
        "and `align plan` tells when a run needs it to fit.",
    )
    sharding: Literal["ddp", "fsdp2"] = Field(
        "ddp",
        description="How processes hold the model: 'ddp', each a whole copy (or what train.deepspeed partitions); "
        "'fsdp2', torch's fully_shard through the Trainer's accelerate: the model (and DPO's frozen reference "
        "copy), its gradients and AdamW's moments split across the processes, built on the meta device and read "
        "shard by shard from the checkpoint, checkpoints written per process, the artifact consolidated slice by "
        "slice (core/sharded.py): no process holds a whole model while training. fsdp2 trains every weight "
        "(lora.enabled false) or a plain LoRA on the sharded base (peft.method=lora), from a checkpoint or an "
        "artifact (an SFT LoRA start merged file by file first).",
    )
    cpu_offload: bool = cpu_offload_field()
    deepspeed: Path | None = Field(
        None,
        description="A DeepSpeed config (JSON) for the Trainer, as TrainingArguments.deepspeed: "
        "configs/deepspeed/zero2.json or zero3.json. Takes effect under several processes (`--num-processes N`, "
        "torchrun or accelerate launch); 'auto' values are filled from these settings.",
    )

    @model_validator(mode="after")
    def _stop_within_max_steps(self) -> TrainerSettings:
        if self.stop_after_steps is not None and 0 < self.max_steps < self.stop_after_steps:
            raise ValueError("train.stop_after_steps must not exceed train.max_steps")
        check_sharding_engines(self)
        return self


def _default(base: type[BaseModel], name: str, value: Any) -> Any:
    """The base class's field `name` (type, bounds, description) with another default: a stage changes a default
    without writing the field's description and validators a second time."""
    info = copy.copy(base.model_fields[name])
    info.default = value
    return info


class WeightAdapterStage(_Strict):
    """A stage that trains a weight adapter (or the whole model) on a base: the reward model, DPO."""

    precision: Precision = precision_field()
    lora: LoraSettings = Field(
        default_factory=LoraSettings,
        description="LoRA (the reward model's on its trunk, its score head fully trained; DPO's for "
        "policy_init=new_adapter).",
    )
    peft: PeftSettings = adapter_peft_field()

    @model_validator(mode="after")
    def _weight_adapter(self) -> WeightAdapterStage:
        if self.lora.enabled:
            check_adapter_peft(self.peft, self.train)
        return self
