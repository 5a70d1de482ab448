"""Model cards: a README.md in every model artifact, written from its manifest when the stage completes, rewritten
when `align run` lands later gates on it, and written into every exported folder (lib/export.py).

Hugging Face's model-card format (https://huggingface.co/docs/hub/model-cards), built through
`huggingface_hub.ModelCardData`: base_model and base_model_relation (the model these weights apply to, and how),
library_name, license, tags, pipeline_tag, and a `model-index` of the gate checks and final metrics. align's
metadata block adds what the hub's fields cannot hold: the lineage to the root (every ancestor's stage, key and input
files with their sha256), every gate with its verdict, intervals, report and override, so that a reviewer (or a
script) can check the card against the files.

The model a card names as its base is the one its weights apply to. An adapter trained on a parent with the SFT
adapter merged in (DPO, PPO, a reward model from SFT) names that parent, not the root base, and says in its first
lines that loading it on the root base alone gives another model, and which command exports it whole.

Everything in the card comes from the manifest and config.yaml; nothing is typed by hand, so the card cannot drift
from the artifact. User text (file names, gate reasons) is written inside code spans or escaped table cells, never
as markdown or HTML of its own.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from huggingface_hub import EvalResult, ModelCardData

from core.config import UserError
from core.manifest import atomic_write_text, read_gate, read_manifest
from data_schemas.manifest import Manifest, ParentRef

# What align knows of its aliases' provenance (core/models.py); other models: the name as configured.
KNOWN_BASES = {
    "smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    "tiny-random-llama": ("tiny-random-llama (random weights, for tests)", "apache-2.0"),
}


@dataclass(frozen=True)
class CardInfo:
    """What a stage's model card says of every model it makes: a field of the stage's row (stages/registry.py)."""

    tags: tuple[str, ...] = ()
    intended_use: str = "see the stage documentation"
    pipeline_tag: str = "text-generation"


GENERIC = CardInfo()


def _cell(x: Any) -> str:
    """A table cell: no pipes, no newlines, no markup of the value's own."""
    s = f"{x:.4g}" if isinstance(x, float) else str(x)
    return "`" + s.replace("`", "'").replace("|", "/").replace("\n", " ") + "`"


def _relpath(path: str, start: Path | None) -> str:
    """A path as the card shows it: relative to the card's folder where both are local (cards move with runs)."""
    if start is None:
        return path
    try:
        return os.path.relpath(Path(path).resolve(), Path(start).resolve())
    except ValueError:
        return path


def _find(path: str, near: Path | None) -> Path | None:
    for c in (Path(path), *([near / path] if near is not None else [])):
        if (c / "manifest.json").exists():
            return c
    return None


def lineage(m: Manifest, artifact_dir: Path | None) -> list[dict[str, Any]]:
    """Every ancestor from the root to this artifact: stage, path, key and input files (parents read from their
    manifests, depth first; one missing on this machine is listed with what this manifest knows of it)."""
    seen: dict[str, dict[str, Any]] = {}

    def visit(p: ParentRef, near: Path | None, depth: int) -> None:
        if p.key in seen or depth > 32:
            return
        folder = _find(p.path, near)
        try:
            pm = read_manifest(folder) if folder is not None else None
        except UserError:  # unreadable: listed with what the child's manifest knows
            pm = None
        if pm is not None:
            for q in pm.parents:
                visit(q, folder, depth + 1)
        seen[p.key] = {
            "stage": p.stage,
            "path": _relpath(str(folder or p.path), artifact_dir),
            "key": p.key,
            "inputs": [i.model_dump() for i in pm.inputs] if pm is not None else [],
            "found": pm is not None,
        }

    for p in m.parents:
        visit(p, artifact_dir, 0)
    here = {
        "stage": m.stage,
        "path": ".",
        "key": m.key,
        "inputs": [i.model_dump() for i in m.inputs],
        "found": True,
    }
    return [*seen.values(), here]


