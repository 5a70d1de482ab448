"""`align run` and `align sweep`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, NonNegativeInt, PositiveFloat, model_validator

from data_schemas.config.annotate import SessionSettings
from data_schemas.config.common import AtLeastOne, Seed, _Strict

__all__ = [
    "PipelineStage",
    "PipelineAnnotation",
    "PipelineStages",
    "PipelineConfig",
    "SweepParam",
    "SweepConfig",
]


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


class PipelineAnnotation(_Strict):
    """The pipeline's annotation round (after sft, before preferences): sample the policy for people to rank, and
    stop the run until enough judgments exist (`align annotate serve --dir {run}/annotate` meanwhile)."""

    policy: str = Field("{run}/sft", description="The policy sampled; '{run}' is replaced by run_dir.")
    prompts: Path = Field(..., description="Prompts file (rows with 'prompt', or instruction rows).")
    min_judgments: AtLeastOne | None = Field(
        None,
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


class SweepParam(_Strict):
    """One searched config field: a float or int range (optionally log-uniform) or a list of choices."""

    type: Literal["float", "int", "categorical"] = Field(..., description="How the value is drawn.")
    low: float | None = Field(None, description="Smallest value (float, int).")
    high: float | None = Field(None, description="Largest value (float, int), included.")
    log: bool = Field(False, description="Draw uniformly in log space (learning rates); low must be > 0.")
    step: PositiveFloat | None = Field(None, description="Grid step within [low, high] (not with log).")
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
    n_trials: AtLeastOne = Field(10, description="Trials in the study (a re-run adds only the missing ones).")
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
    pruner_startup_trials: NonNegativeInt = Field(
        2, description="Trials that are never pruned (the median's base)."
    )
    pruner_warmup_evaluations: NonNegativeInt = Field(
        1, description="Held-out evaluations of each trial before it can be pruned."
    )
    seed: Seed = Field(42, description="Seed of the sampler (the trials' own seeds come from their config).")
    timeout_minutes: PositiveFloat | None = Field(
        None, description="Start no new trial after this long (a running trial finishes)."
    )

    @model_validator(mode="after")
    def _metric(self) -> SweepConfig:
        clash = set(self.params) & set(self.overrides)
        if clash:
            raise ValueError(f"{sorted(clash)}: both searched (params) and fixed (overrides)")
        if "output_dir" in self.params or "output_dir" in self.overrides:
            raise ValueError("output_dir: the sweep names each trial's folder itself")
        return self
