"""`align run`: data -> preferences -> SFT -> gates -> reward -> gate -> DPO and/or PPO -> gates, in one run directory.

What the runner guarantees:
- Each stage's output is keyed by a hash of its resolved config and of everything it reads (the keys of the parent
  artifacts it names, the sha256 of the files it names). A re-run skips a stage whose key is unchanged and whose
  artifact is complete, resumes one that was interrupted with the same key, and redoes one whose key changed (the
  old folder is kept under .superseded/). So a changed config re-runs that stage and what depends on it, nothing else.
- Gates run after their stage (and are keyed the same way). The first failed gate stops the run with exit 1 and
  the path of its report, unless a reviewer overrode it (`align gate override`), which the report shows.
- `--from STAGE` redoes that stage and every later one.
- pipeline.json records each stage's key, status and gates; report.html/report.md render the whole run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from align import annotate
from core import dist
from core.config import UserError, dump_config, printable, read_yaml, set_dotted, validate
from core.manifest import (
    atomic_write_json,
    atomic_write_text,
    now,
    read_gate,
    read_manifest,
    recorded_gates,
    sha256_path,
)
from core.model_card import GENERIC, write_model_card
from core.models import ALIASES, resolve_model_path, weights_fingerprint
from core.stage import PAUSED, print_gate, print_skipped, run_lock
from data_schemas.config import key_config
from data_schemas.gates import GateResult
from eval.registry import GATES, gate_settings
from eval.registry import gate as gate_row
from eval.report import deciding_figure
from eval.report import write_run_report as render
from eval.signoff import verify as verify_signoffs
from stages.registry import ORDER, STAGES

console = Console(stderr=True, soft_wrap=True)  # no line breaks inside paths and commands people copy


def _sub(value: Any, run: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{run}", str(run))
    if isinstance(value, list):
        return [_sub(v, run) for v in value]
    if isinstance(value, dict):
        return {k: _sub(v, run) for k, v in value.items()}
    return value


def stage_config(name: str, st, run: Path, gate_policy: Path | None = None):
    """The stage's validated config: its YAML, the pipeline's overrides, output_dir = {run}/{name}. A policy stage
    (DPO, PPO) takes its built-in policy gate's thresholds from the gate policy's `policy:` section, under the
    stage's own YAML and overrides."""
    data = read_yaml(st.config)
    if STAGES[name].policy_gate and gate_policy is not None and Path(gate_policy).exists():
        section = read_yaml(gate_policy).get("policy") or {}
        data["policy_gate"] = {**section, **(data.get("policy_gate") or {})}
    for k, v in st.overrides.items():
        set_dotted(data, k, _sub(v, run))
    data["output_dir"] = str(run / name)
    return validate(STAGES[name].config_model(), data, f"{st.config} (stage {name} of the pipeline)")


def _inputs_fingerprint(value: Any, run: Path, acc: list[str]) -> None:
    """Keys of artifacts and hashes of files named anywhere in a config (so upstream changes propagate)."""
    if isinstance(value, dict):
        for v in value.values():
            _inputs_fingerprint(v, run, acc)
    elif isinstance(value, list):
        for v in value:
            _inputs_fingerprint(v, run, acc)
    elif isinstance(value, str) and value and len(value) < 4096:
        p = Path(value)
        try:
            if (p / "manifest.json").exists():
                m = read_manifest(p)
                acc.append(f"{value}:{m.key}:{m.status}")
            elif (p / "config.json").is_file() or value in ALIASES:  # a model: its weights, not its name
                acc.append(f"{value}:weights:{weights_fingerprint(Path(resolve_model_path(value)))}")
            elif p.is_file():
                acc.append(f"{value}:{sha256_path(p)}")
        except (OSError, ValueError, UserError):
            return


