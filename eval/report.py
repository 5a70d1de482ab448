"""Reports for safety reviewers: one self-contained HTML page (and Markdown) per gate, and one per run.

Every gate result (gate.json) has the same shape, so one renderer serves all gates:
    gate, verdict, reasons, candidate, parent, policy, checks: [{metric, parent, candidate, delta, interval,
    limit, passed}], worst_examples: [...], override: {reviewer, reason, at} | absent, lineage: {...}
The page reads top down: the verdict, why, the checks against their thresholds and the parent, the plots, the worst
examples, the lineage of data and models, and an empty sign-off block. Images are embedded (base64), so the file
can be mailed or attached to a review ticket as it is.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from align.manifest import atomic_write_text

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1000px;margin:24px auto;padding:0 16px;
color:#1d1d1f;line-height:1.45}
.verdict{padding:18px 22px;border-radius:8px;color:#fff;font-size:28px;font-weight:700;margin-bottom:6px}
.verdict.pass{background:#1b7f3b}.verdict.fail{background:#b3261e}.verdict.overridden{background:#b26a00}
.sub{color:#555;margin:0 0 18px}
table{border-collapse:collapse;width:100%;margin:8px 0 18px;font-size:14px}
th,td{border:1px solid #ddd;padding:6px 8px;text-align:left;vertical-align:top}th{background:#f4f4f6}
td.ok{color:#1b7f3b;font-weight:600}td.bad{color:#b3261e;font-weight:600}
img{max-width:100%;border:1px solid #eee;margin:6px 0}
.signoff{border:2px dashed #888;padding:14px 18px;border-radius:8px;margin-top:24px}
.signoff div{margin:12px 0}.line{display:inline-block;min-width:320px;border-bottom:1px solid #333}
code{background:#f4f4f6;padding:1px 4px;border-radius:3px}
"""


def _fmt(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, list | tuple) and len(x) == 2 and all(isinstance(v, int | float) for v in x):
        return f"[{_fmt(float(x[0]))}, {_fmt(float(x[1]))}]"
    return html.escape(str(x))


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}">'


def verdict_label(r: dict[str, Any]) -> tuple[str, str]:
    """(css class, text) of the banner: an override is shown as such, never as a plain pass."""
    if r.get("override"):
        return "overridden", f"FAIL, OVERRIDDEN by {r['override']['reviewer']}"
    return r["verdict"], r["verdict"].upper()


def gate_html(r: dict[str, Any], images: list[Path] | None = None) -> str:
    cls, label = verdict_label(r)
    title = f"{r['gate']} gate"
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}: {label}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<div id='verdict' class='verdict {cls}'>{html.escape(title.capitalize())}: {html.escape(label)}</div>",
        f"<p class='sub'>candidate <code>{html.escape(str(r.get('candidate')))}</code> vs parent "
        f"<code>{html.escape(str(r.get('parent')))}</code> · {html.escape(str(r.get('finished_at', '')))}</p>",
    ]
    if r.get("override"):
        o = r["override"]
        parts.append(
            f"<h2>Override</h2><p>The gate failed and <b>{html.escape(o['reviewer'])}</b> overrode it on "
            f"{html.escape(o['at'])}: “{html.escape(o['reason'])}”</p>"
        )
    if r.get("reasons"):
        parts.append(
            "<h2>Why it failed</h2><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in r["reasons"])
        )
        parts.append("</ul>")
    checks = r.get("checks") or []
    if checks:
        parts.append(
            "<h2>Checks</h2><table><tr><th>metric</th><th>parent</th><th>candidate</th><th>change</th>"
            "<th>interval of change</th><th>allowed</th><th>result</th></tr>"
        )
        for c in checks:
            ok = c.get("passed")
            parts.append(
                f"<tr><td>{html.escape(c['metric'])}</td><td>{_fmt(c.get('parent'))}</td>"
                f"<td>{_fmt(c.get('candidate'))}</td><td>{_fmt(c.get('delta'))}</td><td>{_fmt(c.get('interval'))}</td>"
                f"<td>{html.escape(str(c.get('limit', '—')))}</td>"
                f"<td class='{'ok' if ok else 'bad'}'>{'pass' if ok else 'FAIL'}</td></tr>"
            )
        parts.append("</table>")
    for sec in r.get("tables") or []:
        parts.append(f"<h3>{html.escape(sec['title'])}</h3><table><tr>")
        parts.append("".join(f"<th>{html.escape(h)}</th>" for h in sec["columns"]) + "</tr>")
        for row in sec["rows"]:
            parts.append("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>")
        parts.append("</table>")
    if images:
        parts.append("<h2>Plots</h2>" + "".join(_img(p) for p in images if Path(p).exists()))
    worst = r.get("worst_examples") or []
    if worst:
        cols = list(worst[0].keys())
        parts.append(
            "<h2>Worst examples</h2><p>Where the candidate moved furthest in the wrong direction.</p>"
        )
        parts.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>")
        for w in worst:
            parts.append("<tr>" + "".join(f"<td>{_fmt(w.get(c))}</td>" for c in cols) + "</tr>")
        parts.append("</table>")
    lineage = r.get("lineage") or {}
    if lineage:
        parts.append("<h2>Lineage</h2><table><tr><th>role</th><th>what</th></tr>")
        for k, v in lineage.items():
            parts.append(
                f"<tr><td>{html.escape(k)}</td><td><code>{html.escape(json.dumps(v))}</code></td></tr>"
            )
        parts.append("</table>")
    parts.append(
        "<h2>Policy</h2><p><code>" + html.escape(json.dumps(r.get("policy", {}), default=str)) + "</code></p>"
    )
    parts.append(_SIGNOFF + "</body></html>")
    return "".join(parts)


