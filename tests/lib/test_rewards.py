"""lib/rewards: the weighted list of rewards, the verifiers on hand-made cases (bad code included), the judge's
failure handling and cache."""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import pytest
from pydantic import TypeAdapter

from core.config import UserError
from data_schemas.config.rewards import RewardFunction
from lib.rewards import Rewards
from lib.rewards.code import code_of, run_program
from lib.rewards.judge import Judge, parse_rating
from lib.rewards.verifiers import answers_equal, as_number, final_answer

ROW = TypeAdapter(RewardFunction)
P = [{"role": "user", "content": "What is 6 x 7?"}]


def rewards(*rows: dict, **kw) -> Rewards:
    return Rewards([ROW.validate_python(r) for r in rows], **kw)


# -- exact answers ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "response,numeric,want",
    [
        ("6 x 7 is 42.", True, "42"),
        ("First 40, then 2 more: \\boxed{42} and done", True, "42"),
        ("Natalia sold 48/2 = 24 clips.\n#### 1,234", True, "1,234"),
        ("The answer is: 3/4 of the cake", True, "3/4"),
        ("The final answer is Paris.", False, "Paris."),
        ("no number here", True, None),
    ],
)
def test_the_final_answer_of_a_response(response, numeric, want):
    assert final_answer(response, numeric) == want


def test_numbers_and_answers_compare_after_normalisation():
    assert [as_number(x) for x in ("1,234", "3/4", "50%", "$5.", "\\frac{1}{2}", "-.5", "abc")] == [
        1234.0, 0.75, 0.5, 5.0, 0.5, -0.5, None,
    ]  # fmt: skip
    assert answers_equal("0.5", "1/2", True, 1e-6) and answers_equal("**Paris.**", "paris", False, 0)
    assert not answers_equal("42.1", "42", True, 1e-6) and answers_equal("41.99999999", "42", True, 1e-6)


def test_exact_answer_rewards_right_answers_and_skips_rows_without_a_reference():
    r = rewards({"kind": "exact_answer"})
    responses = ["It is 42.", "It is 41.", "\\boxed{42}", "forty-two", "It is 42."]
    columns = [{"answer": "42"}, {"answer": "42"}, {"answer": "#### 42"}, {"answer": "42"}, {}]
    got = r([P] * 5, responses, columns)
    assert got.parts["exact_answer"] == [1.0, 0.0, 1.0, 0.0, None] and got.total == [1.0, 0.0, 1.0, 0.0, 0.0]
    text = rewards({"kind": "exact_answer", "answer_field": "capital"})
    assert text(
        [P] * 2, ["The answer is Paris.", "The answer is Lyon"], [{"capital": "paris"}] * 2
    ).total == [1, 0]


# -- format checks ---------------------------------------------------------------------------------------------
def test_regex_and_json_schema_rewards():
    fmt = rewards({"kind": "regex", "pattern": r"^<think>.*</think>\s*\S", "full_match": False})
    assert fmt([P] * 2, ["<think>a\nb</think> 42", "42"]).total == [1.0, 0.0]
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    js = rewards({"kind": "json_schema", "schema": schema})
    answers = ['{"n": 3}', 'Here:\n```json\n{"n": 4}\n```', '{"n": "x"}', "not json", "[1]"]
    assert js([P] * 5, answers).total == [1.0, 1.0, 0.0, 0.0, 0.0]
    with pytest.raises(UserError, match="the schema is not valid JSON Schema"):
        rewards({"kind": "json_schema", "schema": {"type": "no-such-type"}})
    with pytest.raises(UserError, match="is not a regular expression"):
        rewards({"kind": "regex", "pattern": "("})


def test_contains_and_frequency_are_the_former_rules():
    r = rewards({"kind": "contains", "text": "Road"}, {"kind": "frequency", "text": "e", "weight": 2.0})
    got = r([P] * 2, ["the road", "xyz"])
    assert got.parts == {"contains": [1.0, 0.0], "frequency": [1 / 8, 0.0]}
    assert got.total == pytest.approx([1 + 2 / 8, 0.0])


# -- code ------------------------------------------------------------------------------------------------------
SOLUTION = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\n"
TESTS = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"]


def test_code_is_the_last_fenced_block_and_tests_pass_in_share():
    assert code_of(SOLUTION).strip() == "def add(a, b):\n    return a + b" and code_of("x = 1") == "x = 1"
    r = rewards({"kind": "code_tests", "timeout_s": 5})
    got = r(
        [P] * 3, [SOLUTION, "def add(a, b): return 0", SOLUTION], [{"tests": TESTS}, {"tests": TESTS}, {}]
    )
    assert got.parts["code_tests"] == [pytest.approx(2 / 3), pytest.approx(1 / 3), None]


@pytest.mark.parametrize(
    "program,what",
    [
        ("while True:\n    pass\n", "timed out"),
        ("import os\nwhile True:\n    os.fork()\n", "os.fork"),
        ("import subprocess\nsubprocess.run(['true'])\n", "not allowed"),
        ("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n", "socket"),
        ("import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)\n", "socket"),
        ("x = bytearray(8 * 1024**3)\n", "MemoryError"),
        ("import ctypes\n", "not allowed"),
        ("open('/tmp/align-sandbox-escape', 'w').write('x')\n", "writing"),
    ],
)
def test_bad_code_fails_within_its_limits(program, what):
    """An infinite loop, a fork bomb, a subprocess, network calls, a memory hog, ctypes, a write outside its folder:
    each fails its test inside the limits, and leaves nothing running."""
    t0 = time.monotonic()
    ok, detail = run_program(program, timeout_s=2.0, memory_mb=512)
    assert not ok and what in detail, detail
    assert time.monotonic() - t0 < 10
    left = subprocess.run(["pgrep", "-f", "align-code-"], capture_output=True, text=True).stdout.split()
    assert not left  # the process group is gone