def gate_records(
    m: Manifest, artifact_dir: Path | None, run_gates: tuple[tuple[dict[str, Any], Path], ...] = ()
) -> list[dict[str, Any]]:
    """Each gate on this model: the stage's own (its gates/ folder) and `align run`'s (`run_gates`: the pipeline's
    summary and the gate folder), with the checks and intervals of its gate.json where it can be read."""
    out = []
    own = [(g, (artifact_dir / Path(g.get("report") or f"gates/{g.get('gate')}/gate.md").parent)
            if artifact_dir is not None else None) for g in m.gates]  # fmt: skip
    for summary, folder in (*own, *run_gates):
        r = read_gate(folder, summary.get("record_sha256")) if folder is not None else None
        record = {
            "gate": summary.get("gate"),
            "verdict": r.verdict if r is not None else summary.get("verdict"),
            "report": _relpath(str(summary.get("report")), artifact_dir)
            if run_gates and (summary, folder) in run_gates
            else summary.get("report"),
            "by": "align run" if (summary, folder) in run_gates else m.stage,
            "checks": [
                {
                    "metric": c.metric,
                    "candidate": c.candidate,
                    "parent": c.parent,
                    "interval": c.interval,
                    "limit": c.limit,
                    "passed": c.passed,
                }
                for c in (r.checks if r is not None else [])
            ],  # fmt: skip
            "reasons": list(r.reasons if r is not None else summary.get("reasons") or []),
        }
        override = r.override if r is not None and r.override_holds else None
        if override is not None:
            record["override"] = {"reviewer": override.reviewer, "reason": override.reason}
        out.append(record)
    return out


def applies_to(out_dir: Path | None, config: dict[str, Any]) -> list[str]:
    """The adapters merged into the base before this artifact's adapter applies (stack.json; a reward model's SFT
    parent), relative to the artifact; [] when its adapter applies to the base itself."""
    if out_dir is None:
        return []
    stack = Path(out_dir) / "stack.json"
    if stack.exists():
        return list(json.loads(stack.read_text()).get("merge", []))
    init = Path(str(config.get("init_from") or ""))
    if config.get("init_from") and (Path(out_dir) / "adapter").is_dir() and (init / "adapter").is_dir():
        return [_relpath(str(init / "adapter"), out_dir)]
    return []


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


_BOOKKEEPING = {"global_step", "max_steps", "epoch", "iterations", "seconds"}  # counters, not measurements


def eval_results(m: Manifest, gates: list[dict[str, Any]], task: str) -> list:
    """The model-index: every numeric gate check (its gate as the dataset) and every final scalar metric."""
    res = []
    for g in gates:
        for c in g["checks"]:
            if _number(c["candidate"]):
                res.append(EvalResult(task_type=task, dataset_type=f"align-gate-{g['gate']}",
                                      dataset_name=f"{g['gate']} gate", metric_type=_slug(c["metric"]),
                                      metric_name=c["metric"], metric_value=c["candidate"],
                                      verified=False))  # fmt: skip
    for k, v in m.metrics.items():
        if _number(v) and not (k.startswith("train_") or k in _BOOKKEEPING):
            res.append(EvalResult(task_type=task, dataset_type="align-heldout", dataset_name="held-out split",
                                  metric_type=_slug(k), metric_name=k, metric_value=v, verified=False))  # fmt: skip
    return res


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in str(s).lower()).strip("_")[:64] or "metric"


def base_of(m: Manifest, config: dict[str, Any]) -> tuple[str, str]:
    name = m.model.name if m.model else str(config.get("model", {}).get("name_or_path", "unknown"))
    return KNOWN_BASES.get(name, (name, "other"))


def card_data(
    m: Manifest,
    config: dict[str, Any],
    card: CardInfo = GENERIC,
    *,
    out_dir: Path | None = None,
    run_gates: tuple[tuple[dict[str, Any], Path], ...] = (),
    base_model: str | None = None,
    relation: str | None = None,
    adapter: bool | None = None,
):
    """The card's metadata as `huggingface_hub.ModelCardData` (the hub's fields, a model-index, align's block)."""
    root, license_ = base_of(m, config)
    adapter = bool(m.model and m.model.adapter) if adapter is None else adapter
    stack = applies_to(out_dir, config)
    if base_model is None:  # the artifact's own card: the model its adapter applies to
        parent = next((p for p in m.parents if p.stage == "sft"), None)
        base_model = _relpath(parent.path, out_dir) if stack and parent is not None else root
        relation = relation or ("adapter" if adapter else "finetune")
    gates = gate_records(m, out_dir, run_gates)
    chain = lineage(m, out_dir)
    return ModelCardData(
        base_model=base_model,
        base_model_relation=relation,
        library_name="peft" if adapter else "transformers",
        license=license_,
        pipeline_tag=card.pipeline_tag,
        tags=["align", *(card.tags or (m.stage,)), *(["lora"] if adapter else [])],
        model_name=f"{m.stage} model (align, key {m.key})",
        eval_results=eval_results(m, gates, card.pipeline_tag) or None,
        align={
            "stage": m.stage,
            "key": m.key,
            "status": m.status,
            "root_base_model": root,
            "applies_to": {"base": root, "merged_first": stack} if stack else {"base": root},
            "inputs": [{"path": i.path, "role": i.role, "sha256": i.sha256} for i in m.inputs],
            "parents": [{"path": p.path, "stage": p.stage, "key": p.key} for p in m.parents],
            "lineage": [{k: v for k, v in a.items() if k != "found"} for a in chain],
            "gates": gates,
            "overrides": m.overrides,
        },
    )


