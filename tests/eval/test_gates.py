import json

import pytest

from data_schemas.config import PerplexityGateSettings
from eval.gates import decide_perplexity, perplexity_ratio_interval, run_perplexity_gate
from eval.perplexity import PerplexityResult
from tests.conftest import EXAMPLES


def result(nlls, toks):
    import math

    return PerplexityResult(math.exp(sum(nlls) / sum(toks)), sum(nlls), sum(toks), len(nlls), 0, nlls, toks)


def test_pass_when_candidate_not_worse():
    toks = [10] * 30
    parent = result([20.0] * 30, toks)
    cand = result([18.0] * 30, toks)
    d = decide_perplexity(cand, parent, PerplexityGateSettings())
    assert d.verdict == "pass" and d.reasons == []
    assert d.metrics["ratio"] == pytest.approx(0.8187307, rel=1e-6)  # exp(-0.2)


def test_fail_when_worse_than_tolerance():
    toks = [10] * 30
    parent = result([20.0] * 30, toks)
    cand = result([21.0] * 30, toks)  # ratio exp(0.1) = 1.105
    assert (
        decide_perplexity(cand, parent, PerplexityGateSettings(max_relative_increase=0.2)).verdict == "pass"
    )
    d = decide_perplexity(cand, parent, PerplexityGateSettings(max_relative_increase=0.05))
    assert d.verdict == "fail" and "+10.52%" in d.reasons[0]


def test_too_few_examples_fails_closed():
    r = result([1.0] * 5, [3] * 5)
    d = decide_perplexity(r, r, PerplexityGateSettings(min_examples=20))
    assert d.verdict == "fail" and "only 5 examples" in d.reasons[0]


def test_bootstrap_interval_contains_point_and_is_degenerate_for_constant_shift():
    lo, hi = perplexity_ratio_interval([2.0] * 40, [1.0] * 40, [1] * 40, 500, 0.95)
    assert lo == pytest.approx(hi) == pytest.approx(2.718281828)


def test_gate_errors_fail_closed(tmp_path):
    r = run_perplexity_gate(
        "tiny-random-llama",
        "tiny-random-llama",
        tmp_path / "missing.jsonl",
        PerplexityGateSettings(),
        tmp_path / "g",
    )
    assert r.verdict == "fail" and "could not be evaluated" in r.reasons[0]
    saved = json.loads((tmp_path / "g" / "gate.json").read_text())
    assert saved["verdict"] == "fail"
    assert "FAIL" in (tmp_path / "g" / "gate.md").read_text()


def test_gate_fails_on_noised_model_and_passes_on_same(tmp_path, tiny_model_path):
    """A candidate made worse on purpose (noise added to its weights) must fail; an identical one passes."""
    import torch
    from transformers import AutoModelForCausalLM

    noisy = tmp_path / "noisy"
    m = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    m.save_pretrained(noisy)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(noisy)
    data = EXAMPLES / "instructions_validation.jsonl"
    s = PerplexityGateSettings(bootstrap_samples=200)
    same = run_perplexity_gate(str(tiny_model_path), str(tiny_model_path), data, s, tmp_path / "a")
    assert same.verdict == "pass" and same.metrics["ratio"] == pytest.approx(1.0)
    worse = run_perplexity_gate(str(noisy), str(tiny_model_path), data, s, tmp_path / "b")
    assert worse.verdict == "fail" and worse.metrics["ratio"] > 1.0