def test_code_may_use_its_own_folder_and_the_standard_library():
    ok, detail = run_program(
        "import json, math, collections\nopen('x.txt', 'w').write('1')\nassert open('x.txt').read() == '1'\n",
        timeout_s=5,
        memory_mb=512,
    )
    assert ok, detail


# -- the weighted list and its failures ------------------------------------------------------------------------
def test_weights_sum_and_none_adds_nothing():
    r = rewards({"kind": "exact_answer", "weight": 2.0}, {"kind": "contains", "text": "42", "weight": -0.5})
    got = r([P] * 2, ["It is 42.", "It is 42."], [{"answer": "42"}, {}])
    assert got.total == [2.0 - 0.5, -0.5] and r.names == ["exact_answer", "contains"]
    assert got.means() == {"exact_answer": 1.0, "contains": 1.0}


def test_a_reward_function_that_raises_names_the_row(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def picky(prompts, completions, answer, **kw):\n"
        "    return [1.0 if int(a) == 42 else 0.0 for a in answer]\n"
        "def short(prompts, completions, **kw):\n"
        "    return [1.0]\n"
        "def nan(prompts, completions, **kw):\n"
        "    return [float('nan')] * len(completions)\n"
        "def scaled(prompts, completions, scale, **kw):\n"
        "    return [scale * len(c) for c in completions]\n"
    )
    monkeypatch.chdir(tmp_path)
    r = rewards({"kind": "python", "function": "my_rewards:picky"})
    columns = [{"answer": "42"}, {"answer": "forty-two"}]
    with pytest.raises(UserError) as e:
        r([P, P], ["a", "b"], columns, ["prompts.jsonl:7", "prompts.jsonl:9"])
    said = str(e.value)
    assert "reward python (python: my_rewards:picky) raised on prompts.jsonl:9" in said
    assert "ValueError: invalid literal for int()" in said and "'b'" in said
    with pytest.raises(UserError, match="returned 1 values for 2 responses"):
        rewards({"kind": "python", "function": "my_rewards:short"})([P, P], ["a", "b"])
    with pytest.raises(UserError, match="returned nan, not a finite number"):
        rewards({"kind": "python", "function": "my_rewards:nan"})([P], ["a"])
    opts = rewards({"kind": "python", "function": "my_rewards:scaled", "options": {"scale": 0.5}})
    assert opts([P], ["abcd"]).total == [2.0]
    with pytest.raises(UserError, match="cannot be imported"):
        rewards({"kind": "python", "function": "no_such_module:f"})


# -- the judge -------------------------------------------------------------------------------------------------
def test_ratings_are_read_from_the_judges_reply():
    assert [parse_rating(x) for x in ("8", "Rating: 10/10", "I'd say 7.", "none", "")] == [
        0.8,
        1.0,
        0.7,
        None,
        None,
    ]


def _judge(port: int, tmp_path, **kw) -> Judge:
    spec = ROW.validate_python(
        {
            "kind": "judge",
            "url": f"http://127.0.0.1:{port}/v1",
            "model": "m",
            "retries": 1,
            "timeout_s": 0.5,
            **kw,
        }
    )
    return Judge(spec, tmp_path / "cache" / "ratings.sqlite")


def test_the_judge_says_which_endpoint_failed_after_retries(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    j = _judge(port, tmp_path)
    with pytest.raises(
        UserError, match=rf"127.0.0.1:{port}/v1/chat/completions did not answer after 2 tries"
    ):
        j([P], ["an answer"], [{}])
    assert j.requests == 2


def test_the_judge_times_out_on_a_server_that_never_answers(tmp_path):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)  # accepts connections, never answers
    try:
        j = _judge(srv.getsockname()[1], tmp_path, retries=0)
        t0 = time.monotonic()
        with pytest.raises(UserError, match="did not answer after 1 tries"):
            j([P], ["an answer"], [{}])
        assert time.monotonic() - t0 < 5
    finally:
        srv.close()


def test_cached_ratings_are_not_asked_again(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    j = _judge(port, tmp_path)
    j.cache.put(j.key("user: What is 6 x 7?", "42"), "9")
    assert j([P], ["42"], [{}]) == [0.9] and j.requests == 0
    again = _judge(port, tmp_path)  # a resumed run: the cache is on disk
    assert again([P], ["42"], [{}]) == [0.9] and again.requests == 0
    assert threading.active_count() >= 1


@pytest.mark.slow
@pytest.mark.real_model
def test_the_judge_rates_through_a_real_local_vllm_server(tmp_path, real_model_path):
    """A real OpenAI-compatible server (vLLM's, serving the real SmolLM2-135M-Instruct) rates every response through
    structured outputs; a second look asks nothing (the cache). About 2 minutes on 2 cores (the server's start)."""
    import json
    import os
    import sys
    import urllib.request

    pytest.importorskip("vllm")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(real_model_path), "--port",
           str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--served-model-name",
           "judge"]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                    assert json.loads(r.read())["data"][0]["id"] == "judge"
                    break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "the vLLM server did not start in 400 s"
                time.sleep(2)
        judge = _judge(port, tmp_path, timeout_s=120)
        prompts = [P, [{"role": "user", "content": "Name a colour."}]]
        got = judge(prompts * 2, ["42", "Blue.", "I refuse.", "Green"], [{}] * 4)
        assert all(x is not None and 0.0 <= x <= 1.0 for x in got) and judge.requests == 4
        assert (
            judge(prompts * 2, ["42", "Blue.", "I refuse.", "Green"], [{}] * 4) == got and judge.requests == 4
        )
    finally:
        os.killpg(server.pid, 9)
        server.wait()
        log.close()
