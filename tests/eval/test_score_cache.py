"""The score cache (eval/score_cache.py): a model scored once on the same items is read back, what is read back is
what scoring computes, and any change to the model's bytes (its adapter, an adapter its stack merges, its base) is
scored afresh."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from align.cli import main
from data_schemas.config import BiasGateSettings
from eval import score_cache
from eval.bias import run_bias_gate
from eval.score_cache import model_fingerprint
from tests.conftest import EXAMPLES


@pytest.fixture
def cache_on(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_SCORE_CACHE", "1")
    monkeypatch.setattr(score_cache, "scores_dir", lambda: tmp_path / "scores")
    return tmp_path / "scores"


@pytest.fixture(scope="module")
def sft(tmp_path_factory, tiny_model_path):
    out = tmp_path_factory.mktemp("cache") / "sft"
    args = ["sft", "--config", "configs/sft.yaml", f"output_dir={out}", "model.name_or_path=tiny-random-llama",
            f"data.train_file={EXAMPLES / 'instructions_train.jsonl'}", "data.validation_file=null",
            "data.validation_fraction=0", "train.max_steps=2", "train.learning_rate=5e-2",
            "train.early_stopping_patience=null", "train.report_to=[none]"]  # fmt: skip
    assert main(args) == 0
    return out


def _perturbed_copy(artifact, dest, scale=1.5):
    shutil.copytree(artifact, dest)
    f = dest / "adapter" / "adapter_model.safetensors"
    weights = load_file(f)
    name = next(k for k in weights if "lora_B" in k)
    weights[name] = weights[name] * scale
    save_file(weights, f)
    return dest


def test_fingerprint_follows_the_bytes_scoring_reads(sft, tmp_path, tiny_model_path):
    same = model_fingerprint(str(sft))
    assert model_fingerprint(str(sft)) == same
    (sft / "gates").mkdir(exist_ok=True)
    (sft / "gates" / "note.txt").write_text("a gate record is not the model")
    assert model_fingerprint(str(sft)) == same
    assert model_fingerprint(str(_perturbed_copy(sft, tmp_path / "changed"))) != same
    # a policy whose stack merges an SFT adapter first: a changed SFT adapter is a changed policy
    policy = tmp_path / "policy"
    shutil.copytree(sft, policy)
    (policy / "stack.json").write_text(json.dumps({"merge": ["../sft_parent/adapter"], "adapter": "adapter"}))
    shutil.copytree(sft, tmp_path / "sft_parent")
    before = model_fingerprint(str(policy))
    f = tmp_path / "sft_parent" / "adapter" / "adapter_model.safetensors"
    weights = load_file(f)
    save_file({k: v + 1e-3 for k, v in weights.items()}, f)
    assert model_fingerprint(str(policy)) != before
    assert len(model_fingerprint(str(tiny_model_path))) == 64  # a base model folder


def _checks(result):
    return [(c.metric, c.delta, c.interval, c.candidate, c.parent) for c in result.checks]


def test_bias_gate_reads_back_what_it_would_compute_and_rescores_a_changed_model(sft, tmp_path, cache_on):
    settings = BiasGateSettings(bootstrap_samples=200, contexts=["text"])  # one context keeps the test short
    first = run_bias_gate(str(sft), "tiny-random-llama", settings, tmp_path / "g1")
    assert first.details["scores_reused"] == {"parent": False, "candidate": False}
    assert len(list(cache_on.glob("bias-*.json"))) == 2

    again = run_bias_gate(str(sft), "tiny-random-llama", settings, tmp_path / "g2")
    assert again.details["scores_reused"] == {"parent": True, "candidate": True}
    assert _checks(again) == _checks(first) and again.verdict == first.verdict
    assert json.loads((tmp_path / "g2" / "scores.json").read_text()) == json.loads(
        (tmp_path / "g1" / "scores.json").read_text()
    )

    # what is read back equals scoring without the cache
    with pytest.MonkeyPatch.context() as m:
        m.setenv("ALIGN_SCORE_CACHE", "0")
        fresh = run_bias_gate(str(sft), "tiny-random-llama", settings, tmp_path / "g3")
    assert _checks(fresh) == _checks(first)
    assert fresh.details["scores_reused"] == {"parent": False, "candidate": False}

    # a changed adapter is a new model: scored afresh, while the unchanged parent is read back
    changed = _perturbed_copy(sft, tmp_path / "changed", scale=50.0)
    other = run_bias_gate(str(changed), "tiny-random-llama", settings, tmp_path / "g4")
    assert other.details["scores_reused"] == {"parent": True, "candidate": False}
    assert (
        json.loads((tmp_path / "g4" / "scores.json").read_text())["candidate"]
        != json.loads((tmp_path / "g1" / "scores.json").read_text())["candidate"]
    )

    # other items or settings are another key; an unreadable entry is scored afresh and written again
    other_batches = settings.model_copy(update={"batch_size": 4})
    fresh_key = run_bias_gate(str(sft), "tiny-random-llama", other_batches, tmp_path / "g5")
    assert fresh_key.details["scores_reused"] == {"parent": False, "candidate": False}
    for f in cache_on.glob("bias-*.json"):
        f.write_text("{not json")
    broken = run_bias_gate(str(sft), "tiny-random-llama", settings, tmp_path / "g6")
    assert broken.details["scores_reused"] == {"parent": False, "candidate": False}
    assert _checks(broken) == _checks(first)


def test_perplexity_gate_reads_back_the_parent_it_scored_before(sft, tmp_path, cache_on):
    from data_schemas.config import PerplexityGateSettings
    from eval.gates import run_perplexity_gate

    settings = PerplexityGateSettings(min_examples=5)
    data = EXAMPLES / "instructions_validation.jsonl"
    first = run_perplexity_gate(str(sft), "tiny-random-llama", data, settings, tmp_path / "p1")
    again = run_perplexity_gate(str(sft), "tiny-random-llama", data, settings, tmp_path / "p2")
    assert first.details["scores_reused"] == {"parent": False, "candidate": False}
    assert again.details["scores_reused"] == {"parent": True, "candidate": True}
    assert again.metrics == first.metrics and _checks(again) == _checks(first)
    shorter = settings.model_copy(update={"max_length": 64})  # another setting: another key
    assert run_perplexity_gate(str(sft), "tiny-random-llama", data, shorter, tmp_path / "p3").details[
        "scores_reused"
    ] == {"parent": False, "candidate": False}


def test_a_model_that_cannot_be_identified_is_not_cached(tmp_path, cache_on):
    assert score_cache.score_key("bias", str(tmp_path / "nowhere"), [], {}, ["eval.bias"]) is None
    calls = []
    record, hit = score_cache.cached_scores(
        "bias",
        str(tmp_path / "nowhere"),
        [],
        {},
        ["eval.bias"],
        lambda: calls.append(1) or {"scores": (1.0,)},
    )
    assert record == {"scores": [1.0]} and not hit and calls == [1]
    assert not cache_on.exists()


def test_the_cache_is_off_in_the_test_suite_by_default():
    assert not score_cache.enabled()  # tests/conftest.py: gates score afresh unless a test turns the cache on
