"""The stage contract: one shape for every stage (data, preferences, sft, reward, dpo, ppo).

A stage is one module with `run(cfg, resume=False, force=False) -> StageResult`. Around its own work it uses one
`StageContext`, opened in one place, which owns what every stage does the same way:

    ctx = StageContext(cfg, resume, force)   # output folder checked, seed set, precision chosen
    if ctx.finished:                         # --resume on a complete artifact: nothing to do
        return ctx.existing_result()
    ... read data, fill ctx.counts ...
    with ctx.open(inputs=..., parents=..., model=...):   # folder lock; manifest 'running' + config.yaml (a
                                                          # changed key on --resume is refused unless force);
                                                          # an exception marks it 'failed'
        ... train; if paused: return ctx.paused() ...
        ... write products; run the stage's built-in gate on the pending artifact ...
        return ctx.complete(metrics, gates=[gate])       # gates recorded, then 'complete', in one write

So an artifact is never marked complete before its gate (a kill during the gate leaves it 'running', and --resume
runs the gate again), the manifest's key always leaves out the same operational fields, and the CLI and the
pipeline treat every stage alike through StageResult.

Under a multi-process launch (torchrun, accelerate, `--num-processes`; core/dist.py) every process runs the
stage, and the context makes the artifact one: only the main process checks the folder, takes the lock, writes
the manifest and config (`ctx.is_main` guards a stage's own writes and gates); the others print nothing, wait for
it at the start and at `complete()`, and return the same StageResult (its gates broadcast from the main process).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from filelock import FileLock, Timeout
from rich.console import Console

from core import dist
from core.config import UserError, dump_config, printable
from core.manifest import (
    ArtifactWriter,
    atomic_write_text,
    now,
    read_gate,
    read_manifest,
    recorded_gates,
    sha256_path,
)
from core.model_card import GENERIC, write_model_card
from core.plan import check_at_start
from core.trackers import RunInfo, Tracking, artifact_samples, require_trackers
from data_schemas.config import key_config
from data_schemas.gates import GateResult
from data_schemas.manifest import ModelIdentity

console = Console(stderr=True, soft_wrap=True)  # no line breaks inside paths and commands people copy


PAUSED = 3  # the exit status of a stage or pipeline that stopped cleanly before its end


@dataclass
class StageResult:
    """What every stage returns: its artifact, whether it finished, and the gates it ran on itself."""

    stage: str
    artifact: Path
    status: Literal["complete", "paused"]
    gates: list[GateResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Complete, and every built-in gate passed (or was overridden by a named reviewer)."""
        return self.status == "complete" and all(g.passed for g in self.gates)

    @property
    def exit_code(self) -> int:
        """0: complete with its gates passed; 1: a gate failed; 3: paused cleanly at train.stop_after_steps (not
        finished: continue with --resume). A paused run is not a success a script should move on from."""
        if self.status == "paused":
            return PAUSED
        return 0 if self.passed else 1


def print_skipped(problems: list[str], show: int = 20, what: str = "skipped") -> None:
    """The first `show` bad rows as `file:line: field: reason` (user text printed as text, never as markup)."""
    for p in problems[:show]:
        console.print(f"[yellow]{what}[/] {printable(p)}", highlight=False, soft_wrap=True)
    if len(problems) > show:
        console.print(
            f"[yellow]... and {len(problems) - show} more {what} rows[/] (all of them in the manifest)"
        )


def print_gate(
    gate: GateResult, report: Path, lead: str = "", checks: bool = False, con: Console = console
) -> None:
    """The verdict with the report's path (after `lead`), each check if asked, and the reasons to fail."""
    colour = "green" if gate.passed else "red"
    label = "OVERRIDDEN" if gate.override_holds else gate.verdict.upper()
    con.print(f"{lead}{gate.gate} gate [bold {colour}]{label}[/] ({printable(str(report))})", highlight=False)
    for c in gate.checks if checks else []:
        con.print(
            f"  {'ok ' if c.passed else 'FAIL'} {printable(c.metric)}: parent {_fmt(c.parent)} -> candidate "
            f"{_fmt(c.candidate)} (allowed: {printable(c.limit)})",
            highlight=False,
        )
    for reason in gate.reasons:
        con.print(f"  - {printable(reason)}", highlight=False)


