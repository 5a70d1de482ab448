"""The `manifest.json` every stage writes: who made an artifact, from what, with what result."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


class InputFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., description="Path as given.")
    role: str = Field(..., description="What the stage used it for (train, validation, ...).")
    sha256: str = Field(
        ..., description="sha256 of the file's bytes (of every file, for folders, in path order)."
    )


class ParentRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., description="The parent artifact directory.")
    stage: str = Field(..., description="The parent's stage.")
    key: str = Field(..., description="The parent's key.")


class ModelIdentity(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description="Alias, path or hub id as configured.")
    path: str = Field(..., description="Resolved local checkpoint folder.")
    weights_sha256: str = Field(..., description="sha256 of the checkpoint's weight files.")
    precision: str = Field(..., description="Precision used (fp32, bf16, fp16).")
    device: str = Field(..., description="Device used (cpu, cuda, ...).")
    adapter: str | None = Field(None, description="Adapter folder inside the artifact, if any.")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = Field(SCHEMA_VERSION, description="Version of this schema.")
    stage: str = Field(..., description="Which stage wrote the artifact.")
    status: Literal["running", "complete", "failed"] = Field(
        ..., description="Only 'complete' may be consumed."
    )
    key: str = Field(..., description="Hash of the resolved config and every input's hash.")
    started_at: str = Field(..., description="UTC ISO time the stage started.")
    finished_at: str | None = Field(None, description="UTC ISO time the stage ended.")
    error: str | None = Field(None, description="Why it failed, if it did.")
    inputs: list[InputFile] = Field(default_factory=list, description="Input files with hashes.")
    parents: list[ParentRef] = Field(default_factory=list, description="Parent artifacts.")
    model: ModelIdentity | None = Field(None, description="Base model identity.")
    env: dict[str, Any] = Field(default_factory=dict, description="Library versions, git commit, seed, host.")
    metrics: dict[str, Any] = Field(default_factory=dict, description="Final metrics.")
    gates: list[dict[str, Any]] = Field(default_factory=list, description="Gate results about this artifact.")
    overrides: list[dict[str, Any]] = Field(default_factory=list, description="Reviewer overrides of gates.")
    counts: dict[str, Any] = Field(default_factory=dict, description="Rows read / kept / dropped per reason.")