_SIGNOFF = """<div class='signoff'><h2>Sign-off</h2>
<div>Reviewer: <span class='line'></span></div>
<div>Decision: ☐ approve promotion &nbsp; ☐ reject &nbsp; ☐ approve with conditions</div>
<div>Conditions / notes: <span class='line'></span></div>
<div>Date: <span class='line'></span> &nbsp; Signature: <span class='line'></span></div></div>"""


def gate_markdown(r: dict[str, Any]) -> str:
    _, label = verdict_label(r)
    lines = [f"# {r['gate'].capitalize()} gate: **{label}**", ""]
    lines += [f"- candidate: `{r.get('candidate')}`", f"- parent: `{r.get('parent')}`", ""]
    if r.get("override"):
        o = r["override"]
        lines += [f"**Overridden** by {o['reviewer']} on {o['at']}: {o['reason']}", ""]
    if r.get("reasons"):
        lines += ["## Why it failed", ""] + [f"- {x}" for x in r["reasons"]] + [""]
    checks = r.get("checks") or []
    if checks:
        lines += [
            "| metric | parent | candidate | change | interval | allowed | result |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in checks:
            lines.append(
                f"| {c['metric']} | {_fmt(c.get('parent'))} | {_fmt(c.get('candidate'))} | {_fmt(c.get('delta'))} | "
                f"{_fmt(c.get('interval'))} | {c.get('limit', '—')} | {'pass' if c.get('passed') else 'FAIL'} |"
            )
        lines.append("")
    worst = r.get("worst_examples") or []
    if worst:
        cols = list(worst[0].keys())
        lines += ["## Worst examples", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(w.get(c)).replace("|", "/") for c in cols) + " |" for w in worst]
        lines.append("")
    lines += ["Policy: `" + json.dumps(r.get("policy", {}), default=str) + "`", ""]
    lines += [
        "## Sign-off",
        "",
        "Reviewer: ____  Decision: ☐ approve ☐ reject  Date: ____  Signature: ____",
        "",
    ]
    return "\n".join(lines)


def write_gate_reports(
    r: dict[str, Any], out_dir: Path, images: list[Path] | None = None, markdown: str | None = None
) -> None:
    """gate.md (the generic one unless a gate gives its own) and gate.html beside gate.json (written by the caller)."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "gate.md", markdown if markdown is not None else gate_markdown(r))
    atomic_write_text(out_dir / "gate.html", gate_html(r, images))


def lineage_of(ref: str) -> dict[str, Any] | str:
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
