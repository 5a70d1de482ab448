"""`align data build` and `align data build-preferences`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, NonNegativeFloat, PositiveFloat, model_validator

from data_schemas.config.common import AtLeastOne, Seed, _Strict

__all__ = ["DedupSettings", "DataBuildConfig", "PreferencesConfig"]


class DedupSettings(_Strict):
    """Duplicate removal. Near duplicates: MinHash over word 3-gram shingles, LSH banding, then the exact
    Jaccard similarity of each candidate pair is checked against the threshold (no quadratic scan)."""

    exact: bool = Field(
        True, description="Drop rows whose normalised text (case, spaces) equals an earlier row's."
    )
    near: bool = Field(
        True, description="Drop rows whose shingle Jaccard similarity to an earlier row is high."
    )
    threshold: PositiveFloat = Field(
        0.85, le=1.0, description="Jaccard similarity at or above which rows are near duplicates."
    )
    num_perm: int = Field(64, ge=16, le=512, description="MinHash permutations (bands x rows).")
    bands: AtLeastOne = Field(16, description="LSH bands; num_perm must divide by it.")

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
    shape: Literal["auto", "alpaca", "chat", "self_instruct", "prompt_completion", "sharegpt"] = Field(
        "auto", description="Row shape; 'auto' detects per row."
    )
    system_prompt: str | None = Field(
        None, description="System message added to conversations that have none."
    )
    min_chars: AtLeastOne = Field(
        1, description="Drop examples whose assistant text is shorter than this (after trimming)."
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
    validation_fraction: NonNegativeFloat = Field(
        0.1, lt=1.0, description="Share of examples in the validation split."
    )
    stratify_by: str | None = Field(
        None, description="Input column to stratify the split by (e.g. a task category)."
    )
    seed: Seed = Field(42, description="Seed of the split.")
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
    validation_fraction: NonNegativeFloat = Field(
        0.1, lt=1.0, description="Share of prompts held out (split by prompt)."
    )
    seed: Seed = Field(42, description="Seed of the prompt-level split.")
    conflicts: Literal["drop", "keep-latest"] = Field(
        "drop",
        description="One annotator judging a prompt twice differently: drop both lines, or keep the later one.",
    )
    strict: bool = Field(False, description="Exit 2 (and write nothing) when any line is dropped.")
