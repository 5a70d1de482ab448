"""The loop a person runs: `align annotate serve` on the real SmolLM2 policy, the page in headless Chromium
(Selenium with Debian's chromium-driver), ranked with the keyboard and by dragging, then `export` into
`check-rankings` and `build-preferences`. Screenshots of both pages are kept in build/test-artifacts/."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from align.cli import main
from tests.align.test_annotate import free_port, serve_in_subprocess, stop_server

ROOT = Path(__file__).resolve().parents[2]
ALIGN = [sys.executable, "-m", "align"]
ARTIFACTS = ROOT / "build" / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.real_model


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is installed by scripts/setup.sh")
    if not (CHROMIUM and DRIVER):
        pytest.skip(
            "headless Chromium and chromedriver are not installed (scripts/setup.sh installs them as root)"
        )
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900"):  # fmt: skip
        opts.add_argument(flag)
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(DRIVER))


def _wait(fn, timeout=180.0, what="the page"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = fn()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*ALIGN, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_rank_the_real_policys_samples_in_a_browser_and_train_on_them(tmp_path, real_model_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = _browser()
    d = tmp_path / "ann"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt_id": "cactus", "prompt": "How do I repot a cactus? Answer in two sentences."}) + "\n"
        + json.dumps({"prompt_id": "tags", "prompt": "What does <script>alert(1)</script> do in HTML?"}) + "\n"
    )  # fmt: skip
    r = _cli("annotate", "add-annotator", "ann-1", "--dir", str(d))
    assert r.returncode == 0, r.stderr
    token = r.stdout.splitlines()[1].strip()
    boss = _cli("annotate", "add-annotator", "boss", "--organiser", "--dir", str(d)).stdout.splitlines()[1]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    serve = None
    try:
        serve = serve_in_subprocess(
            ["--dir", str(d), "--policy", str(real_model_path), "--prompts", str(prompts), "--k", "3",
             "--max-new-tokens", "16", "--engine", "generate"],
            port, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        driver.get(f"{base}/#token={token}")
        assert "token" not in driver.current_url  # the token leaves the address bar at once

        # prompt 1: keyboard only. Move the first response down one place, tie it with the one now above it,
        # flag the last unsafe, write a note, submit with Ctrl+Enter.
        first = _wait(lambda: driver.execute_script("return document.body.dataset.promptId"), 300, "a prompt")
        shown = [li.get_attribute("data-id") for li in driver.find_elements(By.CSS_SELECTOR, "#responses li")]
        assert len(shown) == 3
        assert (
            "<script>" not in driver.find_element(By.ID, "prompt").get_attribute("innerHTML")
            or first == "cactus"
        )
        keys = ActionChains(driver)
        keys.key_down(Keys.SHIFT).send_keys(Keys.ARROW_DOWN).key_up(Keys.SHIFT)  # [b, a, c], focus on a
        keys.send_keys("t").send_keys(Keys.ARROW_DOWN).send_keys("u").perform()  # a tied with b; c unsafe
        driver.find_element(By.ID, "note").send_keys("the third one is <b>rude</b>")
        driver.save_screenshot(str(ARTIFACTS / "annotate-page.png"))
        ActionChains(driver).key_down(Keys.CONTROL).send_keys(Keys.ENTER).key_up(Keys.CONTROL).perform()
        second = _wait(
            lambda: (p := driver.execute_script("return document.body.dataset.promptId")) != first and p, 300
        )

        # prompt 2: the one whose text holds markup: shown as text, never run
        html = driver.find_element(By.ID, "prompt").get_attribute("innerHTML")
        assert "&lt;script&gt;" in html and "<script>" not in html
        assert driver.execute_script("return document.querySelectorAll('#prompt script').length") == 0
        shown2 = [
            li.get_attribute("data-id") for li in driver.find_elements(By.CSS_SELECTOR, "#responses li")
        ]
        driver.execute_script(  # drag the first response onto the last (HTML5 drag and drop, as a mouse would)
            """const lis = document.querySelectorAll('#responses li'); const dt = new DataTransfer();
               lis[0].dispatchEvent(new DragEvent('dragstart', {dataTransfer: dt, bubbles: true}));
               lis[2].dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));"""
        )
        after = [li.get_attribute("data-id") for li in driver.find_elements(By.CSS_SELECTOR, "#responses li")]
        assert after == [shown2[1], shown2[2], shown2[0]]
        ActionChains(driver).key_down(Keys.CONTROL).send_keys(Keys.ENTER).key_up(Keys.CONTROL).perform()
        _wait(lambda: "All done" in driver.find_element(By.ID, "message").text, 60, "the end message")
        timings = driver.execute_script("return window.alignTimings")

        driver.get(f"{base}/organiser#token={boss.strip()}")
        _wait(lambda: "2 of 2" in driver.find_element(By.ID, "overall").text, 60, "the organiser's numbers")
        driver.save_screenshot(str(ARTIFACTS / "annotate-organiser.png"))
    finally:
        driver.quit()
        log = stop_server(serve) if serve is not None else ""
    (ARTIFACTS / "annotate-timings.json").write_text(json.dumps({"ms_to_prompt_shown": timings}))

    lines = [json.loads(x) for x in (d / "rankings.jsonl").read_text().splitlines()]
    assert [x["prompt_id"] for x in lines] == [first, second], log
    one, two = lines
    assert one["ranking"] == [[shown[1], shown[0]], shown[2]]
    assert one["notes"] == f"[flag {shown[2]}: unsafe] the third one is <b>rude</b>"
    assert two["ranking"] == [shown2[1], shown2[2], shown2[0]]
    samples = {
        json.loads(x)["prompt_id"]: json.loads(x) for x in (d / "samples.jsonl").read_text().splitlines()
    }
    assert one["responses"] == samples[first]["responses"] and samples[first]["engine"] == "generate"
    assert len({r["text"] for r in samples[first]["responses"]}) == 3  # K distinct answers of the real model

    # straight into the next stages
    out = tmp_path / "rankings.jsonl"
    assert main(["annotate", "export", "--dir", str(d), "--to", str(out)]) == 0
    assert main(["data", "check-rankings", "--strict", str(out)]) == 0
    prefs = [
        "data",
        "build-preferences",
        str(out),
        "--out",
        str(tmp_path / "prefs"),
        "--set",
        "validation_fraction=0",
    ]
    assert main(prefs) == 0
    counts = json.loads((tmp_path / "prefs" / "manifest.json").read_text())["counts"]
    assert counts["kwise"]["train"] == 2 and counts["pairs"]["train"] == 2 + 3  # (b=a)>c: 2 pairs; 3 more
