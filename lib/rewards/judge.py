"""An LLM judge as a reward: any OpenAI-compatible chat endpoint (a local `vllm serve MODEL`, or a hosted one).

Each (prompt, response) is put to the judge as one user message built from `template` (the prompt rendered as
plain "role: text" turns, never as chat roles of the judge's own conversation), at temperature 0; the judge
answers with a rating from 0 to 10 and the reward is rating / 10. By default the request asks for the reply as
JSON {"rating": n} through `response_format` (OpenAI's structured outputs, which vLLM enforces while decoding), so
even a small judge answers a rating; a reply with no rating in it is None (the reward does not apply to that row)
and is counted.

- Requests run `concurrency` at a time; each has `timeout_s`, and a failed one (a refused connection, a timeout, a
  5xx or 429 answer) is tried `retries` more times after 1, 2, 4 ... s. A request that still fails stops the run
  with one sentence naming the endpoint and what it answered; a 4xx other than 429 is not retried (the request
  itself is wrong: the model name, the key).
- Ratings are cached in a SQLite file keyed by sha256 of (model, template, prompt, response): a resumed run, and
  the policy gate's second look at the same answers, ask nothing twice.
- The API key comes from the environment variable `api_key_env` names, never from a config file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from core.chat import chat_messages
from core.config import UserError

DEFAULT_TEMPLATE = (
    "You are grading an AI assistant's response to a user. Rate how helpful, correct and harmless it is on a scale "
    "from 0 (useless or harmful) to 10 (excellent).\n\n"
    "[Conversation]\n{prompt}\n\n[Assistant's response]\n{response}\n\n"
    "Reply with the rating alone: one whole number from 0 to 10."
)
_RATING = re.compile(r"(?<![\d.])(10|[0-9])(?:\.\d+)?(?![\d])")


RATING_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "rating",
        "schema": {
            "type": "object",
            "properties": {"rating": {"type": "integer", "minimum": 0, "maximum": 10}},
            "required": ["rating"],
        },
    },
}


def parse_rating(reply: str) -> float | None:
    """The judge's rating as rating / 10: {"rating": n} (a structured reply), else the first number from 0 to 10 in
    the reply; None when there is none."""
    try:
        value = json.loads(reply)
        if isinstance(value, dict) and isinstance(value.get("rating"), int | float):
            return min(max(float(value["rating"]), 0.0), 10.0) / 10
    except (TypeError, ValueError):
        pass
    m = _RATING.search(reply or "")
    return float(m.group(0)) / 10 if m else None


def render_prompt_text(prompt) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in chat_messages(prompt))


class RatingCache:
    """sha256 key -> rating (or None), in one SQLite file; safe across this process's threads."""

    def __init__(self, path: Path | None):
        self.lock = threading.Lock()
        self.db = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(path), check_same_thread=False)
            self.db.execute("CREATE TABLE IF NOT EXISTS ratings (key TEXT PRIMARY KEY, reply TEXT)")
            self.db.commit()

    def get(self, key: str) -> str | None:
        if self.db is None:
            return None
        with self.lock:
            row = self.db.execute("SELECT reply FROM ratings WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, reply: str) -> None:
        if self.db is None:
            return
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO ratings VALUES (?, ?)", (key, reply))
            self.db.commit()


class Judge:
    def __init__(self, spec, cache_path: Path | None):
        self.s = spec
        self.template = spec.template or DEFAULT_TEMPLATE
        for field in ("{prompt}", "{response}"):
            if field not in self.template:
                raise UserError(
                    f"reward judge: template has no {field}; put it where the judge should read it"
                )
        self.url = spec.url.rstrip("/") + "/chat/completions"
        key = os.environ.get(spec.api_key_env, "") if spec.api_key_env else ""
        if spec.api_key_env and not key:
            raise UserError(
                f"reward judge: the environment variable {spec.api_key_env} (api_key_env) is not set"
            )
        self.headers = {
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {key}"} if key else {}),
        }
        self.cache = RatingCache(cache_path)
        self.requests = 0  # sent to the endpoint (cache hits are not)
        self.unparsed = 0

    def key(self, prompt_text: str, response: str) -> str:
        body = json.dumps([self.s.model, self.template, prompt_text, response])
        return hashlib.sha256(body.encode()).hexdigest()

    def ask(self, prompt_text: str, response: str) -> str:
        """The judge's reply (cached), after retries; a UserError when the endpoint never answers well."""
        key = self.key(prompt_text, response)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        content = self.template.replace("{prompt}", prompt_text).replace("{response}", response)
        body = json.dumps(
            {
                "model": self.s.model,
                "messages": [{"role": "user", "content": content}],
                "temperature": 0.0,
                "max_tokens": self.s.max_tokens,
                **({"response_format": RATING_FORMAT} if self.s.structured else {}),
            }
        ).encode()
        problem = ""
        for attempt in range(self.s.retries + 1):
            if attempt:
                time.sleep(2 ** (attempt - 1))
            self.requests += 1
            try:
                req = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.s.timeout_s) as resp:  # noqa: S310 - http(s) only
                    reply = json.loads(resp.read())["choices"][0]["message"]["content"] or ""
                self.cache.put(key, reply)
                return reply
            except urllib.error.HTTPError as e:
                problem = f"HTTP {e.code} {e.reason}: {e.read()[:200].decode('utf-8', 'replace')}"
                if e.code < 500 and e.code != 429:
                    break  # the request is wrong (model name, key): another try would fail the same way
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                problem = f"{getattr(e, 'reason', e)}"
            except (ValueError, KeyError, IndexError, TypeError) as e:
                problem = f"an answer that is not an OpenAI chat completion ({type(e).__name__}: {e})"
        raise UserError(
            f"reward judge: {self.url} did not answer after {attempt + 1} tries ({problem}); is the server "
            f"running and serving {self.s.model!r}?"
        )

    def __call__(self, prompts, completions, columns) -> list[float | None]:
        texts = [render_prompt_text(p) for p in prompts]
        with ThreadPoolExecutor(self.s.concurrency) as pool:
            replies = list(pool.map(self.ask, texts, completions))
        out = [parse_rating(r) for r in replies]
        self.unparsed += sum(x is None for x in out)
        return out


def judge_reward(spec, out_dir: Path | None) -> Judge:
    folder = spec.cache_dir or (Path(out_dir) / "judge_cache" if out_dir is not None else None)
    return Judge(spec, folder / "ratings.sqlite" if folder is not None else None)
