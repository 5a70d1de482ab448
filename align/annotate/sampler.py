"""Prompts and samples: the background sampler that keeps K distinct responses per prompt ready ahead of the
annotators, through the rollout-engine table (lib/rollout.py)."""

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from align.annotate.folder import JsonlLog
from core.chat import chat_messages, neutralise, neutralise_messages, render_prompt, special_strings
from core.config import UserError
from core.manifest import now, read_manifest
from core.readers import LoadReport, describe_row_error, iter_rows
from data_schemas.config import SessionSettings
from data_schemas.records import SHAPES, detect_shape


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
