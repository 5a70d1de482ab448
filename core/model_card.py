"""Model cards: a README.md in every model artifact, written from its manifest when the stage completes.

Hugging Face's model-card format (https://huggingface.co/docs/hub/model-cards): YAML metadata between `---` lines
(base_model, library_name, license, tags, datasets, pipeline_tag), then markdown. align's metadata block adds what
the hub's fields cannot hold: every input file with its sha256, the parents' keys and every gate's verdict, so that a
reviewer (or a script) can check the card against the files.

Everything in the card comes from the manifest and config.yaml; nothing is typed by hand, so the card cannot drift
from the artifact. User text (file names, gate reasons) is written inside code spans or escaped table cells, never
as markdown or HTML of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.manifest import atomic_write_text
from data_schemas.manifest import Manifest

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


def card_metadata(m: Manifest, config: dict[str, Any], card: CardInfo = GENERIC) -> dict[str, Any]:
    name = m.model.name if m.model else str(config.get("model", {}).get("name_or_path", "unknown"))
    base, license_ = KNOWN_BASES.get(name, (name, "other"))
    adapter = bool(m.model and m.model.adapter)
    return {
        "base_model": base,
        "library_name": "peft" if adapter else "transformers",
        "license": license_,
        "pipeline_tag": card.pipeline_tag,
        "tags": ["align", *(card.tags or (m.stage,)), *(["lora"] if adapter else [])],
        "datasets": [Path(i.path).name for i in m.inputs],
        "align": {
            "stage": m.stage,
            "key": m.key,
            "status": m.status,
            "inputs": [{"path": i.path, "role": i.role, "sha256": i.sha256} for i in m.inputs],
            "parents": [{"path": p.path, "stage": p.stage, "key": p.key} for p in m.parents],
            "gates": [
                {"gate": g.get("gate"), "verdict": g.get("verdict"), "report": g.get("report")}
                for g in m.gates
            ],
            "overrides": m.overrides,
        },
    }


def render_model_card(m: Manifest, config: dict[str, Any], card: CardInfo = GENERIC) -> str:
    meta = card_metadata(m, config, card)
    out = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    out += [f"# {m.stage} model (align)", ""]
    out += [
        f"Built by `align {m.stage}` from `{meta['base_model']}`, finished {m.finished_at or '?'}; artifact key "
        f"`{m.key}`. Everything below is read from `manifest.json` and `config.yaml` beside this file.",
        "",
        "## Lineage",
    ]
    out += [f"- base model: `{meta['base_model']}`" + (f" (weights sha256 `{m.model.weights_sha256[:16]}…`, "
            f"{m.model.precision} on {m.model.device})" if m.model else "")]  # fmt: skip
    out += [f"- parent ({p.stage}): `{p.path}`, key `{p.key}`" for p in m.parents] or ["- parents: none"]
    out += ["", "## Training data", "", "| role | file | sha256 |", "|---|---|---|"]
    out += [f"| {_cell(i.role)} | {_cell(i.path)} | {_cell(i.sha256)} |" for i in m.inputs]
    if m.counts:
        out += [
            "",
            "Rows: " + ", ".join(f"{k} {_cell(v)}" for k, v in m.counts.items() if not isinstance(v, dict)),
        ]
    out += ["", "## Gates", ""]
    if m.gates:
        out += ["| gate | verdict | report |", "|---|---|---|"]
        out += [
            f"| {_cell(g.get('gate'))} | **{str(g.get('verdict')).upper()}** | [{g.get('report')}]({g.get('report')}) |"
            for g in m.gates
        ]
        reasons = [r for g in m.gates for r in g.get("reasons") or []]
        out += [""] + [f"- {_cell(r)}" for r in reasons]
    else:
        out += ["No gate is built into this stage; `align run` records its gates in the run's report."]
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


def write_model_card(out_dir: Path, m: Manifest, card: CardInfo = GENERIC) -> None:
    """README.md in the artifact (and over PEFT's blank template in adapter/, where there is one)."""
    cfg_path = out_dir / "config.yaml"
    config = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    text = render_model_card(m, config or {}, card)
    atomic_write_text(out_dir / "README.md", text)
    if (out_dir / "adapter").is_dir():
        atomic_write_text(out_dir / "adapter" / "README.md", text)
