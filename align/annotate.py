"""`align annotate`: a local web page where annotators rank the current policy's samples into ranking files.

RLHF is a loop: sample from the policy, have people rank the samples, train the reward model, optimise, repeat.
TRL, OpenRLHF, LLaMA-Factory and verl all start from a finished preference file; this module closes the loop:

    align annotate add-annotator NAME --dir D          a token for NAME (printed once, stored as its SHA-256)
    align annotate serve --policy REF --prompts F --k 4 --dir D     sample ahead in the background, serve the page
    align annotate export --dir D --to FILE            a validated ranking file for build-preferences / reward

An annotation folder D holds:
    session.json     what is annotated: the policy (path, manifest key), the prompts (path, sha256), K, overlap,
                     the sampling settings and the engine that sampled
    samples.jsonl    one prompt per line with its K distinct responses, appended by the sampler as it goes
    annotators.json  name -> {role, sha256 of the token}
    rankings.jsonl   the judgments, each one line of the ranking-file contract (docs/formats.md)

Design, and why:
- **Sampling runs ahead** in a background thread (vLLM where installed, else transformers `generate`), so the
  page never waits on generation. Response j of prompt i comes from the seed `request_seed(seed, i*K + j)`,
  whatever the batch, so a restarted sampler reproduces what it had not yet written. Identical or empty texts are
  resampled from further seeds: the ranking contract forbids identical responses.
- **Every judgment is durable before it is acknowledged.** It is validated against the ranking contract, then
  appended with one write(2) on an O_APPEND descriptor and fsync'd under a lock; only then does the server
  answer 200. A crash loses at most the judgment being made. A torn last line (a crash inside that write) is cut
  off when the folder is next opened, and said.
- **Assignment**: an annotator gets the first prompt they have not judged that still needs judgments (`overlap`
  annotators per prompt, counting the open leases of others). A lease lasts `lease_minutes`: a returning
  annotator sees the prompt they left, and an abandoned prompt goes to someone else.
- **Order**: responses are shown in an order drawn from (annotator, prompt): random across annotators (no
  position bias shared by all), stable on reload.
- **Flags** (unsafe, nonsense) travel in the line's `notes` as `[flag ID: WHAT]`, so the ranking file stays
  exactly the contract that `align data check-rankings` accepts, and `flags_in()` reads them back.
- **The page** (align/resources/annotate/) is static HTML + JS with no external assets. User and model text is
  only ever set with `textContent`, never parsed as markup; a Content-Security-Policy forbids inline script.
  The server binds 127.0.0.1 by default and refuses other Host headers (DNS rebinding).
"""

import contextlib
import hashlib
import hmac
import json
import os
import random
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.chat import chat_messages, neutralise, neutralise_messages, render_prompt, special_strings
from core.config import UserError
from core.manifest import atomic_write_json, atomic_write_text, now, read_manifest, sha256_path
from core.readers import LoadReport, describe_row_error, iter_rows
from data_schemas.config import SessionSettings
from data_schemas.rankings import MAX_RESPONSES, RankingLine
from data_schemas.records import SHAPES, detect_shape
from lib.rankings import read_rankings, summarise

RESOURCES = Path(__file__).resolve().parent / "resources" / "annotate"
STATIC = {  # the only files the server hands out: no path from a request ever reaches the file system
    "annotate.js": "text/javascript",
    "organiser.js": "text/javascript",
    "common.js": "text/javascript",
    "style.css": "text/css",
}
FLAGS = ("unsafe", "nonsense")
ANNOTATIONS = "rankings.jsonl"  # the judgments of a folder
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_NOTE = 2000
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