def stage_key(cfg, run: Path) -> str:
    """Config (without the operational fields every key leaves out) + keys and hashes of everything it names."""
    dumped = key_config(cfg)
    acc: list[str] = []
    _inputs_fingerprint(dumped, run, acc)
    blob = json.dumps({"config": dumped, "inputs": sorted(acc)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _gate_settings(policy_path: Path, gate: str, overrides: dict[str, Any], run: Path):
    data = read_yaml(policy_path)
    section = dict(data.get(gate) or {})
    for k, v in overrides.items():
        set_dotted(section, k, _sub(v, run))
    data[gate] = section
    return gate_settings(gate, data, f"{policy_path} + pipeline overrides")


def run_pipeline(cfg, from_stage: str | None = None) -> int:
    """Run the pipeline; the exit status (0 complete, 1 a gate failed, 3 paused).

    Under several processes (`align run --num-processes N`) every process walks the same loop: the main process
    keeps the books (pipeline.json, superseded folders, gates, the report) and decides, the others learn each
    decision by broadcast; training stages run in every process, the data stages and the gates in the main one."""
    dist.init()
    main = dist.is_main()
    console.quiet = not main
    run = Path(cfg.run_dir)
    if from_stage is not None and from_stage not in ORDER:
        raise UserError(f"--from {from_stage}: not a stage; choose one of {', '.join(ORDER)}")
    unknown = sorted(set(cfg.stages.model_extra or {}) - set(ORDER))
    if unknown:
        raise UserError(
            f"stages: {', '.join(unknown)}: not a stage; the stages are {', '.join(ORDER)} (and annotate)"
        )
    present = [n for n in ORDER if getattr(cfg.stages, n) is not None]
    if not present:
        raise UserError("the pipeline has no stages")
    for n in present:  # every gate a stage names is a row of the gate table, said before anything runs
        for g in getattr(cfg.stages, n).gates:
            gate_row(g, f"stages.{n}.gates")
    # one `align run` per run directory: a second one moved the first's live SFT folder aside (issue 34 B6)
    lock, refusal = None, None
    if main:
        try:
            lock = run_lock(run, "using this run directory")
        except UserError as e:
            refusal = str(e)
    refusal = dist.broadcast(refusal)
    if refusal is not None:
        raise UserError(refusal)
    try:
        return _run_stages(cfg, run, from_stage, present, main)
    finally:
        if lock is not None:
            lock.release()


def _run_stages(cfg, run: Path, from_stage: str | None, present: list[str], main: bool) -> int:
    state_path = run / "pipeline.json"
    state: dict[str, Any] = {"stages": {}}
    if main:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run / "pipeline.yaml", dump_config(cfg))
        state = json.loads(state_path.read_text()) if state_path.exists() else state
        state.update({"updated_at": now()})
    dist.barrier()
    forced = set(ORDER[ORDER.index(from_stage) :]) if from_stage else set()
    t_run = time.perf_counter()
    for name in present:
        if name == "preferences" and cfg.stages.annotate is not None:
            ready = dist.broadcast(_annotation_round(cfg.stages.annotate, run) if main else None)
            if not ready:
                return PAUSED
        st = getattr(cfg.stages, name)
        scfg = stage_config(name, st, run, cfg.gate_policy)
        if name == "preferences" and cfg.stages.annotate is not None:
            judged = run / "annotate" / annotate.ANNOTATIONS
            if judged not in [Path(p) for p in scfg.inputs]:
                scfg.inputs.append(judged)  # the round's judgments join the configured ranking files
        key = (
            stage_key(scfg, run) if main else None
        )  # hashes every input: once, by the process keeping the books
        out = run / name
        t0 = time.perf_counter()
        resume = dist.broadcast(_plan_stage(name, out, key, state, forced) if main else None)
        if resume is not None:  # None: up to date
            if main:
                state["stages"][name] = {"key": key, "status": "running", "started_at": now()}
                atomic_write_json(state_path, state)
            status = None
            if STAGES[name].distributed:
                status = STAGES[name].run(scfg, resume=resume).status
            elif main:
                with dist.solo():
                    status = STAGES[name].run(scfg, resume=resume).status
            status = dist.broadcast(status)
            if status != "complete":  # paused by stop_after_steps: the next `align run` resumes it
                if main:
                    state["stages"][name]["status"] = "running"
                    atomic_write_json(state_path, state)
                console.print(f"[yellow]{name} is paused; run the same command again to resume[/]")
                return PAUSED
            if main:
                state["stages"][name].update({"status": "complete", "seconds": time.perf_counter() - t0})
                atomic_write_json(state_path, state)
        # ---- gates: the main process runs them; every process learns whether the run goes on ---------------
        failed = None
        if main:
            with dist.solo():
                previous = state["stages"].get(name, {}).get("gates")
                gates = _stage_gates(name, st, scfg, run, key, cfg.gate_policy, previous)
            state["stages"][name]["gates"] = gates
            atomic_write_json(state_path, state)
            failed = [g for g in gates if not g["passed"]]
        if dist.broadcast(bool(failed)):
            if main:
                write_run_report(run)
                for g in failed:
                    console.print(
                        f"[bold red]gate failed[/]: {name} {g['gate']}: see {printable(g['report'])}"
                    )
                    for reason in g.get("reasons", []):
                        console.print(f"  - {printable(reason)}", highlight=False)
            console.print(
                f"pipeline stopped after {name}. Fix the cause and re-run (finished stages are kept), or have a "
                "reviewer record an override: align gate override GATE_DIR --reviewer NAME --reason TEXT"
            )
            return 1
    if main:
        state["seconds_this_invocation"] = time.perf_counter() - t_run
        atomic_write_json(state_path, state)
        report = write_run_report(run)
        console.print(
            f"[bold green]pipeline complete[/]: {printable(str(run))}; report {printable(str(report))}"
        )
    dist.barrier()
    return 0


def _annotation_round(a, run: Path) -> bool:
    """The annotation round before `preferences`: sample the policy into {run}/annotate (once), then go on only
    when enough judgments exist; otherwise say how to collect them and pause (the next `align run` checks again).
    A policy or prompts file that changed since the samples were drawn (SFT redone) starts a new round; the old one
    is kept under .superseded/."""
    d = run / "annotate"
    aside = _superseded(run, "annotate")
    settings, rows, report = annotate.open_session(
        d, _sub(a.policy, run), Path(_sub(str(a.prompts), run)), a.options, superseded=aside
    )
    if aside.exists():
        console.print(f"[yellow]annotate: the policy or prompts changed; the previous round is in {aside}[/]")
    print_skipped(report.problems)
    sampler = annotate.Sampler(d, settings, rows)
    if sampler.todo:
        console.rule("annotate (sampling the policy for annotators)")
    sampler.run()  # loads no model when everything is sampled
    print_skipped(sampler.skipped)
    need = a.min_judgments or len(sampler.done_ids) * settings.overlap
    have = annotate.count_judgments(d)
    if have >= need:
        console.print(
            f"[green]✓[/] annotate: {have} judgments in {printable(str(d / annotate.ANNOTATIONS))} (needed {need})"
        )
        return True
    console.print(
        f"[yellow]annotate: {have} of {need} judgments[/] in {printable(str(d))}. Collect them, then run the same "
        "command again:\n"
        f"  align annotate add-annotator NAME --dir {printable(str(d))}     (once per annotator; prints their link)\n"
        f"  align annotate serve --dir {printable(str(d))}                  (the page; Ctrl+C when done)",
        highlight=False,
    )
    return False


def _superseded(run: Path, name: str) -> Path:
    """Where a redone stage's (or annotation round's) earlier output is kept."""
    return run / ".superseded" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _plan_stage(name: str, out: Path, key: str, state: dict, forced: set[str]) -> bool | None:
    """None when the stage is up to date; else whether to resume it (a changed one is moved aside first)."""
    rec = state["stages"].get(name, {})
    manifest = read_manifest(out) if (out / "manifest.json").exists() else None
    same = rec.get("key") == key
    if manifest and manifest.status == "complete" and same and name not in forced:
        console.print(f"[green]✓[/] {name}: up to date ({out})")
        return None
    resume = bool(manifest and manifest.status == "running" and same and name not in forced)
    if out.exists() and not resume:
        old = _superseded(out.parent, name)
        old.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(out), str(old))
        console.print(f"[yellow]{name}: inputs or config changed; previous output kept in {old}[/]")
    console.rule(f"{name}{' (resuming)' if resume else ''}")
    return resume


