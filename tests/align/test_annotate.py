"""`align annotate`: tokens, the judgment log, assignment, and the HTTP API of a real uvicorn server on 127.0.0.1.
(The sampler on a model and the page in a real browser: tests/align/test_annotate_browser.py.)"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from align.annotate import (
    Desk,
    JsonlLog,
    Refused,
    Sampler,
    add_annotator,
    flags_in,
    make_app,
    read_prompts,
)
from align.cli import main
from data_schemas.config import SessionSettings
from data_schemas.rankings import Submission
from lib.rankings import read_rankings

ROOT = Path(__file__).resolve().parents[2]
ALIGN = [sys.executable, "-m", "align"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_samples(d: Path, n: int, k: int = 3) -> SessionSettings:
    """A folder with n sampled prompts (texts made up; the sampler itself is tested on a model elsewhere)."""
    d.mkdir(parents=True, exist_ok=True)
    log = JsonlLog(d / "samples.jsonl")
    for i in range(n):
        log.append(
            {
                "prompt_id": f"p{i}",
                "prompt": [{"role": "user", "content": f"question {i} <b>bold?</b>"}],
                "responses": [{"id": f"r{j + 1}", "text": f"answer {j} to {i}"} for j in range(k)],
            }
        )
    log.close()
    return SessionSettings(policy="made-up", prompts="made-up.jsonl", prompts_sha256="0" * 64, k=k)


class Client:
    def __init__(self, base: str, token: str | None = None):
        self.base, self.token = base, token

    def call(self, path: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict]:
        h = {"Content-Type": "application/json", **(headers or {})}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, {"error": raw.decode()}


def serve_in_subprocess(args: list[str], port: int, wait_s: float = 120.0, **popen) -> subprocess.Popen:
    """`align annotate serve ARGS --port PORT` in a process group of its own, returned once /api/health answers
    (killed, and its output said, when it exits or does not answer in time)."""
    popen = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, **popen}
    p = subprocess.Popen([*ALIGN, "annotate", "serve", *args, "--port", str(port)], cwd=ROOT,
                         start_new_session=True, **popen)  # fmt: skip
    end = time.monotonic() + wait_s
    while time.monotonic() < end and p.poll() is None:
        try:
            if Client(f"http://127.0.0.1:{port}").call("/api/health")[0] == 200:
                return p
        except OSError:
            time.sleep(0.1)
    said = stop_server(p, signal.SIGKILL)
    raise AssertionError(f"align annotate serve did not answer on port {port}: {said}")


def stop_server(p: subprocess.Popen, sig: int = signal.SIGTERM):
    """Signal the server's process group; its captured output (if any) once it has exited."""
    if p.poll() is None:
        os.killpg(p.pid, sig)
    return p.communicate(timeout=60)[0 if p.stdout is not None else 1]


@pytest.fixture
def server(tmp_path):
    """A real uvicorn server on 127.0.0.1 over a folder of 12 sampled prompts; yields (base url, desk, folder)."""
    import uvicorn

    started = []

    def start(n: int = 12, overlap: int = 1):
        d = tmp_path / "ann"
        desk = Desk(d, write_samples(d, n).model_copy(update={"overlap": overlap}))
        port = free_port()
        srv = uvicorn.Server(uvicorn.Config(make_app(desk), host="127.0.0.1", port=port, log_level="warning"))
        t = threading.Thread(target=srv.run, daemon=True)
        t.start()
        for _ in range(200):
            if srv.started:
                break
            time.sleep(0.05)
        started.append((srv, t))
        return f"http://127.0.0.1:{port}", desk, d

    yield start
    for srv, t in started:
        srv.should_exit = True
        t.join(timeout=10)


