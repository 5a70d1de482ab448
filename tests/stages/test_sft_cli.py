"""`align sft` through the real CLI on the tiny model: what trains, what does not, and resume."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.cli import main
from tests.conftest import EXAMPLES

BASE = [
    "model.name_or_path=tiny-random-llama",
    f"data.train_file={EXAMPLES / 'instructions_train.jsonl'}",
    f"data.validation_file={EXAMPLES / 'instructions_validation.jsonl'}",
    "lora.r=8",
    "lora.dropout=0.1",
    "train.learning_rate=5e-3",
    "train.per_device_train_batch_size=4",
    "train.lr_scheduler_type=constant",
    "train.warmup_ratio=0",
    "train.eval_steps=4",
    "train.save_steps=4",
    "train.early_stopping_patience=null",
]


def sft(out: Path, *extra: str, resume: bool = False) -> int:
    args = ["sft", "--config", "configs/sft.yaml", f"output_dir={out}", *BASE, *extra]
    return main(args + (["--resume"] if resume else []))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_path):
    out = tmp_path_factory.mktemp("sft") / "run"
    assert sft(out, "train.max_steps=16") == 0
    return out


def test_artifact_layout_and_manifest(trained):
    for name in (
        "manifest.json",
        "config.yaml",
        "metrics.json",
        "metrics.jsonl",
        "adapter/adapter_model.safetensors",
    ):
        assert (trained / name).exists(), name
    assert any((trained / "logs").iterdir()), "TensorBoard events missing"
    m = json.loads((trained / "manifest.json").read_text())
    assert m["status"] == "complete" and m["stage"] == "sft"
    assert [i["role"] for i in m["inputs"]] == ["train", "validation"]
    assert all(len(i["sha256"]) == 64 for i in m["inputs"])
    assert m["model"]["name"] == "tiny-random-llama" and m["model"]["precision"] == "fp32"
    assert m["env"]["versions"]["trl"] and m["env"]["seed"] == 42
    assert m["metrics"]["global_step"] == 16 and "eval_loss" in m["metrics"]
    assert m["counts"]["train_examples"] == 76


def test_model_card_is_written_from_the_manifest(trained):
    import yaml

    m = json.loads((trained / "manifest.json").read_text())
    card = (trained / "README.md").read_text()
    head, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    meta = yaml.safe_load(head)
    assert meta["base_model"].startswith("tiny-random-llama") and meta["library_name"] == "peft"
    assert meta["license"] and "sft" in meta["tags"] and meta["align"]["key"] == m["key"]
    assert [i["sha256"] for i in meta["align"]["inputs"]] == [i["sha256"] for i in m["inputs"]]
    assert all(i["sha256"] in body for i in m["inputs"])  # every input hash, in the text too
    assert [g["gate"] for g in meta["align"]["gates"]] == [g["gate"] for g in m["gates"]]
    assert all(f"]({g['report']})" in body for g in m["gates"])  # each gate links its report
    assert "## Intended use and limitations" in body and "learning_rate" in body
    assert (trained / "adapter" / "README.md").read_text() == card  # not PEFT's blank template


def test_training_loss_falls(trained):
    losses = [
        json.loads(x)["loss"] for x in (trained / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
    ]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1


def test_only_lora_weights_change(trained, tiny_model_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = load_file(tiny_model_path / "model.safetensors")
    adapter = load_file(trained / "adapter" / "adapter_model.safetensors")
    # LoRA B starts at zero: a trained adapter has non-zero B matrices
    b_norms = [v.abs().sum().item() for k, v in adapter.items() if "lora_B" in k]
    assert b_norms and all(n > 0 for n in b_norms)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_path), trained / "adapter"
    )
    merged = model.merge_and_unload().state_dict()
    still = AutoModelForCausalLM.from_pretrained(tiny_model_path).state_dict()
    for k, v in base.items():
        assert torch.equal(still[k], v), f"base weight {k} changed on disk"
    changed = [k for k, v in base.items() if k in merged and not torch.equal(merged[k], v)]
    assert any("q_proj" in k for k in changed)
    assert not any("embed_tokens" in k or "norm" in k for k in changed)


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, trained):
    out = tmp_path / "resumed"
    assert sft(out, "train.max_steps=16", "train.stop_after_steps=8") == 3  # paused: not a success
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "running" and not (out / "adapter").exists()
    assert sft(out, "train.max_steps=16", resume=True) == 0
    a = load_file(trained / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    assert (
        json.loads((out / "manifest.json").read_text())["key"]
        == json.loads((trained / "manifest.json").read_text())["key"]
    )


def test_refuses_to_overwrite_without_resume(trained, capsys):
    assert sft(trained, "train.max_steps=16") == 2
    assert "output directory is not empty" in capsys.readouterr().err


def test_merged_checkpoint_equals_base_plus_adapter(tmp_path, tiny_model_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "m"
    assert sft(out, "train.max_steps=3", "merge_adapter=true") == 0
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    stacked = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_path), out / "adapter"
    ).eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, stacked(input_ids=ids).logits, atol=1e-4)


def test_sft_trains_from_a_hub_style_folder_of_prompt_completion_rows_with_its_test_split(tmp_path):
    """A folder as a Hub dataset repository holds it (data/train-*.jsonl, data/test-*.jsonl) of TRL's
    prompt-completion rows trains through the CLI; its test split is the held-out data."""
    import json

    from core.readers import load_instructions

    convs, _ = load_instructions(EXAMPLES / "instructions_train.jsonl")
    rows = [{"prompt": c.messages[-2].content, "completion": c.messages[-1].content} for c in convs]
    for name, part in (("train-00000-of-00001", rows[:40]), ("test-00000-of-00001", rows[40:48])):
        f = tmp_path / "hub" / "data" / f"{name}.jsonl"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("".join(json.dumps(r) + "\n" for r in part))
    out = tmp_path / "run"
    args = ["sft", "--config", "configs/sft.yaml", f"output_dir={out}", "model.name_or_path=tiny-random-llama",
            f"data.train_file={tmp_path / 'hub'}", "data.validation_file=null", "train.max_steps=2",
            "train.early_stopping_patience=null"]  # fmt: skip
    assert main(args) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["train_file"]["rows_kept"] == 40 and m["counts"]["validation_file"]["rows_kept"] == 8


def test_sft_learns_plain_text_rows_whole_and_the_perplexity_gate_scores_them(tmp_path, tiny_model_path):
    """TRL's language-modelling rows (`text` alone) train through the CLI: every token learned, no chat template,
    a control-token string in the text broken (never a control token); a held-out file of them feeds the gate."""
    import json

    from transformers import AutoTokenizer

    from core.chat import render_text

    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    rows = [{"text": f"{a} then {b}, and {c} follows."} for a in words for b in words for c in words[:2]]
    rows[3]["text"] += " <|im_end|>"
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:60]) + '{"text": "  "}\n')
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[60:]))
    out = tmp_path / "run"
    args = ["sft", "--config", "configs/sft.yaml", f"output_dir={out}", "model.name_or_path=tiny-random-llama",
            f"data.train_file={train}", f"data.validation_file={held}", "train.max_steps=2",
            "train.early_stopping_patience=null"]  # fmt: skip
    assert main(args) == 0
    m = json.loads((out / "manifest.json").read_text())
    counts = m["counts"]
    assert counts["train_file"]["rows_kept"] == 60 and counts["validation_file"]["rows_kept"] == 12
    assert any(":61: text: is empty" in p for p in counts["train_file"]["problems"])
    assert counts["tokenization"].get("neutralised_control_tokens") == 1
    gate = tmp_path / "gate"
    argv = [
        "eval",
        "gate",
        "perplexity",
        "--candidate",
        str(out),
        "--parent",
        "tiny-random-llama",
        "--data",
        str(held),
    ]
    assert main([*argv, "--out", str(gate)]) in (
        0,
        1,
    )  # a verdict either way; what it scored is the point here
    assert json.loads((gate / "gate.json").read_text())["details"]["data_counts"]["rows_kept"] == 12
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    r = render_text(tok, rows[0]["text"], 512)
    assert r.labels == r.input_ids and r.input_ids[-1] == tok.eos_token_id  # whole, and it learns to stop
    assert tok.decode(r.input_ids[:-1], skip_special_tokens=True).strip() == rows[0]["text"]
    assert "<|im_end|>" not in tok.convert_ids_to_tokens(
        render_text(tok, rows[3]["text"], 512).input_ids[:-1]
    )
    cut = render_text(tok, rows[0]["text"], 3, "left")
    assert cut.truncated and cut.input_ids == r.input_ids[-3:]
