"""lib/generation.py: sampled answers in batches that do not depend on the batch, drawn from the right
distribution (temperature, then nucleus top-p), reproducible by seed; greedy answers unchanged."""

from __future__ import annotations

import math

import pytest
import torch

from lib.generation import GenerateEngine, RowSampler, request_seed

PROMPTS = [[1, 504, 3060, 314, 260], [1, 11, 3456, 429], [1, 2095, 7, 88, 15, 904, 223], [1, 9], [1, 77, 78]]


@pytest.fixture(scope="module")
def model(tiny_model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()


def test_a_sampled_row_is_the_same_alone_and_in_any_batch(model, tokenizer):
    batched = GenerateEngine(model, tokenizer, batch_size=16).generate(PROMPTS, 12, 1.0, 0.9, seed=3)
    pairs = GenerateEngine(model, tokenizer, batch_size=2).generate(PROMPTS, 12, 1.0, 0.9, seed=3)
    alone = [
        GenerateEngine(model, tokenizer).generate([p], 12, 1.0, 0.9, seed=3, offset=i)[0]
        for i, p in enumerate(PROMPTS)
    ]
    assert batched == pairs == alone
    assert all(len(r) > 0 for r in batched)
    # the rows are not one draw repeated: their seeds differ
    assert len({tuple(r) for r in batched}) == len(PROMPTS)


def test_sampling_is_reproducible_by_seed_and_changes_with_it(model, tokenizer):
    engine = GenerateEngine(model, tokenizer)
    a = engine.generate(PROMPTS, 12, 1.0, 1.0, seed=5)
    assert engine.generate(PROMPTS, 12, 1.0, 1.0, seed=5) == a
    assert engine.generate(PROMPTS, 12, 1.0, 1.0, seed=6) != a


def test_greedy_is_transformers_greedy(model, tokenizer):
    got = GenerateEngine(model, tokenizer).generate(PROMPTS, 10, 0.0, 1.0, seed=0)
    for p, row in zip(PROMPTS, got, strict=True):
        ref = model.generate(
            torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=10,
            do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )[0, len(p):].tolist()  # fmt: skip
        eos = tokenizer.eos_token_id
        assert row == (ref[: ref.index(eos) + 1] if eos in ref else ref)


def _frequencies(scores: list[float], temperature: float, top_p: float, n: int = 4000) -> list[float]:
    """How often each token is drawn by n rows, one generator each, from the same scores."""
    sampler = RowSampler([request_seed(11, i) for i in range(n)], temperature, top_p)
    out = sampler(torch.zeros(n, 1, dtype=torch.long), torch.tensor([scores] * n))
    assert torch.isfinite(out).sum(-1).eq(1).all()  # one token per row left for greedy search to take
    drawn = out.argmax(-1)
    return [drawn.eq(k).float().mean().item() for k in range(len(scores))]


def test_row_sampler_draws_from_the_warped_distribution():
    p = [0.6, 0.25, 0.1, 0.05]
    logits = [math.log(x) for x in p]
    tol = 5 * math.sqrt(0.25 / 4000)  # five binomial standard errors at the worst case p = 0.5
    # temperature 1, no top-p: the model's own distribution
    assert _frequencies(logits, 1.0, 1.0) == pytest.approx(p, abs=tol)
    # top-p 0.8 keeps the smallest set whose mass reaches 0.8 ({0.6, 0.25}), renormalised
    assert _frequencies(logits, 1.0, 0.8) == pytest.approx([0.6 / 0.85, 0.25 / 0.85, 0, 0], abs=tol)
    # temperature 2: probabilities proportional to p ** (1/2)
    q = [x**0.5 for x in p]
    assert _frequencies(logits, 2.0, 1.0) == pytest.approx([x / sum(q) for x in q], abs=tol)