def render_model_card(
    m: Manifest,
    config: dict[str, Any],
    card: CardInfo = GENERIC,
    *,
    out_dir: Path | None = None,
    run_gates: tuple[tuple[dict[str, Any], Path], ...] = (),
    export: dict[str, str] | None = None,
) -> str:
    """The README.md text. `export`: {"kind", "base", "artifact"} for a folder written by `align export`."""
    if export is None:
        data = card_data(m, config, card, out_dir=out_dir, run_gates=run_gates)
    else:
        adapter = export["kind"] == "peft-adapter"
        base = export["base"] if adapter else base_of(m, config)[0]  # whole weights: a fine-tune of the root
        data = card_data(m, config, card, out_dir=Path(export["artifact"]), run_gates=run_gates,
                         base_model=base, relation="adapter" if adapter else "finetune", adapter=adapter)  # fmt: skip
    meta = data.to_dict()
    al = meta["align"]
    stack = al["applies_to"].get("merged_first") or []
    out = ["---", data.to_yaml().rstrip(), "---", ""]
    out += [f"# {m.stage} model (align)", ""]
    if export is not None:
        out += _export_usage(export, card)
    elif stack:
        out += [
            f"> **This adapter applies to `{meta['base_model']}`: the base model `{al['root_base_model']}` with "
            + ", ".join(f"`{_plain(s)}`" for s in stack)
            + " merged into its weights first (stack.json).** Loaded on the base model alone (e.g. with "
            "`AutoPeftModelForCausalLM`) it is another model, without an error. To take it out of align, run "
            f"`align export {_plain(str(out_dir or '.'))} --to DIR` (a whole model) or add `--adapter` (one LoRA "
            "on the base model).",
            "",
        ]
    out += [
        f"Built by `align {m.stage}` from `{al['root_base_model']}`, finished {m.finished_at or '?'}; artifact key "
        f"`{m.key}`. Everything below is read from `manifest.json`, `config.yaml` and the gate records"
        + (" of the exported artifact." if export else " beside this file."),
        "",
        "## Lineage",
        "",
    ]
    if m.model:
        out += [f"- base model: `{al['root_base_model']}` (weights sha256 `{m.model.weights_sha256[:16]}…`, "
                f"{m.model.precision} on {m.model.device})"]  # fmt: skip
    out += [f"- {_cell(a['stage'])}: {_cell(a['path'])}, key {_cell(a['key'])}" for a in al["lineage"]]
    out += ["", "## Training data", "", "| stage | role | file | sha256 |", "|---|---|---|---|"]
    out += [f"| {_cell(a['stage'])} | {_cell(i['role'])} | {_cell(i['path'])} | {_cell(i['sha256'])} |"
            for a in al["lineage"] for i in a["inputs"]]  # fmt: skip
    if m.counts:
        out += [
            "",
            "Rows: " + ", ".join(f"{k} {_cell(v)}" for k, v in m.counts.items() if not isinstance(v, dict)),
        ]
    out += ["", "## Gates", ""]
    if al["gates"]:
        out += ["| gate | run by | verdict | report |", "|---|---|---|---|"]
        out += [f"| {_cell(g['gate'])} | {_cell(g['by'])} | **{str(g['verdict']).upper()}** | "
                f"[{_plain(g['report'])}]({_link(g['report'])}) |" for g in al["gates"]]  # fmt: skip
        for g in al["gates"]:
            if g["checks"]:
                out += ["", f"{_cell(g['gate'])} checks:", "", "| check | candidate | parent | interval | limit | passed |",
                        "|---|---|---|---|---|---|"]  # fmt: skip
                out += [f"| {_cell(c['metric'])} | {_cell(c['candidate'])} | {_cell(c['parent'])} | "
                        f"{_cell(c['interval'])} | {_cell(c['limit'])} | {'yes' if c['passed'] else '**no**'} |"
                        for c in g["checks"]]  # fmt: skip
            if g.get("override"):
                o = g["override"]
                out += [
                    "",
                    f"- {_cell(g['gate'])} overridden by {_cell(o['reviewer'])}: {_cell(o['reason'])}",
                ]
        reasons = [r for g in al["gates"] for r in g["reasons"]]
        out += [""] + [f"- {_cell(r)}" for r in reasons]
    else:
        out += ["No gate has run on this model yet (`align run` records the gates it runs here)."]
    if m.overrides:
        out += ["", "### Reviewer overrides", ""]
        out += [f"- {_cell(o)}" for o in m.overrides]
    scalars = {k: v for k, v in m.metrics.items() if isinstance(v, (int, float, str, bool)) and v is not None}
    out += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
    out += [f"| {_cell(k)} | {_cell(v)} |" for k, v in scalars.items()]
    out += ["", "## Training configuration", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip()]
    out += ["```", "", "## Environment", ""]
    out += [f"- {k}: {_cell(v)}" for k, v in m.env.items() if not isinstance(v, dict)]
    out += [
        "",
        "## Intended use and limitations",
        "",
        f"- Intended use: {card.intended_use}",
        "- Trained on the files above only; it inherits the base model's limitations and license, and the biases of "
        "its data and annotators. The gates measure what their suites cover (docs/gates.md), not every harm: read "
        "the gate reports and samples before deploying.",
        "",
    ]
    return "\n".join(out)