def print_verdict(stage: str, artifact: Path, gate: GateResult, summary: str = "") -> None:
    """One line: the stage is done, what it achieved, and its gate's verdict with the report's path."""
    lead = f"{stage} complete: {printable(str(artifact))}{'; ' + summary if summary else ''}; "
    print_gate(gate, artifact / "gates" / gate.gate / "gate.md", lead)
    print_export_hint(artifact)


def print_export_hint(artifact: Path, con=None) -> None:
    """How to take a model artifact out of align: its adapters only load correctly through its stack."""
    adapter = "; --adapter for one PEFT adapter on the base" if (Path(artifact) / "adapter").is_dir() else ""
    (con or console).print(
        f"  to use it outside align: align export {printable(str(artifact))} --to DIR (a whole model{adapter})",
        highlight=False,
        soft_wrap=True,
    )


MODEL_FOLDERS = ("adapter", "model", "merged", "value_head")


def require_finite_weights(out: Path) -> None:
    """Every tensor the artifact's model folders hold is finite, or one sentence naming the first that is not (the
    artifact is then 'failed', never 'complete': a diverged run wrote 28 all-NaN adapter tensors and exit 0)."""
    files = [f for d in MODEL_FOLDERS for f in sorted((Path(out) / d).glob("*.safetensors"))]
    if not files:
        return
    import torch
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                t = st.get_tensor(name)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise UserError(
                        f"{f}: the trained weights are not finite ({name} holds NaN or inf): training diverged; lower "
                        "train.learning_rate (or raise train.warmup_ratio) and run again"
                    )


