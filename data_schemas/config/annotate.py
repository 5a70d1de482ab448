"""An annotation folder's session (`align annotate`)."""

from __future__ import annotations

from pydantic import Field, PositiveFloat

from data_schemas.config.common import AtLeastOne, Seed, _Strict

__all__ = ["SessionSettings"]


class SessionSettings(_Strict):
    """What an annotation folder samples and how judgments are shared out (session.json)."""

    policy: str = Field(..., description="The policy sampled: an align artifact, checkpoint folder or alias.")
    policy_key: str | None = Field(None, description="The policy artifact's manifest key (None for a model).")
    prompts: str = Field(..., description="The prompts file.")
    prompts_sha256: str = Field(..., description="Its SHA-256, so a changed file is noticed.")
    k: int = Field(4, ge=2, le=16, description="Responses sampled per prompt.")
    overlap: AtLeastOne = Field(1, description="Annotators who judge each prompt (>1 measures agreement).")
    max_prompts: AtLeastOne | None = Field(None, description="Annotate at most this many prompts.")
    temperature: PositiveFloat = Field(1.0, description="Sampling temperature (> 0: K different answers).")
    top_p: PositiveFloat = Field(0.95, le=1.0, description="Nucleus sampling.")
    max_new_tokens: AtLeastOne = Field(256, description="Longest response, in tokens.")
    max_prompt_tokens: int = Field(1024, ge=8, description="Longer prompts are skipped (named).")
    seed: Seed = Field(0, description="Sampling seed: response j of prompt i uses request_seed(seed, i*K+j).")
    engine: str = Field(
        "auto",
        description="A row of the rollout-engine table (lib/rollout.py ENGINES: vllm, generate), or 'auto': vLLM "
        "where installed, else transformers generate.",
    )
    lease_minutes: PositiveFloat = Field(30.0, description="How long a shown prompt stays reserved.")
