"""Ranking files: one annotator's judgment of the responses to one prompt, per JSON line.

Contract (docs/formats.md): `prompt_id`, `prompt` (text or chat messages ending with a user turn),
`responses` (2-16, unique ids, non-empty texts), `ranking` (best first; an item is an id or a list of tied ids;
every id exactly once), `annotator`, optional `created_at` and `notes`. Unknown fields are errors.
Also here: the training records the data stage builds from rankings (K-wise groups and pairs).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    StringConstraints,
    field_validator,
    model_validator,
)

from data_schemas.records import ChatMessage, non_blank

NonEmpty = Annotated[StrictStr, StringConstraints(min_length=1)]
MAX_RESPONSES = 16


class RankedResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: NonEmpty = Field(..., description="Response id, unique within the line.")
    text: Annotated[StrictStr, non_blank("remove the response or fill it in")] = Field(
        ..., description="The response text (non-empty after trimming)."
    )


class RankingLine(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt_id: NonEmpty = Field(..., description="Same id for the same prompt across annotators.")
    prompt: StrictStr | list[ChatMessage] = Field(
        ..., description="Prompt text or chat messages ending with user."
    )
    responses: list[RankedResponse] = Field(..., description="2 to 16 candidate responses.")
    ranking: list[NonEmpty | list[NonEmpty]] = Field(..., description="Best first; lists are ties.")
    annotator: NonEmpty = Field(..., description="Who judged.")
    created_at: datetime | None = Field(None, description="When (ISO 8601).")
    notes: StrictStr | None = Field(None, description="Free text.")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, str):
            if not v.strip():
                raise ValueError("is empty (after trimming spaces)")
            return v
        if not v:
            raise ValueError("is an empty message list")
        if v[-1].role != "user":
            raise ValueError(
                f"the last message must be from 'user' (it is '{v[-1].role}'): the responses answer it"
            )
        roles = [m.role for m in v]
        body = roles[1:] if roles[0] == "system" else roles
        for i, r in enumerate(body):
            want = "user" if i % 2 == 0 else "assistant"
            if r != want:
                raise ValueError(
                    f"messages are out of order: '{r}' where '{want}' was expected (position {i})"
                )
        return v

    @model_validator(mode="after")
    def _ranking_covers_responses(self) -> RankingLine:
        n = len(self.responses)
        if n < 2:
            raise ValueError(
                f"responses: {n} response(s); a ranking needs at least 2 (responses: at least 2 items)"
            )
        if n > MAX_RESPONSES:
            raise ValueError(f"responses: {n} responses; at most {MAX_RESPONSES} are accepted")
        ids = [r.id for r in self.responses]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"responses: duplicate response id(s) {dup}; ids must be unique within a line")
        texts = [r.text.strip() for r in self.responses]
        same = sorted({ids[i] for i, t in enumerate(texts) if texts.count(t) > 1})
        if same:
            raise ValueError(f"responses: responses {same} have identical text; keep one of them")
        ranked: list[str] = []
        for item in self.ranking:
            group = [item] if isinstance(item, str) else item
            if not group:
                raise ValueError("ranking: contains an empty tie group []")
            ranked.extend(group)
        unknown = [i for i in ranked if i not in ids]
        if unknown:
            raise ValueError(f"ranking: unknown response id(s) {unknown}; known ids are {ids}")
        twice = sorted({i for i in ranked if ranked.count(i) > 1})
        if twice:
            raise ValueError(
                f"ranking: id(s) {twice} appear more than once; each response is ranked exactly once"
            )
        missing = [i for i in ids if i not in ranked]
        if missing:
            raise ValueError(
                f"ranking: response(s) {missing} are not ranked; every response must appear once"
            )
        return self

    # -- derived views ---------------------------------------------------------------------------------
    def tiers(self) -> list[list[str]]:
        """Ranking as tiers of ids, best first."""
        return [[x] if isinstance(x, str) else list(x) for x in self.ranking]

    def all_tied(self) -> bool:
        return len(self.ranking) == 1

    def prompt_text(self) -> str:
        """A canonical text form of the prompt, for comparing lines and hashing."""
        if isinstance(self.prompt, str):
            return self.prompt.strip()
        return "\n".join(f"{m.role}: {m.content.strip()}" for m in self.prompt)

    def prompt_messages(self) -> list[dict]:
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return [m.model_dump() for m in self.prompt]


class KWiseGroup(BaseModel):
    """One prompt's responses with their consensus ranking (tiers of indices into `responses`)."""

    model_config = ConfigDict(extra="forbid")

    prompt_id: str = Field(..., description="Prompt id.")
    prompt: list[ChatMessage] = Field(..., description="Prompt messages.")
    responses: list[str] = Field(..., min_length=2, description="Response texts.")
    tiers: list[list[int]] = Field(..., description="Consensus ranking, best first; indices into responses.")
    annotators: int = Field(..., ge=1, description="How many annotators' judgments were aggregated.")
    agreement: float | None = Field(None, description="Kendall's W among the annotators (None for one).")


MAX_NOTE = 2000  # characters of an annotator's note


class Submission(BaseModel):
    """What the annotation page submits for one prompt: the order best first (a list is a tie), flags, and an
    optional note. The server turns it into a RankingLine (align/annotate/)."""

    model_config = ConfigDict(extra="forbid")

    prompt_id: str = Field(
        ..., min_length=1, max_length=200, description="The prompt judged (its id in samples.jsonl)."
    )
    ranking: list[str | list[str]] = Field(
        ..., min_length=1, max_length=MAX_RESPONSES, description="Response ids, best first; a list is a tie."
    )
    flags: dict[str, Literal["unsafe", "nonsense"]] = Field(
        default_factory=dict, description="Response id -> what is wrong with it."
    )
    note: str | None = Field(None, max_length=MAX_NOTE, description="The annotator's note, if any.")