# ==========================================================================================================
# Durable append-only JSON Lines
# ==========================================================================================================
class JsonlLog:
    """An append-only JSON Lines file whose appends are whole lines on disk before `append` returns.

    One write(2) per line on an O_APPEND descriptor (several writers never interleave inside a line), fsync, all
    under a lock. Opening cuts off a torn last line (a crash inside a write) and says how many bytes it cut."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock = threading.Lock()
        self.torn_bytes = _cut_torn_tail(self.path)
        new = not self.path.exists()
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if new:
            _fsync_dir(self.path.parent)

    def read(self) -> list[dict]:
        return read_jsonl(self.path)

    def append(self, obj: dict) -> None:
        data = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
        with self.lock:
            view = memoryview(data)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
            os.fsync(self.fd)

    def close(self) -> None:
        with self.lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


def read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSON Lines file another writer may have been killed in (a torn tail is cut)."""
    path = Path(path)
    if not path.exists():
        return []
    _cut_torn_tail(path)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _cut_torn_tail(path: Path) -> int:
    """Truncate a file to its last newline; return how many bytes were cut (0 when it ends cleanly)."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return 0
        pos, chunk = size, 1 << 16
        keep = 0
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            block = f.read(pos - start)
            i = block.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return size - keep


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ==========================================================================================================
# Annotators and their tokens
# ==========================================================================================================
def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def add_annotator(d: Path, name: str, organiser: bool = False, replace: bool = False) -> str:
    """Issue a token for `name` and store only its SHA-256 (a 192-bit random token needs no salt). Returns the
    token, which is shown once."""
    if not NAME.match(name):
        raise UserError(
            f"annotator name {name[:70]!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "annotators.json"
    people = _read_annotators(path)
    if name in people and not replace:
        raise UserError(
            f"{path}: {name} already has a token; add --replace to issue a new one (the old one stops working)"
        )
    token = secrets.token_urlsafe(24)
    people[name] = {
        "role": "organiser" if organiser else "annotator",
        "token_sha256": _token_hash(token),
        "created_at": now(),
    }
    atomic_write_json(path, {"annotators": people})
    return token


def _read_annotators(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return dict(data["annotators"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not an annotators file ({e}); re-issue the tokens") from None


class Tokens:
    """Who a bearer token belongs to. Re-reads annotators.json when it changes, so `add-annotator` works while the
    server runs. Comparison in constant time."""

    def __init__(self, path: Path):
        self.path, self.mtime, self.people = Path(path), None, {}

    def who(self, token: str | None) -> tuple[str, str] | None:
        if not token:
            return None
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            return None
        if mtime != self.mtime:
            self.people, self.mtime = _read_annotators(self.path), mtime
        digest = _token_hash(token)
        for name, p in self.people.items():
            if hmac.compare_digest(digest, str(p.get("token_sha256", ""))):
                return name, p.get("role", "annotator")
        return None


# ==========================================================================================================
# Prompts and samples
# ==========================================================================================================
@dataclass
class Prompt:
    prompt_id: str
    messages: list[dict]
    where: str


def read_prompts(path: Path) -> tuple[list[Prompt], LoadReport]:
    """Prompts to annotate: JSONL/JSON/CSV/Parquet rows with `prompt` (text or chat messages ending with a user
    turn) and an optional `prompt_id`, or instruction rows (any shape `align data build` reads), whose last
    assistant turn is removed. Bad rows are named; ids default to a hash of the prompt."""
    report = LoadReport()
    out: list[Prompt] = []
    seen: set[str] = set()
    for lineno, row in iter_rows(path, report):
        where = f"{path}:{lineno}"
        try:
            if "prompt" in row:
                msgs = chat_messages(row["prompt"])
                if msgs[-1]["role"] != "user":
                    raise ValueError("prompt: the last message must be from 'user' (the responses answer it)")
            else:
                shape = detect_shape(row)
                if shape is None:
                    raise ValueError(
                        f"row has keys {sorted(row)[:6]}; give 'prompt' (text or messages), or an instruction row"
                    )
                conv = SHAPES[shape].model_validate(row).conversations(None)[0]
                msgs = [m.model_dump() for m in conv.messages]
                last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
                msgs = msgs[:last]
            if not any(m["content"].strip() for m in msgs if m["role"] == "user"):
                raise ValueError("prompt: the user turn is empty")
            pid = row.get("prompt_id", row.get("id"))
            if pid is None:
                pid = "p-" + hashlib.sha256(json.dumps(msgs, ensure_ascii=False).encode()).hexdigest()[:12]
            if not isinstance(pid, str | int) or not str(pid).strip():
                raise ValueError("prompt_id: must be a non-empty string")
            pid = str(pid)
        except ValidationError as e:
            kind, msg = describe_row_error(e)
            report.drop(where, kind, msg)
            continue
        except ValueError as e:
            report.drop(where, "invalid_prompt", str(e))
            continue
        if pid in seen:
            report.drop(
                where, "duplicate_prompt_id", f"prompt_id {pid!r} appears earlier; ids must be unique"
            )
            continue
        seen.add(pid)
        report.kept += 1
        out.append(Prompt(pid, msgs, where))
    if not out:
        detail = "; ".join(report.problems[:3])
        raise UserError(f"{path}: no usable prompts ({report.read} rows read). {detail}".strip())
    return out, report


class Sampler:
    """Samples K distinct responses per prompt into samples.jsonl, ahead of the annotators (a thread in `serve`,
    the foreground in `sample`). Prompts already in samples.jsonl are not sampled again."""

    def __init__(self, d: Path, settings: SessionSettings, prompts: list[Prompt], on_sample=None):
        self.d, self.s, self.prompts, self.on_sample = Path(d), settings, prompts, on_sample
        self.log = JsonlLog(self.d / "samples.jsonl")
        self.done_ids = {r["prompt_id"] for r in self.log.read()}
        self.skipped: list[str] = []
        self.engine_name: str | None = None
        self.error: str | None = None
        self.finished = False
        self.responses = 0
        self.tokens = 0
        self.seconds = 0.0

    @property
    def todo(self) -> list[tuple[int, Prompt]]:
        return [(i, p) for i, p in enumerate(self.prompts) if p.prompt_id not in self.done_ids]

    def status(self) -> dict[str, Any]:
        return {
            "ready": len(self.done_ids),
            "total": len(self.prompts),
            "skipped": len(self.skipped),
            "engine": self.engine_name,
            "finished": self.finished,
            "error": self.error,
            "responses_per_s": self.responses / self.seconds if self.seconds else None,
            "tokens_per_s": self.tokens / self.seconds if self.seconds else None,
        }

    def run(self, chunk: int = 8, progress=None) -> None:
        try:
            todo = self.todo
            if todo:
                self._sample(todo, chunk, progress)
        except Exception as e:  # the page says it; the server keeps serving what is ready
            self.error = f"{type(e).__name__}: {e}"
            raise
        finally:
            self.finished = True
            self.log.close()

    def _sample(self, todo: list[tuple[int, Prompt]], chunk: int, progress) -> None:
        from core.models import load_for_eval

        model, tok, _ = load_for_eval(self.s.policy)
        engine = self._engine(model, tok)
        self.engine_name = engine.name
        specials = special_strings(tok)
        try:
            starts = [0, *range(1, len(todo), chunk)]  # one prompt first: the page has work soonest
            for start, end in zip(starts, [*starts[1:], len(todo)], strict=True):
                part = todo[start:end]
                ids, keep = [], []
                for i, p in part:
                    msgs = neutralise_messages(p.messages, specials)
                    pids = render_prompt(tok, msgs)
                    if len(pids) > self.s.max_prompt_tokens:
                        self.skipped.append(
                            f"{p.where}: prompt is {len(pids)} tokens, over max_prompt_tokens={self.s.max_prompt_tokens}"
                        )
                        continue
                    ids.append(pids)
                    keep.append((i, p, msgs))
                t0 = time.perf_counter()
                firsts = self._first_draws(engine, [i for i, _, _ in keep], ids)
                for (i, p, msgs), pids in zip(keep, ids, strict=True):
                    texts = self._distinct(engine, tok, specials, pids, i, firsts.get(i))
                    if len(texts) < 2:
                        self.skipped.append(
                            f"{p.where}: fewer than 2 distinct non-empty responses after resampling"
                        )
                        continue
                    row = {
                        "prompt_id": p.prompt_id,
                        "prompt": msgs,
                        "responses": [{"id": f"r{j + 1}", "text": t} for j, t in enumerate(texts)],
                        "engine": self.engine_name,
                        "sampled_at": now(),
                    }
                    self.log.append(row)
                    self.done_ids.add(p.prompt_id)
                    if self.on_sample:
                        self.on_sample(row)
                self.seconds += time.perf_counter() - t0
                if progress:
                    progress(len(part))
        finally:
            engine.close()

    def _draw(self, engine, prompt_ids: list[list[int]], offset: int) -> list[list[int]]:
        rows = engine.generate(
            prompt_ids, self.s.max_new_tokens, self.s.temperature, self.s.top_p, self.s.seed, offset
        )
        self.responses += len(rows)
        self.tokens += sum(len(r) for r in rows)
        return rows

    def _first_draws(self, engine, indices: list[int], ids: list[list[int]]) -> dict[int, list[list[int]]]:
        """An engine that batches (vLLM) draws the first K of a run of consecutive prompts in one call: request
        r of the run is prompt start + r // K, sample r % K, seed offset start*K + r = i*K + j, as alone. transformers
        generate samples one request at a time anyway: it draws per prompt (in `_distinct`), so the first prompt
        reaches the page sooner."""
        if engine.name != "vllm" or not indices:
            return {}
        k, out, run = self.s.k, {}, [0]
        for n in range(1, len(indices) + 1):
            if n == len(indices) or indices[n] != indices[n - 1] + 1:
                first = indices[run[0]]
                rows = self._draw(engine, [ids[m] for m in run for _ in range(k)], first * k)
                for q, m in enumerate(run):
                    out[indices[m]] = rows[q * k : (q + 1) * k]
                run = [n]
            else:
                run.append(n)
        return out

    def _distinct(self, engine, tok, specials, prompt_ids: list[int], index: int, first=None) -> list[str]:
        """K distinct non-empty texts for prompt `index`; the first K from seeds index*K + j (or `first`, drawn so
        by `_first_draws`), the rest (after duplicates) from seeds past every prompt's first K, so no two prompts
        share a seed."""
        k = self.s.k
        texts: list[str] = []
        seen: set[str] = set()
        for attempt in range(3):
            need = k - len(texts)
            if need <= 0:
                break
            offset = index * k if attempt == 0 else (len(self.prompts) * k * attempt + index * k)
            if attempt == 0 and first is not None:
                rows = first
            else:  # a whole K again on a retry: a model that repeats itself needs the chances
                rows = self._draw(engine, [prompt_ids] * k, offset)
            for r in rows:
                text = neutralise(tok.decode(r, skip_special_tokens=True).strip(), specials)
                if text and text not in seen and len(texts) < k:
                    seen.add(text)
                    texts.append(text)
        return texts

    def _engine(self, model, tok):
        from core.models import choose_precision, is_prompt_learning, resolve_model_path
        from lib.rollout import EngineSpec, make_engine

        ref = Path(self.s.policy)
        base = (
            resolve_model_path(read_manifest(ref).model.name)
            if (ref / "manifest.json").exists()
            else resolve_model_path(self.s.policy)
        )
        max_len = self.s.max_prompt_tokens + self.s.max_new_tokens + 8
        spec = EngineSpec(model, tok, base, max_len, choose_precision("auto"), self.s.seed)
        # virtual tokens are inputs, not weights: only transformers generate can sample such a policy
        return make_engine("generate" if is_prompt_learning(model) else self.s.engine, "--engine", spec)


# ==========================================================================================================
# The desk: assignment, judgments, progress (no web framework here; the app below is a thin layer)
# ==========================================================================================================
def notes_of(flags: dict[str, str], note: str | None) -> str | None:
    parts = [f"[flag {rid}: {what}]" for rid, what in sorted(flags.items())]
    if note and note.strip():
        parts.append(note.strip())
    return " ".join(parts) or None


FLAG_RE = re.compile(r"\[flag ([^\]:]+): (" + "|".join(FLAGS) + r")\]")


def flags_in(notes: str | None) -> dict[str, str]:
    """Response id -> flag, read back from a ranking line's notes."""
    return dict(FLAG_RE.findall(notes or ""))


