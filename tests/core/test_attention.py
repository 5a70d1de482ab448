"""core/attention.py: the `sdpa_segments` kernel equals plain attention over each sequence on its own (logits and
gradients), reads DPO's shared-prompt branches from position ids, and is plain sdpa everywhere else."""

import pytest
import torch

import core.attention  # noqa: F401 (registers sdpa_segments)
from core.attention import runs_of


def test_runs_of_hand_computed():
    # two sequences (lengths 3 and 2) and trailing padding numbered from 0
    assert runs_of([0, 1, 2, 0, 1, 0, 1, 2]) == [(0, 3, 0, 0), (3, 5, 3, 0), (5, 8, 5, 0)]
    # [prompt(2) | chosen(2) | rejected(3)]: the rejected run restarts at 2 and branches from the run at 0
    assert runs_of([0, 1, 2, 3, 2, 3, 4]) == [(0, 4, 0, 0), (4, 7, 0, 2)]
    # two pairs back to back, the second with two branches off one prompt
    assert runs_of([0, 1, 2, 1, 0, 1, 2, 3, 2, 3, 2]) == [
        (0, 3, 0, 0),
        (3, 4, 0, 1),
        (4, 8, 4, 0),
        (8, 10, 4, 2),
        (10, 11, 4, 2),
    ]
    # single tokens: every 0 is a sequence of its own
    assert runs_of([0, 0, 0]) == [(0, 1, 0, 0), (1, 2, 1, 0), (2, 3, 2, 0)]


def test_runs_of_refuses_a_branch_without_its_prefix():
    with pytest.raises(ValueError, match="no earlier sequence"):
        runs_of([3, 4, 5])
    with pytest.raises(ValueError, match="no earlier sequence"):
        runs_of([0, 1, 5, 6])  # the root has 2 tokens, the branch wants 5


@pytest.fixture(scope="module")
def models(tiny_model_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    seg = AutoModelForCausalLM.from_pretrained(
        tiny_model_path, dtype=torch.float32, attn_implementation="sdpa_segments"
    )
    ref = AutoModelForCausalLM.from_pretrained(
        tiny_model_path, dtype=torch.float32, attn_implementation="sdpa"
    )
    return seg.eval(), ref.eval()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_equals_each_sequence_alone_logits_and_gradients(models):
    seg, ref = models
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(5, 1000, (n,), generator=g).tolist() for n in (7, 13, 1, 5)]
    ids = torch.tensor([sum(seqs, [])])
    pos = torch.tensor([[p for s in seqs for p in range(len(s))]])
    weights = torch.randn(ids.shape[1], seg.config.vocab_size, generator=g)

    seg.zero_grad()
    packed = seg(input_ids=ids, position_ids=pos).logits[0]
    (packed * weights).sum().backward()
    got = _grads(seg)

    ref.zero_grad()
    at, total = 0, 0.0
    for s in seqs:
        alone = ref(input_ids=torch.tensor([s])).logits[0]
        assert torch.allclose(packed[at : at + len(s)], alone, atol=1e-5)
        total = total + (alone * weights[at : at + len(s)]).sum()
        at += len(s)
    total.backward()
    want = _grads(ref)
    assert got.keys() == want.keys() and got
    for n in want:  # float32 sums in another order: relative to the gradient's scale
        assert (got[n] - want[n]).abs().max() <= 1e-4 * want[n].abs().max(), n


def test_branch_equals_two_sequences_sharing_a_prompt(models):
    """[prompt | chosen | rejected] with the rejected positions restarting at len(prompt): chosen == prompt+chosen
    alone, rejected == prompt+rejected alone (never seeing the chosen tokens); padding after it changes nothing."""
    seg, ref = models
    P, C, K = [11, 12, 13, 14], [21, 22, 23], [31, 32]
    pad = [0, 0, 0]
    ids = torch.tensor([P + C + K + pad])
    pos = torch.tensor([list(range(len(P + C))) + list(range(len(P), len(P) + len(K))) + [0, 1, 2]])
    with torch.no_grad():
        out = seg(input_ids=ids, position_ids=pos).logits[0]
        chosen = ref(input_ids=torch.tensor([P + C])).logits[0]
        rejected = ref(input_ids=torch.tensor([P + K])).logits[0]
    assert torch.allclose(out[: len(P + C)], chosen, atol=1e-5)
    assert torch.allclose(out[len(P + C) : len(P + C + K)], rejected[len(P) :], atol=1e-5)


def test_everything_else_is_plain_sdpa(models, tokenizer):
    seg, ref = models
    enc = tokenizer(["Hello there, how are you", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a, b = seg(**enc).logits, ref(**enc).logits
        batch = torch.randint(5, 1000, (2, 9))  # two unpacked rows, no mask: one batched causal call
        c, d = seg(input_ids=batch).logits, ref(input_ids=batch).logits
    assert torch.allclose(a[enc.attention_mask.bool()], b[enc.attention_mask.bool()], atol=1e-5)
    assert torch.allclose(c, d, atol=1e-5)
    prompt = tokenizer(["The capital of France is"], return_tensors="pt")
    kw = {"max_new_tokens": 6, "do_sample": False}
    assert torch.equal(seg.generate(**prompt, **kw), ref.generate(**prompt, **kw))


def test_saved_config_does_not_name_the_align_kernel(models, tmp_path):
    """A model trained with sdpa_segments loads anywhere (vLLM, plain transformers) without align installed."""
    seg, _ = models
    seg.save_pretrained(tmp_path)
    assert "sdpa_segments" not in (tmp_path / "config.json").read_text()
