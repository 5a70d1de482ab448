"""The model card is rendered from the manifest alone, and user text in it stays text."""

from __future__ import annotations

import yaml

from core.model_card import render_model_card
from data_schemas.manifest import InputFile, Manifest, ModelIdentity, ParentRef


def _manifest(**kw) -> Manifest:
    return Manifest(
        stage="dpo",
        status="complete",
        key="k" * 16,
        started_at="2026-11-23T00:00:00Z",
        finished_at="2026-11-23T01:00:00Z",
        inputs=[InputFile(path="data/a|b`<script>.jsonl", role="pairs", sha256="ab" * 32)],
        parents=[ParentRef(path="runs/sft", stage="sft", key="p" * 16)],
        model=ModelIdentity(
            name="smollm2-135m-instruct",
            path="/x",
            weights_sha256="c" * 64,
            precision="fp32",
            device="cpu",
            adapter="adapter",
        ),  # fmt: skip
        metrics={"loss": 0.5, "history": [1, 2]},
        gates=[
            {
                "gate": "perplexity",
                "verdict": "fail",
                "reasons": ["ppl | up\nby 3%"],
                "report": "gates/perplexity/gate.md",
            }
        ],
        **kw,
    )


def test_card_metadata_and_sections():
    card = render_model_card(_manifest(), {"train": {"beta": 0.1}})
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation" and {"dpo", "lora", "align"} <= set(meta["tags"])
    assert (
        meta["align"]["inputs"][0]["sha256"] == "ab" * 32 and meta["align"]["parents"][0]["key"] == "p" * 16
    )
    assert [(g["gate"], g["verdict"], g["report"], g["by"]) for g in meta["align"]["gates"]] == [
        ("perplexity", "fail", "gates/perplexity/gate.md", "dpo")
    ]
    assert (
        "| `perplexity` | `dpo` | **FAIL** | [gates/perplexity/gate.md](gates/perplexity/gate.md) |" in card
    )
    assert meta["base_model_relation"] == "adapter" and meta["library_name"] == "peft"
    assert meta["model-index"][0]["results"][0]["metrics"][0] == {
        "type": "loss", "value": 0.5, "name": "loss", "verified": False
    }  # fmt: skip
    assert (
        "beta: 0.1" in card and "| `loss` | `0.5` |" in card and "history" not in card.split("## Metrics")[1]
    )


def test_user_text_cannot_break_the_tables_or_inject_markup():
    card = render_model_card(_manifest(), {})
    row = next(line for line in card.splitlines() if "ab" * 32 in line and line.startswith("|"))
    assert row.count("|") == 5  # four columns: the file name's pipe did not add a column
    assert "`data/a/b'<script>.jsonl`" in row  # inside a code span: shown, never rendered
    assert "- `ppl / up by 3%`" in card  # a reason's newline and pipe neutralised