class Judgment(BaseModel):
    """What the page submits: the order best first (a list is a tie), flags, and an optional note."""

    model_config = ConfigDict(extra="forbid")

    prompt_id: str = Field(..., min_length=1, max_length=200)
    ranking: list[str | list[str]] = Field(..., min_length=1, max_length=MAX_RESPONSES)
    flags: dict[str, Literal["unsafe", "nonsense"]] = Field(default_factory=dict)
    note: str | None = Field(None, max_length=MAX_NOTE)


class Refused(Exception):
    """A request the desk refuses: HTTP status and a sentence for the annotator."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Lease:
    prompt_id: str
    until: float


@dataclass
class Desk:
    d: Path
    settings: SessionSettings
    samples: list[dict] = field(default_factory=list)
    by_id: dict[str, dict] = field(default_factory=dict)
    judged: dict[str, dict[str, dict]] = field(default_factory=dict)  # prompt_id -> annotator -> line
    leases: dict[str, Lease] = field(default_factory=dict)
    sampler: Sampler | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        self.log = JsonlLog(self.d / ANNOTATIONS)
        for row in read_jsonl(self.d / "samples.jsonl"):
            self.add_sample(row)
        for line in self.log.read():
            self.judged.setdefault(line["prompt_id"], {})[line["annotator"]] = line
        self.tokens = Tokens(self.d / "annotators.json")

    def add_sample(self, row: dict) -> None:
        with self.lock:
            if row["prompt_id"] not in self.by_id:
                self.samples.append(row)
                self.by_id[row["prompt_id"]] = row

    # -- assignment ---------------------------------------------------------------------------------------
    def _open_leases(self, prompt_id: str, other_than: str) -> int:
        t = time.monotonic()
        return sum(
            1
            for a, lease in self.leases.items()
            if a != other_than and lease.prompt_id == prompt_id and lease.until > t
        )

    def _wanted_by(self, annotator: str, prompt_id: str) -> bool:
        done = self.judged.get(prompt_id, {})
        return annotator not in done and len(done) < self.settings.overlap

    def next_for(self, annotator: str) -> dict[str, Any]:
        with self.lock:
            lease = self.leases.get(annotator)
            if lease and lease.until > time.monotonic() and self._wanted_by(annotator, lease.prompt_id):
                s = self.by_id[lease.prompt_id]
            else:
                s = next(
                    (
                        s
                        for s in self.samples
                        if self._wanted_by(annotator, s["prompt_id"])
                        and len(self.judged.get(s["prompt_id"], {}))
                        + self._open_leases(s["prompt_id"], annotator)
                        < self.settings.overlap
                    ),
                    None,
                )
            if s is None:
                self.leases.pop(annotator, None)
                waiting = self.sampler is not None and not self.sampler.finished
                return {"state": "waiting" if waiting else "done", "progress": self.progress(annotator)}
            self.leases[annotator] = Lease(
                s["prompt_id"], time.monotonic() + 60 * self.settings.lease_minutes
            )
            order = list(s["responses"])
            random.Random(f"{self.settings.seed}:{annotator}:{s['prompt_id']}").shuffle(order)
            return {
                "state": "ready",
                "prompt_id": s["prompt_id"],
                "prompt": s["prompt"],
                "responses": order,
                "progress": self.progress(annotator),
            }

    def progress(self, annotator: str) -> dict[str, Any]:
        with self.lock:
            done = sum(1 for js in self.judged.values() if annotator in js)
            open_ = sum(1 for s in self.samples if self._wanted_by(annotator, s["prompt_id"]))
            st = (
                self.sampler.status()
                if self.sampler
                else {"ready": len(self.samples), "total": len(self.samples)}
            )
            return {
                "done": done,
                "assigned": done + open_,
                "samples_ready": st["ready"],
                "prompts": st["total"],
            }

    # -- judgments ----------------------------------------------------------------------------------------
    def submit(self, annotator: str, j: Judgment) -> dict[str, Any]:
        with self.lock:
            s = self.by_id.get(j.prompt_id)
            if s is None:
                raise Refused(404, f"prompt_id {j.prompt_id!r} is not among this folder's samples")
            ranking = [x if isinstance(x, str) else list(x) for x in j.ranking]
            previous = self.judged.get(j.prompt_id, {}).get(annotator)
            if previous is not None:
                if previous["ranking"] == ranking and flags_in(previous.get("notes")) == j.flags:
                    return {"saved": False, "progress": self.progress(annotator)}  # a repeated submit
                raise Refused(409, f"you already judged {j.prompt_id}; a judgment is final once saved")
            ids = {r["id"] for r in s["responses"]}
            unknown = sorted(set(j.flags) - ids)
            if unknown:
                raise Refused(400, f"flags: unknown response id(s) {unknown}; known ids are {sorted(ids)}")
            line = {
                "prompt_id": s["prompt_id"],
                "prompt": s["prompt"],
                "responses": s["responses"],
                "ranking": ranking,
                "annotator": annotator,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
            }
            notes = notes_of(j.flags, j.note)
            if notes:
                line["notes"] = notes
            try:
                RankingLine.model_validate(line)  # the contract, before anything is written
            except ValidationError as e:
                raise Refused(400, describe_row_error(e)[1]) from None
            self.log.append(line)  # on disk (fsync) before the answer
            self.judged.setdefault(j.prompt_id, {})[annotator] = line
            if self.leases.get(annotator) and self.leases[annotator].prompt_id == j.prompt_id:
                del self.leases[annotator]
            return {"saved": True, "progress": self.progress(annotator)}

    # -- the organiser's view ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self.lock:
            people = sorted({a for js in self.judged.values() for a in js} | set(self.tokens.people))
            per = {
                a: self.progress(a)
                for a in people
                if self.tokens.people.get(a, {}).get("role") != "organiser"
            }
            flags: dict[str, int] = dict.fromkeys(FLAGS, 0)
            for js in self.judged.values():
                for line in js.values():
                    for what in flags_in(line.get("notes")).values():
                        flags[what] += 1
        path = self.d / "rankings.jsonl"
        summary = summarise(read_rankings([path])) if path.stat().st_size else None
        return {
            "settings": self.settings.model_dump(),
            "sampling": self.sampler.status() if self.sampler else None,
            "judgments": sum(len(js) for js in self.judged.values()),
            "wanted": len(self.samples) * self.settings.overlap,
            "annotators": per,
            "flags": flags,
            "agreement": None
            if summary is None
            else {
                "multiply_annotated_prompts": summary["multiply_annotated_prompts"],
                "kendalls_w_mean": summary["kendalls_w"]["mean"],
                "krippendorff_alpha_ordinal": summary["krippendorff_alpha_ordinal"],
                "per_annotator": summary["annotators"],
                "flagged_annotators": summary["flagged_annotators"],
                "lines_dropped": summary["lines_dropped"],
            },
        }


# ==========================================================================================================
# The web app
# ==========================================================================================================
def make_app(desk: Desk, allowed_hosts: list[str] | None = None):
    """The HTTP layer over a desk (a FastAPI app): two static pages and a small JSON API behind bearer tokens.
    (This module has no `from __future__ import annotations`: FastAPI reads the route annotations below, which
    name classes imported here, where the import costs nothing until a server starts.)"""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app = FastAPI(title="align annotate", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or ["127.0.0.1", "localhost"])

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        said = []
        for e in exc.errors()[:3]:
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "request"
            said.append(f"{where}: {e.get('msg', 'invalid')}")
        return JSONResponse({"error": "; ".join(said) or "invalid request"}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    def who(request: Request, role: str = "annotator") -> str:
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        found = desk.tokens.who(token)
        if found is None:
            raise Refused(401, "no valid token: open the link `align annotate add-annotator` printed for you")
        if role == "organiser" and found[1] != "organiser":
            raise Refused(403, "this page is for the organiser (add-annotator --organiser)")
        return found[0]

    @app.get("/")
    def page():
        return FileResponse(RESOURCES / "annotate.html", media_type="text/html")

    @app.get("/organiser")
    def organiser_page():
        return FileResponse(RESOURCES / "organiser.html", media_type="text/html")

    @app.get("/static/{name}")
    def static(name: str):
        if name not in STATIC:
            raise Refused(404, "no such file")
        return FileResponse(RESOURCES / name, media_type=STATIC[name])

    @app.get("/api/health")
    def health():
        return {"ok": True, "samples_ready": len(desk.samples)}

    @app.get("/api/next")
    def next_prompt(request: Request):
        return desk.next_for(who(request))

    @app.post("/api/judgments")
    def judge(request: Request, judgment: Judgment):
        return desk.submit(who(request), judgment)

    @app.get("/api/stats")
    def stats(request: Request):
        who(request, "organiser")
        return desk.stats()

    return app


# ==========================================================================================================
# Commands
# ==========================================================================================================
def open_session(
    d: Path,
    policy: str | None,
    prompts: Path | None,
    overrides: dict[str, Any],
    superseded: Path | None = None,
) -> tuple[SessionSettings, list[Prompt], LoadReport]:
    """The folder's settings: new ones from the arguments, or the stored ones (a returning session). A folder
    sampled from another policy or prompts file is refused, since its rankings would mix two policies; or, given
    `superseded`, moved there, and a new round starts in `d` (the pipeline, when SFT was redone)."""
    d = Path(d)
    path = d / "session.json"
    stored = SessionSettings.model_validate_json(path.read_text()) if path.exists() else None
    if stored is None and (policy is None or prompts is None):
        raise UserError(f"{d}: a new annotation folder needs --policy and --prompts")
    policy = policy or stored.policy
    prompts = Path(prompts or stored.prompts)
    if not prompts.is_file():
        raise UserError(f"{prompts}: prompts file not found")
    # read before anything is written: a file with no usable prompt changes nothing
    rows, report = read_prompts(prompts)
    ref = Path(policy)
    key = read_manifest(ref).key if (ref / "manifest.json").exists() else None
    fields = {
        "policy": str(policy),
        "policy_key": key,
        "prompts": str(prompts),
        "prompts_sha256": sha256_path(prompts),
    }
    stale = stored is not None and (stored.policy_key, stored.prompts_sha256) != (
        key,
        fields["prompts_sha256"],
    )
    if stale and superseded is not None:
        superseded.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(d), str(superseded))
        stored = None
    if stored is not None:
        base = stored.model_dump()
        for name in ("policy_key", "prompts_sha256"):
            if base[name] != fields[name]:
                what = "policy" if name == "policy_key" else "prompts file"
                raise UserError(
                    f"{d} was sampled from another {what} ({base['policy'] if name == 'policy_key' else base['prompts']}); "
                    "use a new --dir for a new policy or prompts"
                )
        changed = {
            k: v for k, v in overrides.items() if v is not None and base.get(k) != v and k != "overlap"
        }
        if changed:
            raise UserError(
                f"{d}: sampled with other settings ({', '.join(sorted(changed))}); use a new --dir"
            )
        settings = stored.model_copy(update={k: v for k, v in overrides.items() if k == "overlap" and v})
    else:
        try:
            settings = SessionSettings(**fields, **{k: v for k, v in overrides.items() if v is not None})
        except ValidationError as e:
            raise UserError(f"annotate: {describe_row_error(e)[1]}") from None
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, json.loads(settings.model_dump_json()))
    if settings.max_prompts:
        rows = rows[: settings.max_prompts]
    return settings, rows, report


def serve(d: Path, settings: SessionSettings, prompts: list[Prompt], host: str, port: int, log=print) -> None:
    """Sample in a background thread and serve the page until interrupted."""
    import uvicorn

    desk = Desk(Path(d), settings)
    if desk.log.torn_bytes:
        log(
            f"rankings.jsonl: cut a torn last line ({desk.log.torn_bytes} bytes, a judgment being written at a crash)"
        )
    desk.sampler = Sampler(d, settings, prompts, on_sample=desk.add_sample)
    if desk.sampler.todo:
        threading.Thread(target=_quietly(desk.sampler.run), name="align-sampler", daemon=True).start()
    else:
        desk.sampler.finished = True
        desk.sampler.log.close()
    hosts = ["127.0.0.1", "localhost"] if host in ("127.0.0.1", "localhost") else ["*"]
    if hosts == ["*"]:
        log(f"--host {host}: the page is reachable from other machines (every request still needs a token)")
    config = uvicorn.Config(
        make_app(desk, hosts), host=host, port=port, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    log(f"annotation page: http://{host}:{port}/   organiser: http://{host}:{port}/organiser")
    log(f"{len(desk.samples)} of {len(prompts)} prompts sampled; the rest are sampled in the background")
    server.run()


def _quietly(fn):
    def run():
        with contextlib.suppress(Exception):  # recorded in the sampler's status; the organiser page shows it
            fn()

    return run


def count_judgments(d: Path) -> int:
    """Complete lines in a folder's judgments (a torn last line does not count)."""
    p = Path(d) / ANNOTATIONS
    return p.read_bytes().count(b"\n") if p.exists() else 0