def _stage_gates(
    name: str, st, scfg, run: Path, stage_key_: str, policy: Path, state_gates: list | None = None
) -> list[dict[str, Any]]:
    """Built-in gates of the stage (from its manifest) and the pipeline's gates for it, as summary records.
    `state_gates`: the summaries pipeline.json holds from the last run (their record hashes: an edited gate.json is
    run again, never reused).

    A pipeline gate is reused only when its key matches: the stage key, the candidate artifact's own manifest key
    and start time (a stage redone with `--from` is a new candidate, even with the same config), the parent and
    the gate settings."""
    out = run / name
    recs = []
    m = read_manifest(out)
    for gdir, r in recorded_gates(out, m):
        recs.append(_summary(name, r, gdir))
    recorded = {x["gate"]: x.get("record_sha256") for x in (state_gates or []) if isinstance(x, dict)}
    parent = _sub(st.parent, run) if st.parent else STAGES[name].gate_parent(scfg)
    for gate, overrides in st.gates.items():
        gdir = run / "gates" / f"{name}-{gate}"
        settings = _gate_settings(policy, gate, overrides, run)
        gkey = hashlib.sha256(
            json.dumps(
                [stage_key_, m.key, m.started_at, str(parent), settings.model_dump(mode="json")],
                sort_keys=True,
            ).encode()
        ).hexdigest()
        prev = read_gate(gdir)
        if prev is not None and recorded.get(gate) not in (None, prev.content_sha256()):
            console.print(
                f"[yellow]warning[/]: {printable(str(gdir / 'gate.json'))} was changed after this run recorded it; "
                f"running the {gate} gate again",
                highlight=False,
            )
            prev = None
        if prev is not None and prev.key == gkey:
            console.print(f"[green]✓[/] {name} {gate} gate: up to date ({prev.verdict})")
            r = prev
        else:
            if parent is None:
                raise UserError(
                    f"stage {name}: say which model its {gate} gate compares against (parent: ...)"
                )
            console.print(f"{name}: {gate} gate against {printable(str(parent))}")
            t0 = time.perf_counter()
            data = _gate_data(scfg, out) if GATES[gate].needs_data else None
            r = GATES[gate].run(str(out), str(parent), settings, gdir, data)
            r.key, r.seconds = gkey, time.perf_counter() - t0
            # the runner wrote gate.json and the reports; key and seconds only go into gate.json (the reports do
            # not show them), so the reports are not rendered a second time
            atomic_write_json(gdir / "gate.json", r.model_dump(mode="json"))
            print_gate(r, gdir / "gate.md", f"{name}: ")  # its verdict, as a stage's own gates are said
        recs.append(_summary(name, r, gdir))
    return recs