def test_tokens_are_stored_hashed_and_every_api_call_needs_one(server):
    base, desk, d = server()
    token = add_annotator(d, "ann-1")
    boss = add_annotator(d, "boss", organiser=True)
    stored = (d / "annotators.json").read_text()
    assert token not in stored and boss not in stored and "token_sha256" in stored
    assert Client(base).call("/api/next")[0] == 401
    assert Client(base, "not-a-token").call("/api/next")[0] == 401
    status, body = Client(base, token).call("/api/next")
    assert status == 200 and body["state"] == "ready"
    assert Client(base, token).call("/api/stats")[0] == 403  # the organiser's page is the organiser's
    assert Client(base, boss).call("/api/stats")[0] == 200
    with pytest.raises(Exception, match="already has a token"):
        add_annotator(d, "ann-1")
    new = add_annotator(d, "ann-1", replace=True)  # picked up by the running server
    assert Client(base, token).call("/api/next")[0] == 401 and Client(base, new).call("/api/next")[0] == 200
    with pytest.raises(Exception, match="letters, digits"):
        add_annotator(d, "../evil")


def test_a_judgment_round_trips_into_a_ranking_line_that_check_rankings_accepts_unchanged(
    server, tmp_path, capsys
):
    base, desk, d = server(n=3)
    c = Client(base, add_annotator(d, "ann-1"))
    _, task = c.call("/api/next")
    ids = [r["id"] for r in task["responses"]]
    status, body = c.call(
        "/api/judgments",
        {
            "prompt_id": task["prompt_id"],
            "ranking": [ids[2], [ids[0], ids[1]]],
            "flags": {ids[0]: "unsafe"},
            "note": "second <i>one</i> rambles",
        },
    )
    assert status == 200 and body["saved"] and body["progress"]["done"] == 1
    line = json.loads((d / "rankings.jsonl").read_text())
    sample = json.loads((d / "samples.jsonl").read_text().splitlines()[0])
    assert line["prompt_id"] == sample["prompt_id"] and line["responses"] == sample["responses"]
    assert line["ranking"] == [ids[2], [ids[0], ids[1]]] and line["annotator"] == "ann-1"
    assert flags_in(line["notes"]) == {ids[0]: "unsafe"} and "rambles" in line["notes"]
    # the next prompt is another one; the shown order is a shuffle of the sample's
    _, nxt = c.call("/api/next")
    assert nxt["prompt_id"] != task["prompt_id"]
    assert sorted(r["id"] for r in nxt["responses"]) == ["r1", "r2", "r3"]

    out = tmp_path / "rankings.jsonl"
    assert main(["annotate", "export", "--dir", str(d), "--to", str(out)]) == 0
    assert out.read_bytes() == (d / "rankings.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["data", "check-rankings", "--strict", "--json", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["lines_kept"] == 1


def test_concurrent_annotators_lose_no_line(server):
    base, desk, d = server(n=30, overlap=2)
    tokens = {f"ann-{i}": add_annotator(d, f"ann-{i}") for i in range(4)}
    acknowledged: list[tuple[str, str]] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        c = Client(base, tokens[name])
        while True:
            status, task = c.call("/api/next")
            assert status == 200
            if task["state"] != "ready":
                return
            ids = [r["id"] for r in task["responses"]]
            status, body = c.call("/api/judgments", {"prompt_id": task["prompt_id"], "ranking": sorted(ids)})
            assert status == 200 and body["saved"], body
            with lock:
                acknowledged.append((name, task["prompt_id"]))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, tokens))
    lines = [json.loads(x) for x in (d / "rankings.jsonl").read_text().splitlines()]
    assert sorted((x["annotator"], x["prompt_id"]) for x in lines) == sorted(acknowledged)
    assert len(acknowledged) == 30 * 2  # every prompt judged by exactly `overlap` annotators
    per_prompt: dict[str, set[str]] = {}
    for a, p in acknowledged:
        per_prompt.setdefault(p, set()).add(a)
    assert all(len(v) == 2 for v in per_prompt.values())
    rs = read_rankings([d / "rankings.jsonl"])
    assert rs.report.kept == 60 and not rs.report.problems
    stats = Client(base, add_annotator(d, "boss", organiser=True)).call("/api/stats")[1]
    assert stats["judgments"] == 60 and stats["agreement"]["multiply_annotated_prompts"] == 30
    assert stats["agreement"]["kendalls_w_mean"] == pytest.approx(1.0)  # everyone ranked r1 > r2 > r3


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"prompt_id": "nope", "ranking": ["r1", "r2", "r3"]}, 404, "not among"),
        ({"prompt_id": "p0", "ranking": ["r1", "r1", "r3"]}, 400, "more than once"),
        ({"prompt_id": "p0", "ranking": ["r1", "r2"]}, 400, "not ranked"),
        ({"prompt_id": "p0", "ranking": ["r1", "r2", "r9"]}, 400, "unknown response id"),
        ({"prompt_id": "p0", "rankng": ["r1", "r2", "r3"]}, 400, "rankng"),
        ({"prompt_id": "p0", "ranking": ["r1", "r2", "r3"], "flags": {"r1": "boring"}}, 400, "flags.r1"),
        (
            {"prompt_id": "p0", "ranking": ["r1", "r2", "r3"], "flags": {"r7": "unsafe"}},
            400,
            "unknown response id",
        ),
        ({"prompt_id": "p0", "ranking": ["r1", "r2", "r3"], "note": "x" * 2001}, 400, "note"),
        ({"prompt_id": "p0", "ranking": [[]]}, 400, "empty tie group"),
    ],
)
def test_a_bad_judgment_gets_a_clear_4xx_and_writes_nothing(server, body, status, words):
    base, desk, d = server(n=2)
    c = Client(base, add_annotator(d, "ann-1"))
    assert c.call("/api/next")[1]["prompt_id"] == "p0"  # handed out first
    got, answer = c.call("/api/judgments", body)
    assert got == status and words in answer["error"], answer
    assert (d / "rankings.jsonl").read_text() == ""


