"""The annotation page's speed, as annotators feel it, and the sampler's throughput while they work.

    .venv/bin/python bench/annotate.py [--judgments 30] [--policy smollm2-135m-instruct] [--sample-prompts 8]

1. Page: `align annotate serve` on a folder whose samples are all drawn (the page never waits on generation);
   headless Chromium (Selenium) opens the page and submits `--judgments` rankings with the keyboard. Recorded: ms
   from page load to the first prompt shown, and from each submit (Ctrl+Enter) to the next prompt shown
   (median, p95), measured in the page (`window.alignTimings`); the same round trip through the HTTP API alone.
2. Sampling while annotators work: `serve` on a fresh folder of the real policy with a scripted annotator judging
   every prompt as soon as it is ready, against `align annotate sample` on the same prompts alone (the plain
   sampler; ratio = responses/s with the server and an annotator / alone).
Results: bench/results/annotate.json; the table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import cpu_flags, save  # noqa: E402
from tests.align.test_annotate import (  # noqa: E402
    Client,
    free_port,
    serve_in_subprocess,
    stop_server,
    write_samples,
)
from tests.align.test_annotate_browser import _browser  # noqa: E402

ALIGN = [sys.executable, "-m", "align"]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def page(work: Path, judgments: int) -> dict:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from align.annotate import add_annotator
    from core.manifest import sha256_path

    d = work / "page"
    settings = write_samples(d, 2 * judgments + 2, k=4)  # the page and the API annotator each get their own
    prompts = work / "p.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt_id": f"p{i}", "prompt": "q"}) + "\n" for i in range(judgments + 1))
    )
    (d / "session.json").write_text(
        settings.model_copy(
            update={"prompts": str(prompts), "prompts_sha256": sha256_path(prompts)}
        ).model_dump_json()
    )
    token, api_token = add_annotator(d, "ann-page"), add_annotator(d, "ann-api")
    port = free_port()
    server = serve_in_subprocess(["--dir", str(d)], port, stderr=subprocess.DEVNULL)
    driver = _browser()
    try:
        driver.get(f"http://127.0.0.1:{port}/#token={token}")
        shown = lambda: len(driver.execute_script("return window.alignTimings") or [])  # noqa: E731
        while shown() < 1:
            time.sleep(0.01)
        for i in range(judgments):
            keys = ActionChains(driver).send_keys(
                Keys.ARROW_DOWN, "t"
            )  # tie the first two: a ranking with a tie
            keys.key_down(Keys.CONTROL).send_keys(Keys.ENTER).key_up(Keys.CONTROL).perform()
            while shown() < i + 2:
                time.sleep(0.005)
        timings = driver.execute_script("return window.alignTimings")
        assert driver.find_elements(By.CSS_SELECTOR, "#responses li")
        c = Client(f"http://127.0.0.1:{port}", api_token)
        api = []
        for _ in range(judgments):
            t = time.perf_counter()
            task = c.call("/api/next")[1]
            if task["state"] != "ready":
                break
            c.call(
                "/api/judgments",
                {"prompt_id": task["prompt_id"], "ranking": [r["id"] for r in task["responses"]]},
            )
            c.call("/api/next")
            api.append((time.perf_counter() - t) * 1000)
    finally:
        driver.quit()
        stop_server(server)
    first, later = timings[0], timings[1:]
    return {
        "judgments": len(later),
        "page_load_to_first_prompt_ms": first,
        "submit_to_next_prompt_ms": {
            "median": statistics.median(later),
            "p95": _pct(later, 0.95),
            "max": max(later),
        },
        "api_submit_and_next_ms": {"median": statistics.median(api), "p95": _pct(api, 0.95)},
    }


def sampling(work: Path, policy: str, n: int, k: int, max_new_tokens: int, engine: str) -> dict:
    from align.annotate import add_annotator

    prompts = ROOT / "examples" / "data" / "instructions_validation.jsonl"
    common = ["--policy", policy, "--prompts", str(prompts), "--k", str(k), "--max-prompts", str(n),
              "--max-new-tokens", str(max_new_tokens), "--engine", engine]  # fmt: skip
    t = time.perf_counter()
    r = subprocess.run([*ALIGN, "annotate", "sample", "--dir", str(work / "alone"), *common], cwd=ROOT,
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    alone_s = time.perf_counter() - t
    alone = [json.loads(x) for x in (work / "alone" / "samples.jsonl").read_text().splitlines()]

    d = work / "served"
    token = add_annotator(d, "ann-1")
    boss = add_annotator(d, "boss", organiser=True)
    port = free_port()
    t = time.perf_counter()
    server = serve_in_subprocess(["--dir", str(d), *common], port, stderr=subprocess.DEVNULL)
    c = Client(f"http://127.0.0.1:{port}", token)
    judged = 0
    try:
        while True:
            task = c.call("/api/next")[1]
            if task["state"] == "done":
                break
            if task["state"] == "waiting":
                time.sleep(0.2)
                continue
            c.call(
                "/api/judgments",
                {"prompt_id": task["prompt_id"], "ranking": [r["id"] for r in task["responses"]]},
            )
            judged += 1
        served_s = time.perf_counter() - t
        status = Client(f"http://127.0.0.1:{port}", boss).call("/api/stats")[1]["sampling"]
    finally:
        stop_server(server)
    served = [json.loads(x) for x in (d / "samples.jsonl").read_text().splitlines()]
    same = [a["responses"] == b["responses"] for a, b in zip(alone, served, strict=True)]
    return {
        "policy": policy,
        "prompts": n,
        "k": k,
        "max_new_tokens": max_new_tokens,
        "engine": engine,
        "alone_wall_s": alone_s,
        "served_wall_s_until_all_judged": served_s,
        "served_sampler_responses_per_s": status["responses_per_s"],
        "served_sampler_tokens_per_s": status["tokens_per_s"],
        "judged_while_sampling": judged,
        "same_samples_as_alone": all(same),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--judgments", type=int, default=30)
    ap.add_argument("--policy", default="smollm2-135m-instruct")
    ap.add_argument("--sample-prompts", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--engine", choices=["generate", "vllm"], default="generate", help="the sampler's engine")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "annotate.json")
    a = ap.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory(dir=ROOT / "build") as tmp:
        work = Path(tmp)
        result = {
            "machine": {
                "cpu_flags": cpu_flags(),
                "cores": os.cpu_count(),
                "python": platform.python_version(),
            },
            "page": page(work, a.judgments),
            "sampling": sampling(work, a.policy, a.sample_prompts, a.k, a.max_new_tokens, a.engine),
        }
    save(a.out, "annotate", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