def export(d: Path, to: Path) -> dict[str, Any]:
    """The folder's judgments as one validated ranking file (the lines exactly as written)."""
    src = Path(d) / "rankings.jsonl"
    if not src.exists() or not src.stat().st_size:
        raise UserError(f"{src}: no judgments yet")
    _cut_torn_tail(src)
    rs = read_rankings([src])
    if rs.report.problems:
        raise UserError(
            f"{src}: {len(rs.report.problems)} line(s) fail the ranking contract: {rs.report.problems[0]}"
        )
    text = src.read_text(encoding="utf-8")
    atomic_write_text(Path(to), text)
    return summarise(rs)


def add_arguments(sub) -> None:
    """`align annotate ...` subcommands (called by align.cli)."""
    an = sub.add_parser(
        "annotate", help="a local web page where annotators rank the policy's samples"
    ).add_subparsers(dest="annotate_command", metavar="WHAT")
    for name, text in (
        ("serve", "sample K responses per prompt in the background and serve the ranking page"),
        ("sample", "sample K responses per prompt into the folder, without serving"),
    ):
        p = an.add_parser(name, help=text)
        p.add_argument(
            "--dir", required=True, type=Path, help="annotation folder (samples, tokens, rankings)"
        )
        p.add_argument("--policy", help="the policy: align artifact, checkpoint folder or alias (new folder)")
        p.add_argument("--prompts", type=Path, help="prompts file: rows with 'prompt', or instruction rows")
        p.add_argument("--k", type=int, help="responses per prompt (default 4)")
        p.add_argument("--overlap", type=int, help="annotators per prompt (default 1; 2+ measures agreement)")
        p.add_argument("--max-prompts", type=int)
        p.add_argument("--temperature", type=float)
        p.add_argument("--top-p", type=float)
        p.add_argument("--max-new-tokens", type=int)
        p.add_argument("--seed", type=int)
        p.add_argument("--engine", choices=["auto", "vllm", "generate"])
        if name == "serve":
            p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
            p.add_argument("--port", type=int, default=8765)
    add = an.add_parser("add-annotator", help="issue a token for an annotator (printed once, stored hashed)")
    add.add_argument("name")
    add.add_argument("--dir", required=True, type=Path)
    add.add_argument("--organiser", action="store_true", help="may open the organiser page (agreement)")
    add.add_argument("--replace", action="store_true", help="issue a new token for an existing name")
    add.add_argument(
        "--url", default="http://127.0.0.1:8765", help="the page's address, for the printed link"
    )
    ex = an.add_parser("export", help="the folder's judgments as one validated ranking file")
    ex.add_argument("--dir", required=True, type=Path)
    ex.add_argument("--to", required=True, type=Path, help="ranking JSONL to write")