def test_a_judgment_is_final_a_repeat_is_harmless_and_hosts_and_paths_are_checked(server):
    base, desk, d = server(n=2)
    c = Client(base, add_annotator(d, "ann-1"))
    body = {"prompt_id": "p0", "ranking": ["r1", "r2", "r3"]}
    assert c.call("/api/next")[1]["prompt_id"] == "p0"
    assert c.call("/api/judgments", body)[1]["saved"] is True
    assert c.call("/api/judgments", body) == (
        200,
        {"saved": False, "progress": c.call("/api/next")[1]["progress"]},
    )
    status, answer = c.call("/api/judgments", {**body, "ranking": ["r3", "r2", "r1"]})
    assert status == 409 and "already judged" in answer["error"]
    assert len((d / "rankings.jsonl").read_text().splitlines()) == 1
    assert Client(base).call("/api/health", headers={"Host": "evil.example"})[0] == 400  # DNS rebinding
    assert Client(base).call("/static/..%2fannotate.py")[0] == 404
    with urllib.request.urlopen(base + "/") as r:
        assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        assert b"<script src=" in r.read()


def test_assignment_overlap_leases_and_a_returning_annotator(tmp_path):
    d = tmp_path / "ann"
    desk = Desk(d, write_samples(d, 3).model_copy(update={"overlap": 2, "lease_minutes": 1.0}))
    a = desk.next_for("a")["prompt_id"]
    assert desk.next_for("a")["prompt_id"] == a  # reload: the same prompt, the same order
    assert desk.next_for("a")["responses"] == desk.next_for("a")["responses"]
    assert desk.next_for("b")["prompt_id"] == a  # overlap 2: b shares it
    assert desk.next_for("c")["prompt_id"] != a  # two open leases on it already
    desk.leases["c"].until = 0  # c walked away: the lease expires, c's prompt is free again
    with pytest.raises(Refused, match="not assigned to you"):  # issue 34 B14: only what was handed out
        desk.submit("c", Submission(prompt_id=a, ranking=["r1", "r2", "r3"]))
    desk.submit("a", Submission(prompt_id=a, ranking=["r1", "r2", "r3"]))
    assert desk.next_for("a")["prompt_id"] != a
    with pytest.raises(Refused) as e:
        desk.submit("a", Submission(prompt_id=a, ranking=["r2", "r1", "r3"]))
    assert e.value.status == 409
    # a new desk over the same folder (a restarted server) knows what was judged
    again = Desk(d, desk.settings)
    assert again.progress("a")["done"] == 1 and again.next_for("a")["prompt_id"] != a
    many = Desk(tmp_path / "many", write_samples(tmp_path / "many", 1).model_copy(update={"overlap": 10}))
    orders = {tuple(r["id"] for r in many.next_for(x)["responses"]) for x in ("p", "q", "r", "s", "t", "u")}
    assert len(orders) > 1  # the shown order differs between annotators


