"""Input records: instruction data in its accepted shapes, normalised to chat messages.

The shapes are the contract in docs/formats.md: alpaca (`instruction`, optional `input`, `output` or
`response`), chat (`messages`), self-instruct tasks (`instruction` + `instances`, one example per instance), and
the shapes TRL users hold: prompt/completion (`prompt` + `completion`, each text or a list of messages, TRL's
"prompt-completion" datasets) and ShareGPT (`conversations` of `{from, value}` turns). Every shape becomes a list
of `ChatMessage` ending with an assistant turn.

One shape has no turns: TRL's language-modelling rows (`text` alone) become `PlainText`, which SFT learns whole
(no chat template) and the perplexity gate scores whole; commands that need a prompt and an answer refuse them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


def non_blank(hint: str = "") -> AfterValidator:
    """Text that is more than spaces; `hint` says what to do about it (every record's empty-text check)."""

    def check(v: str) -> str:
        if not v.strip():
            raise ValueError("is empty (after trimming spaces)" + (f"; {hint}" if hint else ""))
        return v

    return AfterValidator(check)


NonBlank = Annotated[str, non_blank()]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"] = Field(..., description="Who speaks.")
    content: NonBlank = Field(..., description="What is said.")


class Conversation(BaseModel):
    """A normalised training example: optional system turn, then user/assistant alternating, ending on assistant."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] = Field(..., min_length=2, description="The turns, in order.")

    @model_validator(mode="after")
    def _order(self) -> Conversation:
        turns = self.messages[1:] if self.messages[0].role == "system" else self.messages
        if not turns:
            raise ValueError("messages: has only a system turn; add a user turn and an assistant turn")
        for i, m in enumerate(turns):
            want = "user" if i % 2 == 0 else "assistant"
            if m.role != want:
                pos = i + (1 if self.messages[0].role == "system" else 0)
                raise ValueError(
                    f"messages[{pos}].role: is '{m.role}' but '{want}' was expected "
                    "(roles must alternate user/assistant after an optional leading system turn)"
                )
        if turns[-1].role != "assistant":
            raise ValueError(
                "messages: the last turn must be 'assistant' (there is nothing to learn otherwise)"
            )
        return self


class AlpacaRow(BaseModel):
    model_config = ConfigDict(extra="allow")

    instruction: NonBlank = Field(..., description="The task.")
    input: str | None = Field(None, description="Optional context for the task.")
    output: NonBlank | None = Field(None, description="The response.")
    response: NonBlank | None = Field(None, description="Alias of output.")

    @model_validator(mode="after")
    def _has_output(self) -> AlpacaRow:
        if self.output is None and self.response is None:
            raise ValueError("output: missing (alpaca rows need 'output' or 'response')")
        return self

    def conversations(self, system_prompt: str | None) -> list[Conversation]:
        user = self.instruction.strip()
        if self.input and self.input.strip():
            user = f"{user}\n\n{self.input.strip()}"
        answer = self.output if self.output is not None else self.response
        return [_conv(system_prompt, [("user", user), ("assistant", answer or "")])]


class SelfInstructInstance(BaseModel):
    model_config = ConfigDict(extra="allow")

    input: str = Field("", description="Optional context.")
    output: NonBlank = Field(..., description="The response.")


class SelfInstructRow(BaseModel):
    model_config = ConfigDict(extra="allow")

    instruction: str = Field(..., description="The task.")
    instances: list[SelfInstructInstance] = Field(..., min_length=1, description="Input/output pairs.")

    def conversations(self, system_prompt: str | None) -> list[Conversation]:
        out = []
        for inst in self.instances:
            user = self.instruction.strip()
            if inst.input.strip():
                user = f"{user}\n\n{inst.input.strip()}"
            out.append(_conv(system_prompt, [("user", user), ("assistant", inst.output)]))
        return out


class ChatRow(BaseModel):
    model_config = ConfigDict(extra="allow")

    messages: list[ChatMessage] = Field(..., min_length=2, description="The turns.")

    def conversations(self, system_prompt: str | None) -> list[Conversation]:
        msgs = list(self.messages)
        if system_prompt and msgs and msgs[0].role != "system":
            msgs = [ChatMessage(role="system", content=system_prompt), *msgs]
        return [Conversation(messages=msgs)]


class PromptCompletionRow(BaseModel):
    """TRL's prompt-completion shape: `prompt` and `completion`, both text (the prompt is the user's turn, the
    completion the assistant's) or both lists of messages (the conversation so far, then the answer)."""

    model_config = ConfigDict(extra="allow")

    prompt: NonBlank | list[ChatMessage] = Field(
        ..., description="The user's turn, or the turns before the answer."
    )
    completion: NonBlank | list[ChatMessage] = Field(..., description="The answer, or its assistant turn(s).")

    @model_validator(mode="after")
    def _same_kind(self) -> PromptCompletionRow:
        if isinstance(self.prompt, str) != isinstance(self.completion, str):
            raise ValueError(
                "completion: the prompt is text and the completion messages, or the other way round; give both as "
                "text or both as lists of messages"
            )
        return self

    def conversations(self, system_prompt: str | None) -> list[Conversation]:
        if isinstance(self.prompt, str):
            return [_conv(system_prompt, [("user", self.prompt), ("assistant", self.completion)])]
        return ChatRow(messages=[*self.prompt, *self.completion]).conversations(system_prompt)


# ShareGPT's speaker names -> chat roles (`from` is matched without case)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system"}  # fmt: skip


class ShareGPTTurn(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    speaker: str = Field(..., alias="from", description="Who speaks: human/user, gpt/assistant or system.")
    value: NonBlank = Field(..., description="What is said.")

    @model_validator(mode="after")
    def _known(self) -> ShareGPTTurn:
        if self.speaker.lower() not in SHAREGPT_ROLES:
            raise ValueError(
                f"from: is '{self.speaker}'; ShareGPT turns are from one of {sorted(set(SHAREGPT_ROLES))}"
            )
        return self


class ShareGPTRow(BaseModel):
    """ShareGPT's shape: `conversations`, a list of `{"from": "human" | "gpt" | "system", "value": text}`."""

    model_config = ConfigDict(extra="allow")

    conversations_: list[ShareGPTTurn] = Field(
        ..., alias="conversations", min_length=2, description="The turns, in order."
    )

    def conversations(self, system_prompt: str | None) -> list[Conversation]:
        msgs = [
            ChatMessage(role=SHAREGPT_ROLES[t.speaker.lower()], content=t.value) for t in self.conversations_
        ]
        return ChatRow(messages=msgs).conversations(system_prompt)


class PlainText(BaseModel):
    """A language-modelling example: one text, learned whole, no chat template (TRL's `text` datasets)."""

    model_config = ConfigDict(extra="allow")

    text: NonBlank = Field(..., description="The text to learn, every token of it.")


def _conv(system_prompt: str | None, turns: list[tuple[str, str]]) -> Conversation:
    msgs = [ChatMessage(role="system", content=system_prompt)] if system_prompt else []
    msgs += [ChatMessage(role=r, content=c) for r, c in turns]
    return Conversation(messages=msgs)


SHAPES = {"alpaca": AlpacaRow, "chat": ChatRow, "self_instruct": SelfInstructRow,
          "prompt_completion": PromptCompletionRow, "sharegpt": ShareGPTRow}  # fmt: skip


def detect_shape(row: dict) -> str | None:
    """The shape a row is in, from its keys; None when it matches none."""
    if "messages" in row:
        return "chat"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "conversations" in row:
        return "sharegpt"
    if "instances" in row and "instruction" in row:
        return "self_instruct"
    if "instruction" in row:
        return "alpaca"
    return None
