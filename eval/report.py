"""Reports for safety reviewers: one self-contained HTML page (and Markdown) per gate, and one per run.

Every gate writes the same record (data_schemas/gates.py: GateResult), so one renderer serves all gates. The page
reads top down: the verdict, why, the checks against their thresholds and the parent, the gate's tables, the plots,
the worst examples, the lineage of data and models, and an empty sign-off block. Images are embedded (base64), so
the file can be mailed or attached to a review ticket as it is.

HTML comes from Jinja2 templates (eval/templates/) with autoescaping on: every string that reaches a page, a
reviewer's name in an override, a benchmark sentence, a file path, is text, never markup.
"""

from __future__ import annotations

import base64
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

from core.manifest import atomic_write_text, now
from data_schemas.gates import GateResult

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1000px;margin:24px auto;padding:0 16px;
color:#1d1d1f;line-height:1.45}
.verdict{padding:18px 22px;border-radius:8px;color:#fff;font-size:28px;font-weight:700;margin-bottom:6px}
.verdict.pass{background:#1b7f3b}.verdict.fail{background:#b3261e}.verdict.overridden{background:#b26a00}
.sub{color:#555;margin:0 0 18px}
table{border-collapse:collapse;width:100%;margin:8px 0 18px;font-size:14px}
th,td{border:1px solid #ddd;padding:6px 8px;text-align:left;vertical-align:top}th{background:#f4f4f6}
td.ok{color:#1b7f3b;font-weight:600}td.bad{color:#b3261e;font-weight:600}td.info{color:#555;font-style:italic}tr.moved td{background:#fff3cd;font-weight:600}ul.moved li{background:#fff3cd;padding:2px 6px;margin:2px 0}
img{max-width:100%;border:1px solid #eee;margin:6px 0}
.signoff{border:2px dashed #888;padding:14px 18px;border-radius:8px;margin-top:24px}
.signoff div{margin:12px 0}.line{display:inline-block;min-width:320px;border-bottom:1px solid #333}
code{background:#f4f4f6;padding:1px 4px;border-radius:3px}
a.tag{font-weight:700}a.tag.pass{color:#1b7f3b}a.tag.fail{color:#b3261e}a.tag.overridden{color:#b26a00}
.curve{margin:2px 0 8px}.curve svg{background:#fafafc;border:1px solid #eee}
"""


def fmt(x: Any) -> str:
    """A number or value as a reviewer reads it (4 significant digits; '—' for nothing). Not escaped here."""
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, list | tuple) and len(x) == 2 and all(isinstance(v, int | float) for v in x):
        return f"[{fmt(float(x[0]))}, {fmt(float(x[1]))}]"
    return str(x)


@cache
def _env():
    import jinja2  # lazy: only report writing needs it

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
        autoescape=True,  # every template here is HTML
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["num"] = fmt
    env.globals["result"] = check_result
    return env


def as_result(r: GateResult | dict[str, Any]) -> GateResult:
    return r if isinstance(r, GateResult) else GateResult.model_validate(r)


def verdict_label(r: GateResult) -> tuple[str, str]:
    """(css class, text) of the banner: an override is shown as such, never as a plain pass."""
    if r.override_holds:
        return "overridden", f"FAIL, OVERRIDDEN by {r.override.reviewer}"
    if r.override is not None:  # given for another version of this record: it promotes nothing
        return "fail", "FAIL (the recorded override was for another version of this record)"
    return r.verdict, r.verdict.upper()


def check_result(c) -> str:
    """A check's result as a reviewer reads it: pass, FAIL, or (a statistic shown beside the deciding one)
    reported."""
    limit, passed = (c.get("limit", "—"), c.get("passed")) if isinstance(c, dict) else (c.limit, c.passed)
    if str(limit).startswith("reported"):
        return "reported, not deciding"
    return "pass" if passed else "FAIL"


def gate_html(r: GateResult | dict[str, Any], images: list[Path] | None = None) -> str:
    r = as_result(r)
    cls, label = verdict_label(r)
    embedded = [
        {"name": Path(p).stem, "data": base64.b64encode(Path(p).read_bytes()).decode()}
        for p in images or []
        if Path(p).exists()
    ]
    return (
        _env()
        .get_template("gate.html.j2")
        .render(
            r=r.model_dump(mode="json"),
            title=f"{r.gate} gate",
            label=label,
            css_class=cls,
            css=CSS,
            images=embedded,
            override_holds=r.override_holds,
        )
    )


def _md_cell(x: Any) -> str:
    return fmt(x).replace("|", "/").replace("\n", " ")


def gate_markdown(r: GateResult | dict[str, Any]) -> str:
    r = as_result(r)
    _, label = verdict_label(r)
    lines = [f"# {r.gate.capitalize()} gate: **{label}**", ""]
    lines += [f"- candidate: `{r.candidate}`", f"- parent: `{r.parent}`"]
    lines += [f"- data: `{r.data}`"] if r.data else []
    lines.append("")
    if r.override_holds:
        o = r.override
        lines += [f"**Overridden** by {o.reviewer} on {o.at}: {o.reason}", ""]
    if r.highlights:
        lines += ["## What moved", ""] + [f"- {x}" for x in r.highlights] + [""]
    if r.reasons:
        lines += ["## Why it failed", ""] + [f"- {x}" for x in r.reasons] + [""]
    if r.checks:
        lines += [
            "| metric | parent | candidate | change | interval | allowed | result |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in r.checks:
            cells = (c.metric, c.parent, c.candidate, c.delta, c.interval, c.limit)
            lines.append("| " + " | ".join(_md_cell(v) for v in cells) + f" | {check_result(c)} |")
        lines.append("")
    for t in r.tables:
        lines += [f"### {t.title}", "", "| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
        lines += [
            "| "
            + " | ".join(("**" + _md_cell(v) + "**") if i in t.highlight else _md_cell(v) for v in row)
            + " |"
            for i, row in enumerate(t.rows)
        ]
        lines += [f"\n{t.note}"] if t.note else []
        lines.append("")
    lines += [f"![{Path(name).stem}]({name})" for name in r.images]
    if r.images:
        lines.append("")
    if r.worst_examples:
        cols = list(r.worst_examples[0].keys())
        lines += ["## Worst examples", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_md_cell(w.get(c)) for c in cols) + " |" for w in r.worst_examples]
        lines.append("")
    lines += ["Policy: `" + json.dumps(r.policy, default=str) + "`", ""]
    lines += [
        "## Sign-off",
        "",
        "Reviewer: ____  Decision: ☐ approve ☐ reject  Date: ____  Signature: ____",
        "",
    ]
    return "\n".join(lines)


def gate_images(r: GateResult, out_dir: Path) -> list[Path]:
    """The record's images that lie inside its own folder; a name that leads out of it (`../../../etc/hostname`)
    is never read, so no record can embed another file into its report (issue 34 B8)."""
    root = Path(out_dir).resolve()
    inside = [Path(out_dir) / name for name in r.images]
    return [p for p in inside if p.resolve().parent == root or root in p.resolve().parents]


def write_gate_reports(
    r: GateResult | dict[str, Any], out_dir: Path, images: list[Path] | None = None
) -> None:
    """gate.md and gate.html beside gate.json (the caller writes gate.json). Images default to r.images."""
    r = as_result(r)
    out_dir = Path(out_dir)
    if images is None:
        images = gate_images(r, out_dir)
    atomic_write_text(out_dir / "gate.md", gate_markdown(r))
    atomic_write_text(out_dir / "gate.html", gate_html(r, images))


def lineage_of(ref: str) -> dict[str, Any]:
    """What a reviewer needs to trace a model: stage, key, base model, data inputs and parents (or the alias)."""
    p = Path(str(ref))
    if not (p / "manifest.json").exists():
        return {"model": str(ref)}
    m = json.loads((p / "manifest.json").read_text())
    return {
        "stage": m.get("stage"),
        "key": (m.get("key") or "")[:16],
        "base_model": (m.get("model") or {}).get("name"),
        "inputs": [
            {"path": i.get("path"), "sha256": (i.get("sha256") or "")[:16]} for i in m.get("inputs", [])
        ],
        "parents": [{"stage": x.get("stage"), "path": x.get("path")} for x in m.get("parents", [])],
    }


# ==========================================================================================================
# The run report (align run, align report)
# ==========================================================================================================
def deciding_figure(r: GateResult) -> str:
    """The check a verdict rests on, in one line: the first that failed (else the first), its value against the
    parent's, the interval of the change where there is one, and the limit."""
    if not r.checks:
        return ""
    c = next((c for c in r.checks if not c.passed), r.checks[0])
    text = f"{c.metric}: {fmt(c.candidate)}" + (f" (parent {fmt(c.parent)})" if c.parent is not None else "")
    if c.interval:
        text += f", change in [{fmt(c.interval[0])}, {fmt(c.interval[1])}]"
    return text + (f"; allowed {c.limit}" if c.limit and c.limit != "—" else "")


# What a stage's curve shows (metrics.jsonl fields), the first pair a stage logs: training, then held out.
CURVES = (("loss", "eval_loss"), ("reward_mean", "kl"))


def curves_of(folder: Path) -> list[dict[str, Any]]:
    """The training curves of a stage folder as inline SVG polylines ({name, svg, first, last}), from its
    metrics.jsonl; none without one. Drawn here rather than as images: the page stays one file, and text."""
    path = Path(folder) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    out = []
    for names in CURVES:
        if not any(names[0] in r for r in rows):
            continue
        for name in names:
            pts = [(float(r.get("step", i)), float(r[name])) for i, r in enumerate(rows, start=1)
                   if isinstance(r.get(name), int | float) and r[name] == r[name]]  # fmt: skip
            if len(pts) >= 2:
                out.append({"name": name.replace("_", " "), "svg": _polyline(pts), "first": fmt(pts[0][1]),
                            "last": fmt(pts[-1][1]), "steps": len(pts)})  # fmt: skip
        break
    return out


def _polyline(pts: list[tuple[float, float]], w: int = 220, h: int = 48) -> str:
    """`points` attribute of an SVG polyline of (x, y) scaled into w x h (y up)."""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = (w - 4) / ((x1 - x0) or 1)
    sy = (h - 4) / ((y1 - y0) or 1)
    return " ".join(f"{2 + (x - x0) * sx:.1f},{h - 2 - (y - y0) * sy:.1f}" for x, y in pts)


def readable(metrics: dict[str, Any], n: int = 6) -> list[str]:
    """A stage's first `n` numeric figures as `name value` (spaces for underscores, 4 significant digits)."""
    nums = [(k, v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    return [f"{k.replace('_', ' ')} {fmt(float(v)) if isinstance(v, float) else v}" for k, v in nums[:n]]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h {m % 60:02d}m" if m >= 60 else f"{m}m {s:02d}s" if m else f"{s}s"


def write_run_report(
    run: Path,
    stages: list[tuple[str, dict[str, Any], list[dict[str, Any]]]],
    signoffs: list[dict[str, Any]] | None = None,
    seconds: dict[str, float] | None = None,
) -> Path:
    """report.html + report.md of a run directory.

    stages: (name, manifest as a dict, gate summaries {stage, gate, verdict, passed, override, reasons, report,
    figure}) in pipeline order; `seconds`: each stage's duration (pipeline.json). Each stage shows what it started
    from (its parent stage, else its model), its duration, its figures by name, its training curves, and each gate's
    verdict with the figure it rests on. Links to gate reports are relative to the run directory, so the folder can
    be moved."""
    run = Path(run)
    all_gates = [g for _, _, gs in stages for g in gs]
    failed = [g for g in all_gates if not g["passed"]]
    css_class = "fail" if failed else ("pass" if all_gates else "fail")
    label = "FAIL" if failed else ("PASS" if all_gates else "NO GATES RUN")
    if not failed and any(g.get("override") for g in all_gates):
        css_class, label = "overridden", "PASS WITH OVERRIDES"

    def tag(g: dict[str, Any]) -> str:
        return ("overridden" if g.get("override") else g["verdict"]).upper()

    rows = []
    for name, m, gates in stages:
        model_parents = [p for p in m.get("parents", []) if p.get("stage") not in ("data", "preferences")]
        start = (f"{model_parents[0]['stage']} ({model_parents[0]['key'][:12]})" if model_parents
                 else (m.get("model") or {}).get("name", "—"))  # fmt: skip
        rows.append(
            {
                "name": name,
                "status": m["status"],
                "key": m["key"][:12],
                "model": start,
                "took": _duration((seconds or {}).get(name)),
                "metrics": readable(m.get("metrics") or {}),
                "curves": curves_of(run / name),
                "gates": [
                    {
                        "gate": g["gate"],
                        "tag": tag(g),
                        "figure": g.get("figure", ""),
                        "href": os.path.relpath(Path(g["report"]).resolve(), run.resolve()),
                    }
                    for g in gates
                ],
                "parents": ", ".join(f"{p['stage']} ({p['key'][:12]})" for p in m.get("parents", [])),
                "inputs": ", ".join(
                    f"{Path(i['path']).name} ({i['sha256'][:12]})" for i in m.get("inputs", [])
                ),
            }
        )
    html = (
        _env()
        .get_template("run.html.j2")
        .render(
            label=label,
            css_class=css_class,
            css=CSS,
            run=str(run),
            when=now(),
            failed=failed,
            stages=rows,
            signoffs=signoffs or [],
        )
    )
    md = [f"# Run {run}: **{label}**", ""]
    md += [f"- **{g['stage']} {g['gate']} failed**: " + "; ".join(g["reasons"]) for g in failed]
    md += [""] if failed else []
    md += [
        "| stage | status | took | started from | key | figures | gates |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in rows:
        md.append(
            f"| {s['name']} | {s['status']} | {s['took']} | {_md_cell(s['model'])} | `{s['key']}` | "
            + _md_cell(", ".join(s["metrics"])) + " | "
            + "; ".join(f"[{g['gate']}: {g['tag']}]({g['href']})" + (f" {_md_cell(g['figure'])}" if g["figure"] else "")
                        for g in s["gates"])
            + " |"
        )  # fmt: skip
    if signoffs:
        md += [
            "",
            "## Sign-offs",
            "",
            "| reviewer | decision | at | note | signature | evidence since |",
            "|---|---|---|---|---|---|",
        ]
        md += [f"| {_md_cell(x['reviewer'])} | {_md_cell(x['decision'])} | {_md_cell(x['at'])} | {_md_cell(x['note'])} "
               f"| {_md_cell(x['signature'])} | {'' if x['intact'] else '**CHANGED**: '}{_md_cell(x['state'])} |"
               for x in signoffs]  # fmt: skip
    md += ["", "Reviewer sign-off: ____  Decision: ☐ approve ☐ reject  Date: ____", ""]
    atomic_write_text(run / "report.html", html)
    atomic_write_text(run / "report.md", "\n".join(md))
    return run / "report.html"
