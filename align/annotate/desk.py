"""The desk: assignment with leases, judgments turned into ranking lines, progress. No web framework here; the
app (web.py) is a thin layer over it."""

import random
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from align.annotate.folder import ANNOTATIONS, FLAGS, JsonlLog, read_jsonl
from align.annotate.sampler import Sampler
from align.annotate.tokens import Tokens
from core.readers import describe_row_error
from data_schemas.config import SessionSettings
from data_schemas.rankings import RankingLine, Submission
from lib.rankings import read_rankings, summarise


def notes_of(flags: dict[str, str], note: str | None) -> str | None:
    parts = [f"[flag {rid}: {what}]" for rid, what in sorted(flags.items())]
    if note and note.strip():
        parts.append(note.strip())
    return " ".join(parts) or None


FLAG_RE = re.compile(r"\[flag ([^\]:]+): (" + "|".join(FLAGS) + r")\]")


def flags_in(notes: str | None) -> dict[str, str]:
    """Response id -> flag, read back from a ranking line's notes."""
    return dict(FLAG_RE.findall(notes or ""))


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
        self.problems: list[str] = []  # damaged lines of the log, named (the organiser is told; none is lost)
        for line in read_jsonl(self.log.path, self.problems):
            if isinstance(line.get("prompt_id"), str) and isinstance(line.get("annotator"), str):
                self.judged.setdefault(line["prompt_id"], {})[line["annotator"]] = line
            else:
                self.problems.append(f"{self.log.path}: a line without prompt_id or annotator; skipped")
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

    def _require_assigned(self, annotator: str, prompt_id: str) -> None:
        """A judgment is taken for the prompt this annotator was handed (`next_for`), while it still wants
        judgments: never for a prompt leased to someone else or never shown (issue 34 B14: two judgments landed
        where the overlap was 1). A lease that ran out still counts if nobody took the prompt's last place."""
        lease = self.leases.get(annotator)
        if lease is None or lease.prompt_id != prompt_id:
            raise Refused(
                409, f"prompt {prompt_id} is not assigned to you; load the next prompt (reload the page)"
            )
        if not self._wanted_by(annotator, prompt_id):
            raise Refused(409, f"prompt {prompt_id} already has the judgments it needs; load the next prompt")
        if (
            lease.until <= time.monotonic()
            and self._open_leases(prompt_id, annotator) + len(self.judged.get(prompt_id, {}))
            >= self.settings.overlap
        ):
            raise Refused(
                409, f"your time on prompt {prompt_id} ran out and it went to someone else; load the next"
            )

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
    def submit(self, annotator: str, j: Submission) -> dict[str, Any]:
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
            self._require_assigned(annotator, j.prompt_id)
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
            try:
                self.log.append(line)  # on disk (fsync) before the answer; or nothing on disk, and refused
            except OSError as e:
                raise Refused(
                    507,
                    f"the judgment could not be saved ({e.strerror or e}); it was not recorded: try again later",
                ) from None
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