def test_a_prompt_leased_to_another_takes_no_second_judgment_beyond_the_overlap(tmp_path):
    """Issue 34 B14: with overlap 1, a judgment for the prompt leased to someone else was accepted (two lines)."""
    d = tmp_path / "ann"
    desk = Desk(d, write_samples(d, 2).model_copy(update={"overlap": 1}))
    a = desk.next_for("a")["prompt_id"]
    assert desk.next_for("b")["prompt_id"] != a
    with pytest.raises(Refused, match="not assigned to you") as e:
        desk.submit("b", Submission(prompt_id=a, ranking=["r1", "r2", "r3"]))
    assert e.value.status == 409
    desk.submit("a", Submission(prompt_id=a, ranking=["r1", "r2", "r3"]))
    assert read_rankings([d / "rankings.jsonl"]).report.kept == 1


def test_a_write_that_fails_half_way_leaves_no_half_line_and_is_not_acknowledged(tmp_path, monkeypatch):
    """Issue 34 B3: on a full disk the failed write left a torn line, the next judgment joined it (200, "saved"),
    and the folder could not be served or exported. Now the half line is cut back and the judgment refused (507)."""
    d = tmp_path / "ann"
    desk = Desk(d, write_samples(d, 3).model_copy(update={"overlap": 1}))
    first = desk.next_for("a")["prompt_id"]
    desk.submit("a", Submission(prompt_id=first, ranking=["r1", "r2", "r3"]))
    second = desk.next_for("a")["prompt_id"]
    real_write = os.write

    def disk_full(fd, data):
        real_write(fd, bytes(data)[:17])  # part of the line reaches the file, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(Refused, match="could not be saved") as e:
        desk.submit("a", Submission(prompt_id=second, ranking=["r2", "r1", "r3"]))
    assert e.value.status == 507
    monkeypatch.setattr(os, "write", real_write)
    desk.submit("a", Submission(prompt_id=second, ranking=["r2", "r1", "r3"]))  # space again: it saves whole
    lines = (d / "rankings.jsonl").read_text().splitlines()
    assert [json.loads(x)["prompt_id"] for x in lines] == [first, second]
    assert Desk(d, desk.settings).progress("a")["done"] == 2  # the folder opens again, nothing lost


def test_a_damaged_line_loses_no_other_judgment(tmp_path, capsys):
    """A line that does not parse (an older align's torn write) is named and skipped: serving and export keep every
    whole judgment (B3: export exported nothing, serve failed with JSONDecodeError)."""
    d = tmp_path / "ann"
    desk = Desk(d, write_samples(d, 3).model_copy(update={"overlap": 1}))
    for _ in range(2):
        pid = desk.next_for("a")["prompt_id"]
        desk.submit("a", Submission(prompt_id=pid, ranking=["r1", "r2", "r3"]))
    desk.log.close()
    good = (d / "rankings.jsonl").read_text().splitlines()
    (d / "rankings.jsonl").write_text(good[0] + "\n" + '{"prompt_id": "p9", "ann' + good[1] + "\n")
    again = Desk(d, desk.settings)
    assert again.progress("a")["done"] == 1 and "rankings.jsonl:2" in again.problems[0]
    out = tmp_path / "export.jsonl"
    assert main(["annotate", "export", "--dir", str(d), "--to", str(out)]) == 0
    assert out.read_text().splitlines() == [good[0]] and "rankings.jsonl:2" in capsys.readouterr().err


def test_export_during_appends_loses_no_acknowledged_judgment(tmp_path):
    """Issue 34 B4: export cut a line a live server was still writing (138 of 1,500 acknowledged judgments lost
    under 4 writers). Now readers never modify the log and read under its shared lock."""
    p = tmp_path / "rankings.jsonl"
    log = JsonlLog(p)
    stop = threading.Event()
    written: list[int] = []

    def writer(w: int) -> None:
        for i in range(150):
            log.append({"w": w, "i": i, "pad": "x" * 3000})  # lines longer than one pipe buffer
            written.append(1)

    def reader() -> None:
        while not stop.is_set():
            from align.annotate.folder import read_jsonl

            read_jsonl(p)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(writer, range(4)))
    stop.set()
    for t in readers:
        t.join()
    rows = [json.loads(x) for x in p.read_text().splitlines()]
    assert len(rows) == len(written) == 600 and len({(r["w"], r["i"]) for r in rows}) == 600