def run_command(a, say) -> int:
    """`align annotate serve|sample|add-annotator|export`; `say` prints one line for the user."""
    if a.annotate_command == "add-annotator":
        token = add_annotator(a.dir, a.name, a.organiser, a.replace)
        page = "organiser" if a.organiser else ""
        say(f"token for {a.name} (shown once; stored hashed in {a.dir / 'annotators.json'}):")
        say(token)
        say(f"their link: {a.url.rstrip('/')}/{page}#token={token}")
        return 0
    if a.annotate_command == "export":
        s = export(a.dir, a.to)
        say(
            f"{s['lines_kept']} judgments of {s['prompts']} prompts by {len(s['judgments_per_annotator'])} "
            f"annotator(s) -> {a.to}; next: align data build-preferences {a.to} --out DIR"
        )
        return 0
    if a.annotate_command in ("serve", "sample"):
        overrides = {
            "k": a.k, "overlap": a.overlap, "max_prompts": a.max_prompts, "temperature": a.temperature,
            "top_p": a.top_p, "max_new_tokens": a.max_new_tokens, "seed": a.seed, "engine": a.engine,
        }  # fmt: skip
        settings, prompts, report = open_session(a.dir, a.policy, a.prompts, overrides)
        for problem in report.problems[:20]:
            say(f"skipped {problem}")
        if a.annotate_command == "serve":
            serve(a.dir, settings, prompts, a.host, a.port, log=say)
            return 0
        sampler = Sampler(a.dir, settings, prompts)
        sampler.run()
        for problem in sampler.skipped:
            say(f"skipped {problem}")
        st = sampler.status()
        say(
            f"{st['ready']} of {st['total']} prompts sampled in {a.dir / 'samples.jsonl'} ({st['engine'] or 'nothing to do'})"
        )
        return 0 if st["ready"] else 2
    raise UserError("align annotate: say what to do: serve | sample | add-annotator | export")
