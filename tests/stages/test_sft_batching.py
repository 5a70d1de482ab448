"""Padding-free batches must give exactly the loss of padded batches (on real sequences, real model)."""

import contextlib

import pytest
import torch

import core.attention  # noqa: F401 (registers sdpa_segments)
from core.chat import render
from core.packing import needs_dense_mask
from core.readers import load_instructions
from stages.sft import PaddedCollator, PaddingFreeCollator
from tests.conftest import EXAMPLES, fused_lora_policy


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


def test_compact_lm_head_same_loss_and_gradients_on_labelled_rows_only(
    tokenizer, tiny_model_path, monkeypatch
):
    """lib.trainer.compact_lm_head: TRL's fused head over labelled positions only, through align's function for a
    frozen head on this CPU (lib/lm_head.py), gives the loss and gradients of TRL's every-position path, and
    really projects fewer rows."""
    import trl.trainer.utils as trl_utils

    from lib.lm_head import LabelledLogProbs
    from lib.trainer import compact_lm_head

    model = fused_lora_policy(tiny_model_path)
    rows = [
        {"input_ids": list(range(100, 130)), "labels": [-100] * 20 + list(range(120, 130))},
        {"input_ids": list(range(300, 312)), "labels": [-100] * 4 + list(range(304, 312))},
    ]
    batch = PaddingFreeCollator(tokenizer.pad_token_id, dense_mask=False)(rows)
    batch.pop("num_real_tokens")
    seen = []
    for fn, name in ((trl_utils._ChunkedLogProbFunction, "trl"), (LabelledLogProbs, "align")):
        apply = fn.apply
        monkeypatch.setattr(
            fn, "apply", lambda h, *a, apply=apply, name=name: seen.append((name, h.shape[0])) or apply(h, *a)
        )
    results = []
    for compact in (False, True):
        model.zero_grad()
        with compact_lm_head() if compact else contextlib.nullcontext():
            loss = model(**batch, fused_lm_head=True).loss
        loss.backward()
        results.append(
            (float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        )
    (full, g_full), (compacted, g_compact) = results
    labelled = sum(sum(1 for x in r["labels"][1:] if x != -100) for r in rows)
    assert seen == [("trl", batch["input_ids"].shape[1] - 1), ("align", labelled)]
    assert abs(full - compacted) < 1e-5
    for n in g_full:
        assert torch.allclose(g_full[n], g_compact[n], atol=1e-5), n