def test_the_token_and_the_size_are_checked_before_any_body_is_read(server):
    """Issue 34 B15: a 150-300 MB body was read before the token was checked (400, not 401; RSS +300 MB), and a
    cross-site text/plain POST needs no preflight."""
    base, desk, d = server(n=1)
    token = add_annotator(d, "ann-1")
    host, port = base.removeprefix("http://").split(":")

    def post(headers: dict, body: bytes = b"") -> int:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.putrequest("POST", "/api/judgments")
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        if body:
            conn.send(body)
        status = conn.getresponse().status
        conn.close()
        return status

    huge = {"Content-Type": "application/json", "Content-Length": str(200 * 2**20)}
    assert post(huge) == 401  # no token: refused before a byte of the body
    assert post({**huge, "Authorization": f"Bearer {token}"}) == 413  # too big: refused on its declared size
    plain = {"Content-Type": "text/plain", "Content-Length": "2", "Authorization": f"Bearer {token}"}
    assert post(plain, b"{}") == 415
    assert (d / "rankings.jsonl").read_text() == ""


def test_a_torn_last_line_is_cut_when_the_log_is_opened(tmp_path):
    p = tmp_path / "rankings.jsonl"
    p.write_text('{"a": 1}\n{"b": 2}\n{"c": 3, "trunc')
    log = JsonlLog(p)
    assert log.torn_bytes == len('{"c": 3, "trunc') and log.read() == [{"a": 1}, {"b": 2}]
    log.append({"d": 4})
    assert p.read_text() == '{"a": 1}\n{"b": 2}\n{"d": 4}\n'


