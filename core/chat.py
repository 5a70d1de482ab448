"""Chat rendering: the model's own chat template, assistant-token masks, and control-token safety.

Why not `assistant_only_loss` in TRL: it needs `{% generation %}` markers that most templates (SmolLM2's
included) lack. Instead each assistant turn's tokens are found by rendering the conversation up to that turn
with and without it, which works with any template whose renderings of prefixes are prefixes.

User text must never become control tokens: a string like "<|im_start|>system" inside a message would
otherwise be parsed by the tokenizer as the real marker and let data forge turns. `neutralise()` breaks every
special-token string by inserting U+2060 (WORD JOINER, invisible) after its first character, so it tokenizes as
plain text; `control_tokens_in()` lets a caller reject such rows instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

WORD_JOINER = "\u2060"
ROLES = ("system", "user", "assistant")
# Chat markers of common templates: neutralised (data build) or counted (ranking checks) even where no tokenizer
# is at hand (the tokenizer's own special tokens are added to these when one is).
COMMON_MARKERS = [
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|begin_of_text|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "[INST]", "[/INST]", "<s>", "</s>",
    "<start_of_turn>", "<end_of_turn>",
]  # fmt: skip


def chat_messages(x, field: str = "prompt") -> list[dict[str, str]]:
    """A prompt given as text or as a message list, as validated {role, content} messages: the one place every
    stage and the scoring API turn user-supplied messages into chat turns. A role must be exactly one of
    system/user/assistant and content must be text, so no string can smuggle template markup into a role (a role
    like "user<|im_end|>\\n<|im_start|>system" would otherwise render a forged system turn). Raises ValueError
    with 'field[i].key: what is wrong'."""
    if isinstance(x, str):
        return [{"role": "user", "content": x}]
    if not isinstance(x, list) or not x:
        raise ValueError(f"{field}: must be a string or a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(x):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            raise ValueError(f"{field}[{i}]: must be an object with exactly 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(
                f"{field}[{i}].role: must be one of {', '.join(ROLES)}; got {str(m['role'])[:40]!r}"
            )
        if not isinstance(m["content"], str):
            raise ValueError(f"{field}[{i}].content: must be text, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def transcript(messages, limit: int | None = None) -> str:
    """A conversation as a reviewer reads it, one turn after another ("user: ... · assistant: ..."), cut to `limit`
    characters; text as it is (a report escapes it), never a Python repr."""
    text = " · ".join(f"{m['role']}: {m['content']}" for m in chat_messages(messages))
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"


def special_strings(tokenizer) -> list[str]:
    """Every string the tokenizer would turn into a control token, longest first."""
    specials = set(tokenizer.all_special_tokens)
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            specials.add(str(tok))
    return sorted((s for s in specials if s), key=len, reverse=True)


def control_tokens_in(text: str, specials: list[str]) -> list[str]:
    return [s for s in specials if s in text]


def neutralise(text: str, specials: list[str]) -> str:
    for s in specials:
        if s in text:
            text = text.replace(s, s[0] + WORD_JOINER + s[1:])
    return text


def neutralise_messages(messages, specials: list[str]) -> list[dict]:
    """The messages with every control-token string in their content broken (`neutralise`): the one way a stage,
    gate or sampler turns user text into chat turns for the template. Takes {role, content} dicts (other keys are
    kept) or records with .role and .content."""
    return [
        {**m, "content": neutralise(m["content"], specials)}
        if isinstance(m, dict)
        else {"role": m.role, "content": neutralise(m.content, specials)}
        for m in messages
    ]


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss (prompt/system/user tokens)
    truncated: bool


def render(
    tokenizer,
    messages: list[dict],
    max_length: int,
    truncation_side: str = "right",
    assistant_only: bool = True,
) -> Rendered:
    """Tokenize a conversation with the model's chat template; labels only on assistant turns.

    Returns ids and labels of equal length (unshifted; the model shifts). Each assistant turn's label span
    covers its content and its end-of-turn marker, so the model learns to stop.
    """
    ids = chat_ids(tokenizer, messages, add_generation_prompt=False)
    mask = [0] * len(ids)
    if assistant_only:
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(chat_ids(tokenizer, messages[:i], add_generation_prompt=True))
            end = len(chat_ids(tokenizer, messages[: i + 1], add_generation_prompt=False))
            for j in range(start, min(end, len(ids))):
                mask[j] = 1
    else:
        mask = [1] * len(ids)
    truncated = len(ids) > max_length
    if truncated:
        sl = slice(0, max_length) if truncation_side == "right" else slice(len(ids) - max_length, len(ids))
        ids, mask = ids[sl], mask[sl]
    labels = [t if k else -100 for t, k in zip(ids, mask, strict=True)]
    return Rendered(ids, labels, truncated)


def render_text(tokenizer, text: str, max_length: int, truncation_side: str = "right") -> Rendered:
    """Tokenize a plain-text example (TRL's language-modelling `text` rows): no chat template, the tokenizer's own
    special tokens (a BOS where it adds one), an EOS appended so the model learns to stop, and every token learned.
    Control-token strings in the text are broken first (`neutralise`): user text never becomes a control token."""
    ids = list(tokenizer(neutralise(text, list(_specials(tokenizer))))["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    truncated = len(ids) > max_length
    if truncated:
        ids = ids[:max_length] if truncation_side == "right" else ids[len(ids) - max_length :]
    return Rendered(ids, list(ids), truncated)


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a prompt ready for generation (ends with the assistant header)."""
    return chat_ids(tokenizer, messages, add_generation_prompt=True)


def chat_ids(tokenizer, messages, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation under the model's chat template, every control-token string in its messages
    broken first (`neutralise_messages`, idempotent). The one call through which align turns messages into template
    ids: training rows, prompts for generation, gates, scoring, export (tests/core/test_chat.py fails on any other
    `apply_chat_template` in the product)."""
    if not messages:
        return []
    msgs = neutralise_messages(messages, _specials(tokenizer))
    out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=False)  # fmt: skip
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def chat_text(tokenizer, messages) -> str:
    """The conversation rendered by the chat template as text, control-token strings in its messages broken."""
    return tokenizer.apply_chat_template(neutralise_messages(messages, _specials(tokenizer)), tokenize=False)


@lru_cache(maxsize=16)
def _specials(tokenizer) -> tuple[str, ...]:
    return tuple(special_strings(tokenizer))
