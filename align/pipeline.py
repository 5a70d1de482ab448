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

from pydantic import ValidationError
from rich.console import Console

from align.config import UserError, dump_config, format_validation_error, read_yaml, set_dotted
from align.manifest import atomic_write_json, atomic_write_text, now, read_manifest, sha256_path

console = Console(stderr=True)
ORDER = ["data", "sft", "preferences", "reward", "dpo", "ppo"]


def _models():
    from data_schemas.config import (
        DataBuildConfig,
        DPOConfig,
        PPOConfig,
        PreferencesConfig,
        RewardConfig,
        SFTConfig,
    )

    return {
        "data": DataBuildConfig,
        "preferences": PreferencesConfig,
        "sft": SFTConfig,
        "reward": RewardConfig,
        "dpo": DPOConfig,
        "ppo": PPOConfig,
    }


def _sub(value: Any, run: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{run}", str(run))
    if isinstance(value, list):
        return [_sub(v, run) for v in value]
    if isinstance(value, dict):
        return {k: _sub(v, run) for k, v in value.items()}
    return value


def stage_config(name: str, st, run: Path):
    """The stage's validated config: its YAML, the pipeline's overrides, output_dir = {run}/{name}."""
    data = read_yaml(st.config)
    for k, v in st.overrides.items():
        set_dotted(data, k, _sub(v, run))
    data["output_dir"] = str(run / name)
    try:
        return _models()[name].model_validate(data)
    except ValidationError as e:
        raise UserError(
            "\n".join(format_validation_error(e, f"{st.config} (stage {name} of the pipeline)"))
        ) from None


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
            elif p.is_file():
                acc.append(f"{value}:{sha256_path(p)}")
        except (OSError, ValueError, UserError):
            return


def stage_key(cfg, run: Path) -> str:
    dumped = cfg.model_dump(mode="json")
    dumped.pop("output_dir", None)
    for section in ("train",):  # operational fields that do not change the product
        if isinstance(dumped.get(section), dict):
            for k in ("stop_after_steps", "report_to"):
                dumped[section].pop(k, None)
    acc: list[str] = []
    _inputs_fingerprint(dumped, run, acc)
    blob = json.dumps({"config": dumped, "inputs": sorted(acc)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _run_stage(name: str, cfg, resume: bool) -> None:
    if name == "data":
        from stages.data import build

        build(cfg)
    elif name == "preferences":
        from stages.rankings import build_preferences

        build_preferences(cfg)
    elif name == "sft":
        from stages import sft

        sft.run(cfg, resume=resume)
    else:
        import importlib

        importlib.import_module(f"stages.{name}").run(cfg, resume=resume)


def _default_parent(name: str, cfg, run: Path) -> str | None:
    if name == "sft":
        return cfg.model.name_or_path
    if name in ("dpo", "ppo"):
        return str(cfg.init_from)
    return None


def _gate_settings(policy_path: Path, gate: str, overrides: dict[str, Any], run: Path):
    from data_schemas.config import GatesConfig

    data = read_yaml(policy_path)
    section = dict(data.get(gate) or {})
    for k, v in overrides.items():
        set_dotted(section, k, _sub(v, run))
    data[gate] = section
    try:
        return getattr(GatesConfig.model_validate(data), gate)
    except ValidationError as e:
        raise UserError(
            "\n".join(format_validation_error(e, f"{policy_path} + pipeline overrides"))
        ) from None


def _gate_passed(r: dict[str, Any]) -> bool:
    return r.get("verdict") == "pass" or bool(r.get("override"))


def run_pipeline(cfg, from_stage: str | None = None) -> int:
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / "pipeline.yaml", dump_config(cfg))
    state_path = run / "pipeline.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"stages": {}}
    state.update({"updated_at": now()})
    if from_stage is not None and from_stage not in ORDER:
        raise UserError(f"--from {from_stage}: not a stage; choose one of {', '.join(ORDER)}")
    present = [n for n in ORDER if getattr(cfg.stages, n) is not None]
    if not present:
        raise UserError("the pipeline has no stages")
    forced = set(ORDER[ORDER.index(from_stage) :]) if from_stage else set()
    t_run = time.perf_counter()
    for name in present:
        st = getattr(cfg.stages, name)
        scfg = stage_config(name, st, run)
        key = stage_key(scfg, run)
        out = run / name
        rec = state["stages"].get(name, {})
        manifest = read_manifest(out) if (out / "manifest.json").exists() else None
        same = rec.get("key") == key
        t0 = time.perf_counter()
        if manifest and manifest.status == "complete" and same and name not in forced:
            console.print(f"[green]✓[/] {name}: up to date ({out})")
        else:
            resume = bool(manifest and manifest.status == "running" and same and name not in forced)
            if out.exists() and not resume:
                old = run / ".superseded" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
                old.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(out), str(old))
                console.print(f"[yellow]{name}: inputs or config changed; previous output kept in {old}[/]")
            console.rule(f"{name}{' (resuming)' if resume else ''}")
            state["stages"][name] = {"key": key, "status": "running", "started_at": now()}
            atomic_write_json(state_path, state)
            _run_stage(name, scfg, resume)
            m = read_manifest(out)
            if m.status != "complete":  # paused by stop_after_steps: the next `align run` resumes it
                state["stages"][name]["status"] = m.status
                atomic_write_json(state_path, state)
                console.print(f"[yellow]{name} is {m.status}; run the same command again to resume[/]")
                return 1
            state["stages"][name].update({"status": "complete", "seconds": time.perf_counter() - t0})
            atomic_write_json(state_path, state)
        # ---- gates -------------------------------------------------------------------------------------
        gates = _stage_gates(name, st, scfg, run, key, cfg.gate_policy)
        state["stages"][name]["gates"] = gates
        atomic_write_json(state_path, state)
        failed = [g for g in gates if not g["passed"]]
        if failed:
            write_run_report(run)
            for g in failed:
                console.print(f"[bold red]gate failed[/]: {name} {g['gate']}: see {g['report']}")
                for reason in g.get("reasons", []):
                    console.print(f"  - {reason}")
            console.print(
                f"pipeline stopped after {name}. Fix the cause and re-run (finished stages are kept), or have a "
                "reviewer record an override: align gate override GATE_DIR --reviewer NAME --reason TEXT"
            )
            return 1
    state["seconds_this_invocation"] = time.perf_counter() - t_run
    atomic_write_json(state_path, state)
    report = write_run_report(run)
    console.print(f"[bold green]pipeline complete[/]: {run}; report {report}")
    return 0


def _stage_gates(name: str, st, scfg, run: Path, stage_key_: str, policy: Path) -> list[dict[str, Any]]:
    """Built-in gates of the stage (from its manifest) and the pipeline's gates for it, as summary records."""
    out = run / name
    recs = []
    m = read_manifest(out)
    for g in m.gates or []:
        gdir = out / Path(g["report"]).parent
        r = json.loads((gdir / "gate.json").read_text()) if (gdir / "gate.json").exists() else g
        recs.append(_summary(name, g["gate"], r, gdir))
    parent = _sub(st.parent, run) if st.parent else _default_parent(name, scfg, run)
    for gate, overrides in st.gates.items():
        gdir = run / "gates" / f"{name}-{gate}"
        settings = _gate_settings(policy, gate, overrides, run)
        gkey = hashlib.sha256(
            json.dumps([stage_key_, str(parent), settings.model_dump(mode="json")], sort_keys=True).encode()
        ).hexdigest()
        prev = json.loads((gdir / "gate.json").read_text()) if (gdir / "gate.json").exists() else None
        if prev and prev.get("key") == gkey:
            console.print(f"[green]✓[/] {name} {gate} gate: up to date ({prev['verdict']})")
            r = prev
        else:
            if parent is None:
                raise UserError(
                    f"stage {name}: say which model its {gate} gate compares against (parent: ...)"
                )
            console.print(f"{name}: {gate} gate against {parent}")
            t0 = time.perf_counter()
            r = _run_gate(gate, str(out), str(parent), scfg, settings, gdir)
            r["key"], r["seconds"] = gkey, time.perf_counter() - t0
            atomic_write_json(gdir / "gate.json", r)
        recs.append(_summary(name, gate, r, gdir))
    return recs


def _run_gate(gate: str, candidate: str, parent: str, scfg, settings, gdir: Path) -> dict[str, Any]:
    if gate == "perplexity":
        from eval.gates import run_perplexity_gate
        from stages.common import sft_validation_data

        data = sft_validation_data(Path(candidate)) if scfg.stage == "sft" else _policy_gate_data(scfg)
        return run_perplexity_gate(candidate, parent, data, settings, gdir)
    from eval.bias import run_bias_gate

    return run_bias_gate(candidate, parent, settings, gdir)


def _policy_gate_data(scfg) -> Path:
    from stages.common import sft_validation_data

    return scfg.gate_data or sft_validation_data(Path(scfg.init_from))


def _summary(stage: str, gate: str, r: dict[str, Any], gdir: Path) -> dict[str, Any]:
    report = gdir / "gate.html" if (gdir / "gate.html").exists() else gdir / "gate.md"
    return {
        "stage": stage,
        "gate": gate,
        "verdict": r.get("verdict", "fail"),
        "passed": _gate_passed(r),
        "override": r.get("override"),
        "reasons": r.get("reasons", []),
        "report": str(report),
        "seconds": r.get("seconds"),
    }


# ==========================================================================================================
# Overrides and the run report
# ==========================================================================================================
def override_gate(gate_dir: Path, reviewer: str, reason: str) -> dict[str, Any]:
    """Record a reviewer's override of a failed gate in gate.json, its reports and the candidate's manifest."""
    from eval.report import write_gate_reports

    gate_dir = Path(gate_dir)
    if not (gate_dir / "gate.json").exists():
        raise UserError(f"{gate_dir}: no gate.json here (give the folder of one gate's report)")
    if not reviewer.strip() or not reason.strip():
        raise UserError("an override needs a named reviewer and a reason")
    r = json.loads((gate_dir / "gate.json").read_text())
    if r.get("verdict") == "pass":
        raise UserError(f"{gate_dir}: the gate passed; there is nothing to override")
    r["override"] = {"reviewer": reviewer.strip(), "reason": reason.strip(), "at": now()}
    atomic_write_json(gate_dir / "gate.json", r)
    images = sorted(gate_dir.glob("*.png"))
    write_gate_reports(r, gate_dir, images)
    cand = Path(str(r.get("candidate", "")))
    if not (cand / "manifest.json").exists():  # a stage's built-in gate: <artifact>/gates/<name>/
        cand = gate_dir.parent.parent
    if (cand / "manifest.json").exists():
        data = json.loads((cand / "manifest.json").read_text())
        data.setdefault("overrides", []).append(
            {"gate": r.get("gate"), "gate_dir": str(gate_dir), **r["override"]}
        )
        atomic_write_json(cand / "manifest.json", data)
    return r


def write_run_report(run: Path) -> Path:
    """report.html + report.md of a run directory: every stage, its key, its gates with verdicts and links."""
    import html

    from eval.report import _CSS, _SIGNOFF

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
            gates = [_summary(name, g["gate"], g, d / Path(g["report"]).parent) for g in m.get("gates") or []]
        stages.append((name, m, gates))
    all_gates = [g for _, _, gs in stages for g in gs]
    failed = [g for g in all_gates if not g["passed"]]
    verdict = "fail" if failed else ("pass" if all_gates else "fail")
    label = "FAIL" if failed else ("PASS" if all_gates else "NO GATES RUN")
    if not failed and any(g.get("override") for g in all_gates):
        verdict, label = "overridden", "PASS WITH OVERRIDES"
    md = [f"# Run {run}: **{label}**", ""]
    h = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>align run: {label}</title>",
        f"<style>{_CSS}</style></head><body><div id='verdict' class='verdict {verdict}'>Run: {label}</div>",
        f"<p class='sub'><code>{html.escape(str(run))}</code> · {now()}</p>",
    ]
    if failed:
        h.append("<h2>Stopped at</h2><ul>")
        for g in failed:
            h.append(
                f"<li><b>{g['stage']} · {g['gate']}</b>: " + "; ".join(html.escape(x) for x in g["reasons"])
            )
            md.append(f"- **{g['stage']} {g['gate']} failed**: " + "; ".join(g["reasons"]))
        h.append("</ul>")
        md.append("")
    h.append("<h2>Stages</h2><table><tr><th>stage</th><th>status</th><th>key</th><th>base model</th>"
             "<th>key metrics</th><th>gates</th></tr>")  # fmt: skip
    md += ["| stage | status | key | gates |", "|---|---|---|---|"]
    for name, m, gates in stages:
        metrics = {k: v for k, v in (m.get("metrics") or {}).items() if isinstance(v, int | float)}
        shown = ", ".join(f"{k}={v:.4g}" for k, v in list(metrics.items())[:6])
        links = []
        for g in gates:
            rel = (
                Path(g["report"]).resolve().relative_to(run.resolve())
                if Path(g["report"]).is_absolute()
                else g["report"]
            )
            tag = "overridden" if g.get("override") else g["verdict"]
            links.append(f"<a href='{html.escape(str(rel))}'>{g['gate']}: {tag.upper()}</a>")
        h.append(
            f"<tr><td>{name}</td><td>{m['status']}</td><td><code>{m['key'][:12]}</code></td>"
            f"<td>{html.escape(str((m.get('model') or {}).get('name', '—')))}</td><td>{html.escape(shown)}</td>"
            f"<td>{'<br>'.join(links) or '—'}</td></tr>"
        )
        md.append(f"| {name} | {m['status']} | `{m['key'][:12]}` | "
                  + ", ".join(f"{g['gate']}: {('overridden' if g.get('override') else g['verdict']).upper()}" for g in gates)
                  + " |")  # fmt: skip
    h.append("</table><h2>Lineage</h2><table><tr><th>stage</th><th>parents</th><th>inputs</th></tr>")
    for name, m, _ in stages:
        parents = ", ".join(f"{p['stage']} ({p['key'][:12]})" for p in m.get("parents", []))
        inputs = ", ".join(f"{Path(i['path']).name} ({i['sha256'][:12]})" for i in m.get("inputs", []))
        h.append(
            f"<tr><td>{name}</td><td>{html.escape(parents or '—')}</td><td>{html.escape(inputs or '—')}</td></tr>"
        )
    h.append("</table>" + _SIGNOFF + "</body></html>")
    md += ["", "Reviewer sign-off: ____  Decision: ☐ approve ☐ reject  Date: ____", ""]
    atomic_write_text(run / "report.html", "".join(h))
    atomic_write_text(run / "report.md", "\n".join(md))
    return run / "report.html"
