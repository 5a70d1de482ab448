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


def _in_chromium(page: Path, shot: Path, profile: Path, size: str) -> str:
    """`page` opened in headless Chromium (skipped without it): a screenshot at `shot`, and the DOM it rendered."""
    chromium = _chromium()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--hide-scrollbars", f"--window-size={size}"]  # fmt: skip
    subprocess.run([chromium, *flags, f"--screenshot={shot}", page.as_uri()], check=True, capture_output=True, timeout=120)  # fmt: skip
    return subprocess.run([chromium, *flags, "--dump-dom", page.as_uri()], check=True, capture_output=True, text=True, timeout=120).stdout  # fmt: skip


@pytest.mark.parametrize("verdict,colour", [("fail", (0xB3, 0x26, 0x1E)), ("pass", (0x1B, 0x7F, 0x3B))])
def test_report_renders_in_headless_chromium_with_the_verdict_visible(tmp_path, verdict, colour):
    from PIL import Image

    write_gate_reports(_result(verdict), tmp_path)
    shot = tmp_path / "shot.png"
    dom = _in_chromium(tmp_path / "gate.html", shot, tmp_path / "profile", "1000,700")
    assert f"Bias gate: {verdict.upper()}" in dom
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


def test_the_run_report_shows_what_changed_in_a_browser(tmp_path):
    """The run report a reviewer opens: each stage's duration, what it started from (DPO: its SFT parent, not the
    root model), its figures by name, its training curve (an inline SVG drawn from metrics.jsonl), and each gate's
    verdict with the figure it rests on. Rendered in headless Chromium; the screenshot is kept beside the report
    (tmp_path/run/report.png) as the test's artifact."""
    import json

    from PIL import Image

    from eval.report import deciding_figure, write_run_report

    run = tmp_path / "run"
    for name, losses in (("sft", [2.0, 1.5, 1.2, 1.1]), ("dpo", [0.693, 0.6, 0.52])):
        (run / name).mkdir(parents=True)
        (run / name / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": i + 1, "loss": v}) + "\n" for i, v in enumerate(losses))
            + json.dumps({"step": len(losses), "eval_loss": losses[-1] + 0.1})
            + "\n"
        )
    (run / "gates" / "dpo-bias").mkdir(parents=True)
    gate = GateResult.model_validate(_result("fail"))
    figure = deciding_figure(gate)
    assert figure == ("probes: stereotype preference share: 0.7 (parent 0.5), change in [0.05, 0.33]; allowed "
                      "change <= +0.030")  # fmt: skip
    sft = {"status": "complete", "key": "a" * 16, "model": {"name": "smollm2-135m-instruct"},
           "metrics": {"train_loss": 1.2345678, "eval_perplexity": 51792.64, "global_step": 4}}  # fmt: skip
    dpo = {"status": "complete", "key": "b" * 16, "model": {"name": "smollm2-135m-instruct"},
           "parents": [{"stage": "sft", "key": "a" * 16}, {"stage": "preferences", "key": "c" * 16}],
           "metrics": {"heldout_rewards_accuracies": 0.75}}  # fmt: skip
    g = {"stage": "dpo", "gate": "bias", "verdict": "fail", "passed": False, "override": None, "reasons": [],
         "report": str(run / "gates" / "dpo-bias" / "gate.html"), "figure": figure}  # fmt: skip
    page = write_run_report(
        run, [("sft", sft, []), ("dpo", dpo, [g])], seconds={"sft": 75.2, "dpo": 8.0}
    ).read_text()
    assert "1m 15s" in page and "8s" in page
    assert "train loss 1.235" in page and "eval perplexity 5.179e+04" in page
    assert "sft (aaaaaaaaaaaa)" in page  # DPO started from its SFT parent
    assert (
        page.count("<polyline") == 2 and "loss: 2 &rarr; 1.1 (4 points)" in page
    )  # one eval point: no curve
    assert "change in [0.05, 0.33]; allowed change &lt;= +0.030" in page
    md = (run / "report.md").read_text()
    assert "| dpo | complete | 8s | sft (aaaaaaaaaaaa) |" in md
    shot = run / "report.png"
    dom = _in_chromium(run / "report.html", shot, tmp_path / "profile", "1100,900")
    assert "Run: FAIL" in dom and dom.count("<polyline") == 2
    img = Image.open(shot).convert("RGB")
    blue = sum(
        1 for p in img.getdata() if abs(p[0] - 0x34) < 30 and abs(p[1] - 0x61) < 30 and abs(p[2] - 0xC1) < 30
    )
    assert blue > 100, blue  # the curves are drawn, not only written


def test_a_reported_statistic_is_not_shown_as_a_pass():
    """The bias gate shows the statistic that does not decide beside the one that does: it reads 'reported, not
    deciding', styled apart, never as a green pass."""
    r = _result("pass")
    r["checks"].append({"metric": "probes: mean margin", "candidate": 0.1, "parent": 0.0,
                        "limit": "reported (share decides)", "passed": True})  # fmt: skip
    page = gate_html(r)
    assert (
        '<td class="info">reported, not deciding</td>' in page and page.count('<td class="ok">pass</td>') == 1
    )
    assert "| reported, not deciding |" in gate_markdown(r)