def _plain(s: Any) -> str:
    """Text inside a code span or link label: no backticks, brackets, pipes or newlines of its own."""
    return str(s).replace("`", "'").replace("|", "/").replace("\n", " ").replace("[", "(").replace("]", ")")


def _link(s: Any) -> str:
    return quote(str(s), safe="/._-")


def _export_usage(export: dict[str, str], card: CardInfo) -> list[str]:
    kind, base = export["kind"], _plain(export["base"])
    if kind == "peft-adapter":
        code = [
            "from peft import AutoPeftModelForCausalLM",
            "model = AutoPeftModelForCausalLM.from_pretrained(PATH)",
        ]
        what = f"One PEFT LoRA on `{base}` (the whole align stack composed into it, exactly)."
        if card.pipeline_tag == "text-classification":
            code = ["from peft import AutoPeftModelForSequenceClassification",
                    "model = AutoPeftModelForSequenceClassification.from_pretrained(PATH, num_labels=1)"]  # fmt: skip
    elif kind == "sequence-classification":
        code = ["from transformers import AutoModelForSequenceClassification",
                "model = AutoModelForSequenceClassification.from_pretrained(PATH)  # one label: the reward"]  # fmt: skip
        what = ("A whole reward model: every adapter folded in; the score of a conversation (chat template applied) "
                "is the logit at its last token.")  # fmt: skip
    else:
        code = [
            "from transformers import AutoModelForCausalLM",
            "model = AutoModelForCausalLM.from_pretrained(PATH)",
        ]
        what = "A whole causal LM: every adapter folded in (vLLM: `vllm serve PATH`)."
    return [f"Exported by `align export` from `{_plain(export['artifact'])}`. {what} It was loaded back and checked "
            "to compute align's outputs before it was written.", "", "```python", *code, "```", ""]  # fmt: skip


def write_model_card(
    out_dir: Path,
    m: Manifest,
    card: CardInfo = GENERIC,
    run_gates: tuple[tuple[dict[str, Any], Path], ...] = (),
) -> None:
    """README.md in the artifact (and over PEFT's blank template in adapter/, where there is one). `run_gates`:
    the gates `align run` ran on it, as (summary, gate folder)."""
    text = render_model_card(m, _config(out_dir), card, out_dir=Path(out_dir), run_gates=run_gates)
    atomic_write_text(out_dir / "README.md", text)
    if (out_dir / "adapter").is_dir():
        atomic_write_text(out_dir / "adapter" / "README.md", text)


def write_export_card(
    folder: Path, artifact_dir: Path, m: Manifest, kind: str, base: str, card: CardInfo = GENERIC
) -> None:
    """README.md of a folder written by `align export`: the artifact's card, naming the base the export applies to
    (relation finetune for whole weights, adapter for a PEFT adapter) and how to load it."""
    export = {"kind": kind, "base": base, "artifact": str(artifact_dir)}
    text = render_model_card(
        m, _config(artifact_dir), card, export=export, run_gates=_run_gates_of(artifact_dir)
    )
    atomic_write_text(Path(folder) / "README.md", text)


def _run_gates_of(artifact_dir: Path) -> tuple[tuple[dict[str, Any], Path], ...]:
    """The `align run` gates the artifact's own card lists (their gate folders), for the card of its export."""
    try:
        meta = yaml.safe_load(
            (Path(artifact_dir) / "README.md").read_text(encoding="utf-8").split("---\n")[1]
        )
        gates = meta["align"]["gates"]
    except (OSError, IndexError, KeyError, TypeError, yaml.YAMLError):
        return ()
    return tuple(
        ({**g, "report": str(Path(artifact_dir) / g["report"])}, (Path(artifact_dir) / g["report"]).parent)
        for g in gates
        if isinstance(g, dict) and g.get("by") == "align run" and g.get("report")
    )


def _config(folder: Path) -> dict[str, Any]:
    p = Path(folder) / "config.yaml"
    return (yaml.safe_load(p.read_text(encoding="utf-8")) if p.exists() else None) or {}
