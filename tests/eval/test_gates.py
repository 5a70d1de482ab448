import json

import pytest

from data_schemas.config import PerplexityGateSettings
from data_schemas.gates import Check, GateResult
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


# ---- records that cannot be edited into a pass (issue 34 B7, B8) ----------------------------------------------
def _failed_record(tmp_path):
    from eval.gates import write_gate

    r = GateResult(
        gate="toy", checks=[Check(metric="m", candidate=2.0, parent=1.0, limit="<= 1", passed=False)]
    )
    write_gate(r, tmp_path / "g")
    return r, tmp_path / "g"


def test_an_edited_gate_record_is_a_failed_gate_saying_so(tmp_path):
    from core.manifest import read_gate

    r, gdir = _failed_record(tmp_path)
    recorded = r.content_sha256()
    data = json.loads((gdir / "gate.json").read_text())
    data["reasons"], data["checks"][0]["passed"], data["verdict"] = [], True, "pass"  # the hand edit of B7
    (gdir / "gate.json").write_text(json.dumps(data))
    assert read_gate(gdir).passed  # unchecked, the edit would promote
    checked = read_gate(gdir, recorded)
    assert not checked.passed and "was changed after align recorded it" in checked.reasons[0]


def test_an_override_holds_for_its_record_only(tmp_path):
    from core.manifest import read_gate
    from eval.gates import override_gate

    r, gdir = _failed_record(tmp_path)
    assert override_gate(gdir, "QA", "accepted").passed
    data = json.loads((gdir / "gate.json").read_text())
    assert data["override"]["record_sha256"] == r.content_sha256()
    data["checks"][0]["candidate"] = 5.0  # worse, after the override
    (gdir / "gate.json").write_text(json.dumps(data))
    edited = read_gate(gdir)
    assert edited.override is not None and not edited.passed
    from eval.report import gate_html

    assert "another version of this record" in gate_html(edited)


def test_report_images_are_read_from_the_gate_folder_only(tmp_path):
    import base64

    from eval.gates import write_gate

    secret = tmp_path / "secret.txt"
    secret.write_text("top secret host name")
    r = GateResult(gate="toy", checks=[Check(metric="m", candidate=1.0, passed=True)])
    r.images = ["../secret.txt", str(secret)]
    write_gate(r, tmp_path / "g")
    html = (tmp_path / "g" / "gate.html").read_text()
    assert base64.b64encode(secret.read_bytes()).decode() not in html


def test_a_gate_record_binds_its_candidates_key(tmp_path):
    """A record that judged another version of the artifact (its lineage names another key) is not this one's."""
    from core.manifest import read_gate
    from eval.gates import write_gate

    r = GateResult(gate="toy", checks=[Check(metric="m", candidate=1.0, passed=True)],
                   lineage={"candidate": {"stage": "sft", "key": "a" * 16}})  # fmt: skip
    write_gate(r, tmp_path / "g")
    assert read_gate(tmp_path / "g", r.content_sha256(), "a" * 16).passed
    moved = read_gate(tmp_path / "g", r.content_sha256(), "b" * 16)
    assert not moved.passed and "another version of its candidate" in moved.reasons[0]
