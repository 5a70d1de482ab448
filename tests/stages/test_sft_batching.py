"""Padding-free batches must give exactly the loss of padded batches (on real sequences, real model)."""

import pytest
import torch

import align.attention  # noqa: F401 (registers sdpa_segments)
from align.chat import render
from align.packing import needs_dense_mask
from align.readers import load_instructions
from stages.sft import PaddedCollator, PaddingFreeCollator
from tests.conftest import EXAMPLES


def _loss(model, batch):
    out = model(**{k: v for k, v in batch.items() if k not in ("labels", "num_real_tokens")})
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum"
    ), int((labels != -100).sum())


@pytest.mark.parametrize("kernel", ["sdpa_segments", "sdpa"])
def test_packed_loss_equals_unpacked_real_model(tokenizer, real_model_path, kernel):
    """Per kernel: sdpa_segments packs the batch into one row with no mask; sdpa gets block-diagonal masks (one
    row, and several rows with padding when the row budget is smaller than the batch)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        real_model_path, dtype=torch.float32, attn_implementation=kernel
    )
    model.eval()
    dense = needs_dense_mask(kernel)
    convs, _ = load_instructions(EXAMPLES / "instructions_validation.jsonl")
    rows = []
    for c in convs[:6]:
        r = render(tokenizer, [m.model_dump() for m in c.messages], 512)
        rows.append({"input_ids": r.input_ids, "labels": r.labels})
    assert len({len(r["input_ids"]) for r in rows}) > 1, "need different lengths to exercise padding"
    collate = PaddingFreeCollator(tokenizer.pad_token_id, dense_mask=dense)
    batch = collate(rows)
    assert ("attention_mask" in batch) == dense and batch["input_ids"].shape[0] == 1
    with torch.no_grad():
        packed, n_packed = _loss(model, batch)
        padded, n_padded = _loss(model, PaddedCollator(tokenizer.pad_token_id)(rows))
        single = [_loss(model, PaddedCollator(tokenizer.pad_token_id)([r])) for r in rows]
    assert n_packed == n_padded == sum(n for _, n in single)
    total_single = sum(float(s) for s, _ in single)
    assert abs(float(packed) - total_single) / total_single < 1e-4
    assert abs(float(padded) - total_single) / total_single < 1e-4
    if dense:  # several rows: a row budget smaller than the batch forces multi-row packing with padding
        multi_batch = PaddingFreeCollator(tokenizer.pad_token_id, max_row_tokens=120)(rows)
        assert multi_batch["input_ids"].shape[0] > 1
        with torch.no_grad():
            multi, n_multi = _loss(model, multi_batch)
        assert n_multi == n_packed and abs(float(multi) - float(packed)) / float(packed) < 1e-4


def test_position_ids_alone_would_leak_across_examples(tokenizer, tiny_model_path):
    """Why plain sdpa needs the 4-D mask: without it, the second example sees the first (sdpa on CPU)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_path, dtype=torch.float32, attn_implementation="sdpa"
    )
    model.eval()
    a = {"input_ids": list(range(100, 120)), "labels": list(range(100, 120))}
    b = {"input_ids": list(range(300, 310)), "labels": list(range(300, 310))}
    batch = PaddingFreeCollator(tokenizer.pad_token_id)([a, b])
    with torch.no_grad():
        masked = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=batch["attention_mask"],
        ).logits[0, 20:]
        alone = model(input_ids=torch.tensor([b["input_ids"]])).logits[0]
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, 20:30]
    assert torch.allclose(masked, alone, atol=1e-4)
    assert not torch.allclose(leaky, alone, atol=1e-3)
