"""Generation with transformers on a model in this process: the engine PPO, the annotation sampler and the
evaluation share (stages/rollout.py adds vLLM beside it), and greedy answers to conversations for task metrics.

Greedy answers run in left-padded batches; sampled ones one prompt at a time, each from its own seed
(`request_seed`), so that a response depends neither on its neighbours in a batch nor on the number of processes.
"""

from __future__ import annotations

import torch

from align.chat import render_prompt
from align.models import is_prompt_learning


def request_seed(seed: int, index: int) -> int:
    """The sampling seed of the rollout at global position `index` of a batch: one per prompt, so a response does
    not depend on its neighbours in the batch, nor on how many processes share the batch."""
    return seed * 10007 + index


def cut_after_eos(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos) + 1] if eos in row else row


class GenerateEngine:
    """transformers `generate` on the trainer's model (left-padded batches). Shares the weights: no sync."""

    name = "generate"

    def __init__(self, model, tokenizer, batch_size: int = 16):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def update_weights(self, named_tensors) -> None:
        return None

    def close(self) -> None:
        return None

    def rest(self) -> None:
        return None

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[list[int]],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        offset: int = 0,
    ) -> list[list[int]]:
        """Greedy answers in batches; sampled answers one prompt at a time, each from its own seed
        (`request_seed(seed, offset + i)`), so that they do not depend on the batch or the number of processes."""
        was_training = self.model.training
        self.model.eval()
        pad = self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token_id
        greedy = temperature == 0
        out: list[list[int]] = []
        dev = next(self.model.parameters()).device
        # one prompt at a time for virtual-token adapters too: PEFT puts them before the left padding, whose length
        # would then move the prompt's positions relative to them
        step = self.batch_size if greedy and not is_prompt_learning(self.model) else 1
        for i in range(0, len(prompt_ids), step):
            chunk = prompt_ids[i : i + step]
            torch.manual_seed(request_seed(seed, offset + i))
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=dev)  # [b, width]
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=dev)
            kw = (
                {"do_sample": False}
                if greedy
                else {"do_sample": True, "temperature": temperature, "top_p": top_p}
            )
            gen = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                top_k=0 if not greedy else None,
                pad_token_id=pad,
                eos_token_id=eos,
                **kw,
            )
            for row in gen[:, width:].tolist():
                out.append(cut_after_eos(row, eos))
        if was_training:
            self.model.train()
        return out


def greedy_answers(
    model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    """The model's greedy answer to each conversation (its messages so far, under the chat template), decoded."""
    ids = [render_prompt(tokenizer, p) for p in prompts]
    answers = GenerateEngine(model, tokenizer, batch_size=batch_size).generate(
        ids, max_new_tokens, 0.0, 1.0, 0
    )
    return [tokenizer.decode(x, skip_special_tokens=True).strip() for x in answers]
