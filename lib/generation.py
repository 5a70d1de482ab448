"""Generation with transformers on a model in this process: the engine PPO, the annotation sampler and the
evaluation share (lib/rollout.py puts it in the engine table beside vLLM), and greedy answers to conversations for task metrics.

Both greedy and sampled answers run in left-padded batches. A sampled response still depends neither on its
neighbours in the batch nor on the number of processes: each row draws from its own `torch.Generator`, seeded from
its global position (`request_seed`), inside a logits processor (`RowSampler`) that hands transformers' greedy
search a one-hot choice. A row's draws are thus the same alone or in any batch; what a batch can change is the
logits themselves, by float rounding (~1e-7), which moves a draw only when it lands that close to the edge
between two tokens. Before, sampled prompts ran one `generate` call each (130 calls made most of a toy PPO run).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

from core.chat import render_prompt
from core.models import input_device, is_prompt_learning
from core.progress import steps


def request_seed(seed: int, index: int) -> int:
    """The sampling seed of the rollout at global position `index` of a batch: one per prompt, so a response does
    not depend on its neighbours in the batch, nor on how many processes share the batch."""
    return seed * 10007 + index


def cut_after_eos(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos) + 1] if eos in row else row


class RowSampler(LogitsProcessor):
    """Samples each row's next token from its own generator (temperature, then nucleus top-p, as transformers'
    warpers do) and returns scores that are -inf everywhere but the drawn token, so greedy search takes it."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.warpers = [TemperatureLogitsWarper(temperature)]
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for w in self.warpers:
            scores = w(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1).cpu()  # [b, vocab]; the generators live on the CPU
        drawn = [
            torch.multinomial(p, 1, generator=g).item() for p, g in zip(probs, self.generators, strict=True)
        ]
        out = torch.full_like(scores, -float("inf"))
        out[torch.arange(len(drawn)), torch.tensor(drawn, device=scores.device)] = 0.0
        return out


class GenerateEngine:
    """transformers `generate` on the trainer's model (left-padded batches). Shares the weights: no sync."""

    name = "generate"
    syncs = False  # shares the trainer's weights

    def __init__(self, model, tokenizer, batch_size: int = 16, synced: bool = False):
        # synced: the model is sharded across processes (FSDP2), so every process steps until all have finished
        self.model, self.tokenizer, self.batch_size, self.synced = model, tokenizer, batch_size, synced

    def update_weights(self, named_tensors) -> None:
        return None

    def close(self) -> None:
        return None

    def rest(self) -> None:
        return None

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float, top_p: float, seed: int,
        offset: int = 0, progress: str | None = None,
    ) -> list[list[int]]:  # fmt: skip
        """Answers in left-padded batches: greedy, or sampled with row i drawing from its own seed
        (`request_seed(seed, offset + i)`), so that they do not depend on the batch or the number of processes.
        `progress`: what a bar over the prompts says (core.progress), none by default (rollouts have PPO's)."""
        was_training = self.model.training
        self.model.eval()
        out: list[list[int]] = []
        # one prompt at a time for virtual-token adapters: PEFT puts them before the left padding, whose length
        # would then move the prompt's positions relative to them
        step = 1 if is_prompt_learning(self.model) else self.batch_size
        with steps(progress or "", len(prompt_ids), show=progress is not None) as advance:
            for i in range(0, len(prompt_ids), step):
                out += self._batch(
                    prompt_ids[i : i + step], i, max_new_tokens, temperature, top_p, seed, offset
                )
                advance(len(prompt_ids[i : i + step]))
        if was_training:
            self.model.train()
        return out

    def _batch(self, chunk, i, max_new_tokens, temperature, top_p, seed, offset) -> list[list[int]]:
        """The answers to one left-padded batch of prompts (`chunk`, starting at prompt `i` of the request)."""
        pad, eos, dev = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, input_device(self.model)
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=dev)  # [b, width]
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=dev)
        sampler = (
            []
            if temperature == 0
            else [
                RowSampler(
                    [request_seed(seed, offset + i + j) for j in range(len(chunk))], temperature, top_p
                )
            ]
        )
        gen = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,  # sampling, when asked, is the RowSampler's: greedy search takes its draw
            logits_processor=sampler,
            pad_token_id=pad,
            eos_token_id=eos,
            # explicit either way: transformers syncs by itself whenever a ZeRO-3 config is registered in
            # this process, and the main process sampling alone after a ZeRO-3 run would wait for the others
            synced_gpus=self.synced,
        )
        return [cut_after_eos(row, eos) for row in gen[:, width:].tolist()]


def greedy_answers(
    model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    """The model's greedy answer to each conversation (its messages so far, under the chat template), decoded."""
    ids = [render_prompt(tokenizer, p) for p in prompts]
    answers = GenerateEngine(model, tokenizer, batch_size=batch_size).generate(
        ids, max_new_tokens, 0.0, 1.0, 0
    )
    return [tokenizer.decode(x, skip_special_tokens=True).strip() for x in answers]