def _tracker_safe(fn) -> None:
    """A tracker that cannot take align's record (its server down, its quota spent) is said, not fatal: the artifact
    and its gates are the evidence, the tracker a copy."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - any tracker library's error
        console.print(f"[yellow]warning[/]: a tracker could not record align's run: {type(e).__name__}: {e}")


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def figures(metrics: dict[str, Any], keys: tuple[str, ...] | None = None) -> str:
    """Metrics as a person reads them: `train loss 1.234, eval perplexity 5.18e+04, peak memory gib per process
    0.803`: names with spaces, numbers to four significant digits, lists joined, what is missing left out
    (`keys`: these, in this order)."""
    out = []
    for k in keys or tuple(metrics):
        v = metrics.get(k)
        if v is None or isinstance(v, dict | str) and not v:
            continue
        shown = "/".join(_fmt(x) for x in v) if isinstance(v, list) else _fmt(v)
        out.append(f"{k.replace('_', ' ')} {shown}")
    return ", ".join(out)


class StageContext:
    """One run of one stage: config, output folder, manifest writer, precision, counts, resume."""

    @property
    def run_name(self) -> str:
        """The trackers' run name: the stage and its artifact key (one run per distinct config and inputs)."""
        return f"{self.stage}-{self.writer.manifest.key}" if self.writer is not None else self.stage

    def __init__(self, cfg: Any, resume: bool = False, force: bool = False, spec: Any = None, callbacks=()):
        """`spec` is the stage's row of the stage table (stages/registry.py: its plan shape and model-card facts);
        `callbacks` are the caller's hooks (transformers TrainerCallback objects), which the Trainer stages add to
        their Trainer and PPO calls at its iterations."""
        self.cfg = cfg
        self.spec = spec
        self.callbacks = list(callbacks)
        self.stage: str = cfg.stage
        self.out = Path(cfg.output_dir)
        self.resume = resume
        self.force = force
        self.counts: dict[str, Any] = {}
        self.writer: ArtifactWriter | None = None
        dist.fresh_stage()  # nothing of a previous stage's engine (DeepSpeed) carries into this one
        dist.init()
        self.is_main = dist.is_main()
        console.quiet = not self.is_main  # one voice: the main process speaks for the run
        self.finished = self._prepare_output_dir_once()
        self.seed: int | None = _seed_of(cfg)
        self.precision: str | None = None
        trackers = [n for n in getattr(getattr(cfg, "train", None), "report_to", None) or [] if n != "none"]
        self.tracking = Tracking(
            trackers if self.is_main else []
        )  # align's record in them (core/trackers.py)
        if not self.finished:
            require_trackers(trackers)
            if getattr(cfg, "precision", None) is not None:
                from core.models import choose_precision  # lazy: imports torch

                self.precision = choose_precision(cfg.precision)
            shape = getattr(spec, "plan", None)
            if shape is not None and self.is_main:
                warning = check_at_start(
                    cfg, shape
                )  # before a run that will not fit (align plan has the detail)
                if warning:
                    console.print(f"[yellow]warning[/]: {warning}", highlight=False)
            if self.seed is not None and hasattr(cfg, "train"):
                from transformers import set_seed  # lazy: only training stages need it

                set_seed(self.seed)

    # ---- before ---------------------------------------------------------------------------------------
    def _prepare_output_dir_once(self) -> bool:
        """The main process checks and creates the folder; the others learn its answer (or its refusal)."""
        answer: tuple[bool, str | None] = (False, None)
        if self.is_main:
            try:
                answer = (self._prepare_output_dir(), None)
            except UserError as e:
                answer = (False, str(e))
        finished, error = dist.broadcast(answer)
        if error is not None:
            raise UserError(error)
        return finished

    def _prepare_output_dir(self) -> bool:
        """Create the artifact folder; True when --resume finds it already complete (nothing to do). A non-empty
        folder without --resume is refused: a finished artifact is never overwritten by accident."""
        if self.out.exists() and not self.out.is_dir():
            raise UserError(
                f"{self.out}: is a file, not a folder; the output must be a new or empty folder (never an input)"
            )
        manifest = self.out / "manifest.json"
        if self.resume and manifest.exists():
            m = read_manifest(self.out)
            if m.stage != self.stage:
                raise UserError(
                    f"{self.out}: holds a {m.stage} artifact, not {self.stage}; --resume continues a {self.stage} "
                    "run in its own output_dir"
                )
            if m.status == "complete":
                self._same_as_recorded(m)
                console.print(
                    f"{self.stage} already complete: {printable(str(self.out))} (nothing to resume)"
                )
                return True
        elif self.resume and self.out.exists() and any(p.name != LOCK for p in self.out.iterdir()):
            raise UserError(
                f"{self.out}: has files but no manifest.json, so it is not an align run to resume (its files are "
                "left as they are); choose an empty output_dir"
            )
        if self.out.exists() and any(p.name != LOCK for p in self.out.iterdir()) and not self.resume:
            hint = "pass --resume to continue it" if manifest.exists() else "choose an empty output_dir"
            raise UserError(f"{self.out}: output directory is not empty; {hint} (or delete it to start over)")
        self.out.mkdir(parents=True, exist_ok=True)
        return False

    def _same_as_recorded(self, m) -> None:
        """--resume on a complete artifact promises its result for *this* config: the config (without operational
        fields), every recorded input's bytes and every parent's key must be as they were."""
        changed = []
        try:
            old = type(self.cfg).model_validate(
                yaml.safe_load((self.out / "config.yaml").read_text(encoding="utf-8"))
            )
            if key_config(old) != key_config(self.cfg):
                changed.append("the config")
        except (OSError, ValueError, TypeError, yaml.YAMLError):
            changed.append("the config (config.yaml unreadable)")
        for i in m.inputs:
            p = Path(i.path)
            if p.exists() and sha256_path(p) != i.sha256:
                changed.append(f"input {i.path}")
        for parent in m.parents:
            try:
                if read_manifest(Path(parent.path)).key != parent.key:
                    changed.append(f"parent {parent.path}")
            except UserError:
                pass  # a parent moved or gone: the artifact stands on its record
        if changed:
            raise UserError(
                f"{self.out}: complete, but {', '.join(changed)} changed since it was made, so it is not this run's "
                "result; use a new output_dir (or delete this one to rebuild it)"
            )

    def existing_result(self) -> StageResult:
        """The result of an artifact that is already complete, with the gates its manifest records."""
        gates = [r for _, r in recorded_gates(self.out, read_manifest(self.out))]
        return StageResult(self.stage, self.out, "complete", gates)

    @contextlib.contextmanager
    def open(
        self,
        inputs: list[tuple[Path, str]] = (),
        parents: list[Path] = (),
        model: ModelIdentity | None = None,
    ) -> Iterator[StageContext]:
        """Manifest 'running' (key = config without operational fields + input hashes + parent keys) and
        config.yaml; inside, an exception marks the manifest 'failed' with the error (Ctrl-C leaves it 'running'
        so that --resume continues). Only the main process writes; the others run the block without a writer."""
        if not self.is_main:
            yield self
            return
        lock = run_lock(self.out, "writing this folder")  # two writers would interleave checkpoints
        try:
            yield from self._open(inputs, parents, model)
        finally:
            lock.release()

    def _open(self, inputs, parents, model) -> Iterator[StageContext]:
        if not self.resume and any(p.name != LOCK for p in self.out.iterdir()):
            # checked again under the lock: two runs that both found the folder empty must not both write it
            raise UserError(
                f"{self.out}: another run wrote this folder after this one checked it; choose another output_dir"
            )
        self.writer = ArtifactWriter(
            self.out, self.stage, key_config(self.cfg), list(inputs), parents=list(parents), seed=self.seed
        )
        self.writer.with_model(model)
        previous = self.writer.existing() if self.resume else None
        if previous is not None and previous.key != self.writer.manifest.key and not self.force:
            raise UserError(
                f"{self.out}: the config or its inputs changed since this run started (key {previous.key} -> "
                f"{self.writer.manifest.key}); --resume would mix two runs. Use a new output_dir, or pass "
                "--resume --force to continue the old run's checkpoints under the new settings"
            )
        self.writer.start(model)
        atomic_write_text(self.out / "config.yaml", dump_config(self.cfg))
        with self.writer.guard():
            yield self

    def begin_tracking(self) -> None:
        """Give the trackers' runs align's record (config, key), once they are open: the Trainer stages call it at
        the Trainer's train begin (lib/trainer.py), PPO once accelerate's trackers are up. Main process only."""
        if self.writer is None or not self.tracking.names:
            return
        info = RunInfo(self.stage, self.writer.manifest.key, self.out, json.loads(self.cfg.model_dump_json()))
        _tracker_safe(lambda: self.tracking.begin(info))

    # ---- after ----------------------------------------------------------------------------------------
    def paused(self) -> StageResult:
        """Stopped at train.stop_after_steps: the artifact stays 'running' and --resume continues it."""
        dist.barrier()  # the main process has written its checkpoint
        return StageResult(self.stage, self.out, "paused")

    def complete(self, metrics: dict[str, Any], gates: list[GateResult] | None = ()) -> StageResult:
        """Record the built-in gates and mark the artifact complete, in one manifest write (the last one). On the
        other processes `gates` is ignored: they return the main process's gates once it has written."""
        if not self.is_main:
            gates = dist.broadcast(None)  # sent once the manifest is written
            return StageResult(self.stage, self.out, "complete", gates)
        assert self.writer is not None, "complete() outside ctx.open()"
        require_finite_weights(self.out)  # never 'complete' over NaN weights (issue 34 B10)
        gates = list(gates or ())
        self.writer.manifest.gates = [
            {
                "gate": g.gate,
                "verdict": g.verdict,
                "reasons": g.reasons,
                "report": f"gates/{g.gate}/gate.md",
                # the record as written: later readers refuse it once edited (core.manifest.read_gate)
                "record_sha256": (read_gate(self.out / "gates" / g.gate) or g).content_sha256(),
            }
            for g in gates
        ]
        verdicts = [{"gate": g.gate, "verdict": g.verdict} for g in gates]
        _tracker_safe(lambda: self.tracking.end(verdicts, artifact_samples(self.out)))
        if self.writer.manifest.model is not None:  # a model artifact: its card, before it is marked complete
            update = {"metrics": metrics, "counts": self.counts, "status": "complete", "finished_at": now()}
            card = getattr(self.spec, "card", None) or GENERIC
            write_model_card(self.out, self.writer.manifest.model_copy(update=update), card)
        self.writer.complete(metrics, self.counts)
        dist.broadcast(gates)
        return StageResult(self.stage, self.out, "complete", gates)


LOCK = ".lock"


def run_lock(folder: Path, doing: str) -> FileLock:
    """An exclusive lock on a folder (filelock's, on its `.lock` file) until the caller releases it or the process
    ends: a stage writing its artifact, `align run` using its run directory. A second holder, in this process or
    another, is refused in one sentence saying what the first is `doing`."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    lock = FileLock(Path(folder) / LOCK)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        raise UserError(
            f"{folder}: another align process is {doing}; wait for it or choose another"
        ) from None
    return lock


def _seed_of(cfg: Any) -> int | None:
    train = getattr(cfg, "train", None)
    if train is not None and hasattr(train, "seed"):
        return train.seed
    return getattr(cfg, "seed", None)