def _gate_data(scfg, candidate: Path) -> Path:
    """The held-out instruction data a pipeline gate scores: the SFT artifact's validation data (for SFT its own,
    for DPO/PPO their parent's unless gate_data is set)."""

    data = STAGES[scfg.stage].gate_data(scfg, candidate)
    if data is None:
        raise UserError(f"stage {scfg.stage}: its models are not gated on held-out instruction data")
    return data


def _summary(stage: str, r: GateResult, gdir: Path) -> dict[str, Any]:
    report = gdir / "gate.html" if (gdir / "gate.html").exists() else gdir / "gate.md"
    return {
        "stage": stage,
        "gate": r.gate,
        "verdict": r.verdict,
        "passed": r.passed,
        "override": r.override.model_dump() if r.override_holds else None,
        "reasons": r.reasons,
        "report": str(report),
        "seconds": r.seconds,
        "record_sha256": r.content_sha256(),
        "figure": deciding_figure(r),
    }


def write_run_report(run: Path) -> Path:
    """report.html + report.md of a run directory (eval/report.py renders): every stage, its key, its gates."""

    run = Path(run)
    state = (
        json.loads((run / "pipeline.json").read_text())
        if (run / "pipeline.json").exists()
        else {"stages": {}}
    )
    stages = []
    for name in ORDER:
        d = run / name
        if not (d / "manifest.json").exists():
            continue
        m = json.loads((d / "manifest.json").read_text())
        gates = state["stages"].get(name, {}).get("gates")
        if gates is None:
            gates = [{**g, "report": str(d / g["report"])} for g in m.get("gates") or []]
        gates = [_verified(name, g, m.get("key")) for g in gates]
        stages.append((name, m, gates))
        _rewrite_card(name, d, gates, run)
    signoffs = [
        {"reviewer": v.record.get("reviewer"), "decision": v.record.get("decision"), "at": v.record.get("at"),
         "note": v.record.get("note", ""), "signature": v.signature, "intact": v.intact, "state": v.summary()}
        for v in verify_signoffs(run)
    ]  # fmt: skip
    seconds = {k: v.get("seconds") for k, v in state["stages"].items() if isinstance(v, dict)}
    return render(run, stages, signoffs, seconds)


def _verified(stage: str, summary: dict[str, Any], candidate_key: str | None = None) -> dict[str, Any]:
    """A gate's summary recomputed from its record as it is now (an override given since counts; a record edited
    since the run recorded its hash fails, saying so)."""
    gdir = Path(summary["report"]).parent
    r = read_gate(gdir, summary.get("record_sha256"), candidate_key) or GateResult(
        gate=summary.get("gate", "?"), reasons=[f"{gdir}/gate.json is missing or unreadable"]
    )
    return _summary(stage, r, gdir)


def _rewrite_card(name: str, artifact: Path, gates: list[dict[str, Any]], run: Path) -> None:
    """The artifact's model card with the gates `align run` ran on it (and any override since), so that the card
    that leaves with the model says every verdict, not only the stage's own."""
    folders = [(g, Path(g["report"]).parent) for g in gates if g.get("report")]
    ran = tuple((g, d) for g, d in folders if artifact.resolve() not in d.resolve().parents)  # not its own
    try:
        m = read_manifest(artifact)
    except UserError:
        return
    if m.model is None or m.status != "complete":
        return
    write_model_card(artifact, m, STAGES[name].card or GENERIC, run_gates=ran)