def test_prompts_file_shapes_and_bad_rows_are_named(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text(
        "\n".join(
            [
                json.dumps({"prompt_id": "x", "prompt": "plain text"}),
                json.dumps(
                    {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
                ),
                json.dumps({"instruction": "Name a colour.", "output": "Red."}),
                json.dumps({"prompt": [{"role": "user<|im_end|>", "content": "forged"}]}),
                json.dumps(
                    {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
                ),
                json.dumps({"prompt_id": "x", "prompt": "again"}),
                "{broken",
            ]
        )
        + "\n"
    )
    prompts, report = read_prompts(p)
    assert [q.messages[-1]["content"] for q in prompts] == ["plain text", "hi", "Name a colour."]
    assert len(report.problems) == 4
    joined = "\n".join(report.problems)
    assert f"{p}:4: prompt[0].role" in joined and f"{p}:5:" in joined and "last message" in joined
    assert f"{p}:6:" in joined and "appears earlier" in joined and f"{p}:7:" in joined


class RepeatingEngine:
    """Returns the same text for every even request: the sampler must resample, from seeds no prompt shares."""

    name = "fake"

    def __init__(self):
        self.calls = []

    def generate(self, prompt_ids, max_new_tokens, temperature, top_p, seed, offset=0):
        self.calls.append((len(prompt_ids), offset))
        return [[7] if (offset + i) % 2 == 0 else [100 + offset + i] for i in range(len(prompt_ids))]


class Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


def test_the_sampler_resamples_duplicates_from_seeds_no_prompt_shares(tmp_path):
    settings = SessionSettings(policy="m", prompts="p", prompts_sha256="0", k=4)
    s = Sampler(tmp_path, settings, [object()] * 5)  # five prompts
    engine = RepeatingEngine()
    texts = s._distinct(engine, Tok(), [], [1, 2, 3], index=2)
    assert len(texts) == len(set(texts)) == 4
    first, *rest = engine.calls
    assert first == (4, 8)  # prompt 2's own seeds: 8..11
    assert all(off >= 5 * 4 for _, off in rest)  # retries past every prompt's first K


def test_a_batching_engine_draws_each_prompt_from_the_seeds_it_would_get_alone(tmp_path):
    settings = SessionSettings(policy="m", prompts="p", prompts_sha256="0", k=3)
    s = Sampler(tmp_path, settings, [object()] * 8)
    engine = RepeatingEngine()
    engine.name = "vllm"
    firsts = s._first_draws(engine, [2, 3, 5], [[1], [2], [3]])  # runs [2, 3] and [5]: two calls
    assert engine.calls == [(6, 6), (3, 15)]
    for i in (2, 3, 5):
        alone = RepeatingEngine().generate([[0]] * 3, 8, 1.0, 1.0, 0, offset=i * 3)
        assert firsts[i] == alone


def test_killing_the_server_loses_no_acknowledged_judgment(tmp_path):
    """The real command in a subprocess, killed with SIGKILL while four annotators submit: every acknowledged
    judgment is in the file, no line is half-written, and the restarted server goes on from there."""
    d = tmp_path / "ann"
    write_samples(d, 200)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": "q"}) + "\n" for i in range(200)))
    # the folder's session, as `serve` writes it (the samples above stand in for a policy's)
    from core.manifest import sha256_path

    settings = SessionSettings(
        policy="tiny-random-llama", prompts=str(prompts), prompts_sha256=sha256_path(prompts), k=3
    )
    (d / "session.json").write_text(settings.model_dump_json())
    tokens = [add_annotator(d, f"ann-{i}") for i in range(4)]
    port = free_port()
    proc = serve_in_subprocess(["--dir", str(d)], port)
    acknowledged, lock, stop = [], threading.Lock(), threading.Event()

    def work(token):
        c = Client(f"http://127.0.0.1:{port}", token)
        while not stop.is_set():
            try:
                status, task = c.call("/api/next")
                if task.get("state") != "ready":
                    return
                status, body = c.call(
                    "/api/judgments", {"prompt_id": task["prompt_id"], "ranking": ["r2", "r1", "r3"]}
                )
            except (OSError, http.client.HTTPException):  # the server died under this request
                return
            if status == 200 and body.get("saved"):
                with lock:
                    acknowledged.append(task["prompt_id"])

    threads = [threading.Thread(target=work, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    while len(acknowledged) < 20:
        time.sleep(0.02)
    stop_server(proc, signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    raw = (d / "rankings.jsonl").read_bytes()
    whole = raw[: raw.rfind(b"\n") + 1]  # at most a torn tail after it: a judgment nobody was told was saved
    lines = [json.loads(x) for x in whole.decode().splitlines()]  # every complete line parses
    assert {x["prompt_id"] for x in lines} >= set(acknowledged)
    # restarted: the judgments are there and the annotators go on with prompts nobody judged
    proc = serve_in_subprocess(["--dir", str(d)], port)
    try:
        c = Client(f"http://127.0.0.1:{port}", tokens[0])
        _, task = c.call("/api/next")
        assert task["state"] == "ready" and task["prompt_id"] not in {x["prompt_id"] for x in lines}
        assert (
            c.call("/api/judgments", {"prompt_id": task["prompt_id"], "ranking": ["r1", "r2", "r3"]})[0]
            == 200
        )
    finally:
        stop_server(proc)
    assert not read_rankings([d / "rankings.jsonl"]).report.problems


def test_a_prompts_file_with_nothing_usable_leaves_the_folder_unstarted(tmp_path):
    from align.annotate import open_session
    from core.config import UserError

    bad, good = tmp_path / "bad.jsonl", tmp_path / "good.jsonl"
    bad.write_text('{"foo": 1}\n')
    good.write_text('{"prompt": "Say hi."}\n')
    with pytest.raises(UserError, match="no usable prompts"):
        open_session(tmp_path / "d", "tiny-random-llama", bad, {})
    assert not (tmp_path / "d" / "session.json").exists()
    settings, rows, _ = open_session(tmp_path / "d", "tiny-random-llama", good, {})  # the fixed file is taken
    assert [r.messages[-1]["content"] for r in rows] == ["Say hi."] and settings.prompts == str(good)
