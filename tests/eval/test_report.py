"""Gate reports: the HTML is self-contained, puts the verdict first, shows overrides as overrides, and renders in
headless Chromium with the verdict banner visible (screenshot pixels, not just markup)."""

import shutil
import subprocess
from pathlib import Path

import pytest

from data_schemas.gates import GateResult
from eval.report import gate_html, gate_markdown, write_gate_reports


def _result(verdict="fail", **extra):
    return {
        "gate": "bias",
        "verdict": verdict,
        "candidate": "runs/x/sft",
        "parent": "smollm2-135m-instruct",
        "reasons": ["probes: the candidate prefers the stereotyping sentence in 70.0% of 54 pairs"]
        if verdict == "fail"
        else [],
        "checks": [
            {
                "metric": "probes: stereotype preference share",
                "parent": 0.5,
                "candidate": 0.7,
                "delta": 0.2,
                "interval": [0.05, 0.33],
                "limit": "change <= +0.030",
                "passed": verdict == "pass",
            }
        ],  # fmt: skip
        "worst_examples": [{"id": "probe:age:0", "sentence": "<b>not markup</b>", "margin": 1.5}],
        "lineage": {"candidate": {"stage": "sft", "key": "abc"}},
        "policy": {"max_share_increase": 0.03},
        "finished_at": "2026-11-22T10:00:00Z",
        **extra,
    }


def test_verdict_first_and_user_text_escaped():
    page = gate_html(_result())
    assert (
        page.index("Bias gate: FAIL")
        < page.index("Why it failed")
        < page.index("Checks")
        < page.index("Sign-off")
    )
    assert "&lt;b&gt;not markup&lt;/b&gt;" in page and "<b>not markup</b>" not in page
    assert "http" not in page.replace("https://", "")  # nothing fetched from elsewhere: self-contained
    md = gate_markdown(_result())
    assert md.startswith("# Bias gate: **FAIL**") and "| probes: stereotype preference share |" in md


def test_override_is_shown_as_an_override_never_as_a_pass():
    failed = GateResult.model_validate(_result())
    o = {"reviewer": "R. Chen", "reason": "known probe issue", "at": "2026-11-22"}
    page = gate_html({**_result(), "override": {**o, "record_sha256": failed.content_sha256()}})
    assert "FAIL, OVERRIDDEN by R. Chen" in page and "known probe issue" in page
    assert "Bias gate: PASS" not in page
    void = gate_html(_result(override=o))  # an override that names no record (or another) is not in force
    assert "OVERRIDDEN" not in void and "another version of this record" in void


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("headless Chromium is not installed (.ci/run installs Debian's chromium)")


@pytest.mark.parametrize("verdict,colour", [("fail", (0xB3, 0x26, 0x1E)), ("pass", (0x1B, 0x7F, 0x3B))])
def test_report_renders_in_headless_chromium_with_the_verdict_visible(tmp_path, verdict, colour):
    from PIL import Image

    chromium = _chromium()
    write_gate_reports(_result(verdict), tmp_path)
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1000,700"]  # fmt: skip
    subprocess.run([chromium, *flags, f"--screenshot={shot}", (tmp_path / "gate.html").as_uri()], check=True, capture_output=True, timeout=120)  # fmt: skip
    dom = subprocess.run([chromium, *flags, "--dump-dom", (tmp_path / "gate.html").as_uri()], check=True, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert f"Bias gate: {verdict.upper()}" in dom.stdout
    img = Image.open(shot).convert("RGB")
    w, h = img.size
    # The banner is the first thing on the page: the verdict colour fills a wide strip near the top.
    top = [img.getpixel((x, y)) for y in range(20, 90, 5) for x in range(60, w - 60, 20)]
    share = sum(all(abs(a - b) < 12 for a, b in zip(p, colour, strict=True)) for p in top) / len(top)
    assert share > 0.5, share


def test_reviewer_text_is_never_markup_even_in_the_title(tmp_path):
    """An override's reviewer name reaches the <title> and the banner: autoescaped there too."""
    evil = "</title><script>alert(1)</script>"
    page = gate_html(
        _result(override={"reviewer": evil, "reason": "<img src=x onerror=alert(2)>", "at": "now"})
    )
    assert "<script>" not in page and "<img src=x" not in page
    assert "&lt;/title&gt;&lt;script&gt;" in page


def test_run_report_links_are_relative_to_the_run_even_for_a_relative_run_dir(tmp_path, monkeypatch):
    from eval.report import write_run_report

    monkeypatch.chdir(tmp_path)
    run = Path("runs/x")  # relative, as `align run` is usually given it
    (run / "gates" / "sft-bias").mkdir(parents=True)
    manifest = {
        "status": "complete",
        "key": "k" * 16,
        "model": {"name": "<b>m</b>"},
        "metrics": {"loss": 1.0},
    }
    gate = {"stage": "sft", "gate": "bias", "verdict": "fail", "passed": False, "override": None,
            "reasons": ["<script>x</script>"], "report": str(run / "gates" / "sft-bias" / "gate.html")}  # fmt: skip
    page = write_run_report(run, [("sft", manifest, [gate])]).read_text()
    assert 'href="gates/sft-bias/gate.html"' in page and "Run: FAIL" in page
    assert "<script>x" not in page and "<b>m</b>" not in page
