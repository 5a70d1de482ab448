"""`align export` on tiny artifacts, through the real CLI: the exported folder, loaded by plain transformers or PEFT,
computes what align computes (logits, rewards) on inputs the export's own check never saw; the artifact's stacked
adapter no longer loads as the wrong model without a word; the cards name the base the weights apply to. The same
on the real model is in tests/stages/test_*_real_model.py."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml

from align.cli import main
from tests.conftest import EXAMPLES

MESSAGES = [{"role": "user", "content": "Tell me about bread (99)"}]
RESPONSES = ["gladly here is help on bread now", "sorry, but no help on bread here"]


def _pairs(path, n=32):
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            t = rng.choice(["tea", "bikes", "rain", "maps"])
            row = {"prompt": f"Tell me about {t} ({i})", "chosen": f"gladly here is help on {t}",
                   "rejected": f"sorry, no help on {t}"}  # fmt: skip
            f.write(json.dumps(row) + "\n")


def _rankings(path, n=40):
    rng = random.Random(1)
    lines = []
    for i in range(n):
        t = rng.choice(["tea", "bikes", "rain", "maps"])
        resp = {"good": f"gladly here is help on {t}", "bad": f"sorry, but no help on {t}"}
        lines.append(json.dumps({"prompt_id": f"p{i}", "prompt": f"Tell me about {t} ({i})",
                                 "responses": [{"id": k, "text": v} for k, v in resp.items()],
                                 "ranking": ["good", "bad"], "annotator": "ann"}))  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_model_path):
    """An SFT (LoRA), a DPO on it (a new adapter on the SFT-merged weights) and a reward model from the SFT."""
    d = tmp_path_factory.mktemp("export")
    sft = d / "sft"
    assert main(["sft", "--config", "configs/sft.yaml", f"output_dir={sft}", "model.name_or_path=tiny-random-llama",
                 f"data.train_file={EXAMPLES / 'instructions_train.jsonl'}", "train.max_steps=3",
                 "train.learning_rate=1e-2", "train.early_stopping_patience=null"]) == 0  # fmt: skip
    _pairs(d / "pairs.jsonl")
    dpo = d / "dpo"
    assert main(["dpo", "--config", "configs/dpo.yaml", f"output_dir={dpo}", f"init_from={sft}",
                 "data.preferences_dir=null", f"data.pairs_file={d / 'pairs.jsonl'}", "data.validation_fraction=0.25",
                 "train.learning_rate=1e-2", "train.max_steps=3", "train.per_device_train_batch_size=4",
                 "eval.prompts=2", "eval.max_new_tokens=4", "perplexity_gate.min_examples=5",
                 "perplexity_gate.max_relative_increase=1000"]) in (0, 1)  # fmt: skip
    _rankings(d / "r.jsonl")
    prefs = d / "prefs"
    assert main(["data", "build-preferences", str(d / "r.jsonl"), "--out", str(prefs),
                 "--set", "validation_fraction=0.25"]) == 0  # fmt: skip
    reward = d / "reward"
    assert main(["reward", "--config", "configs/reward.yaml", f"output_dir={reward}", f"init_from={sft}",
                 f"data.preferences_dir={prefs}", "train.learning_rate=1e-2", "train.max_steps=3",
                 "train.groups_per_batch=4", "gate.min_pairs=2", "gate.min_accuracy=0"]) in (0, 1)  # fmt: skip
    return {"sft": sft, "dpo": dpo, "reward": reward, "root": d}


def _ids(tokenizer, messages):
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    return torch.tensor([list(ids["input_ids"] if hasattr(ids, "keys") else ids)])


def _align_logits(artifact, ids):
    from core.models import load_for_eval

    model, tok, _ = load_for_eval(str(artifact), precision="fp32")
    with torch.no_grad():
        return model(input_ids=ids).logits.float(), tok


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_exported_policy_computes_what_align_computes(artifacts, stage, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "export"
    assert main(["export", str(artifacts[stage]), "--to", str(out)]) == 0
    said = " ".join(capsys.readouterr().err.split())
    assert "export: align's model, written, loaded back, compared" in said and "4/4" in said  # its progress
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template  # the chat template travels with the weights
    ids = _ids(tok, [*MESSAGES, {"role": "assistant", "content": RESPONSES[0]}])
    want, _ = _align_logits(artifacts[stage], ids)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert (want - got).abs().max().item() < 1e-4
    gen = json.loads((out / "generation_config.json").read_text())
    assert (
        tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]
    )  # generation stops at the turn's end
    assert "sdpa_segments" not in (out / "config.json").read_text()  # align's kernels stay inside align


def test_dpo_adapter_no_longer_loads_silently_as_another_model(artifacts):
    """Before: AutoPeftModelForCausalLM on dpo/adapter loaded it on the raw base (max logit difference 4.6 on the
    real model). Now it stops with a sentence naming the export command; applied to the base by hand it differs
    from align's model, which is why."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    from core.models import resolve_model_path

    with pytest.raises(OSError, match="align export"):
        AutoPeftModelForCausalLM.from_pretrained(artifacts["dpo"] / "adapter")
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-random-llama"), dtype=torch.float32)
    wrong = PeftModel.from_pretrained(base, artifacts["dpo"] / "adapter")
    want, tok = _align_logits(artifacts["dpo"], _ids_for(artifacts))
    with torch.no_grad():
        got = wrong(input_ids=_ids_for(artifacts)).logits
    assert (want - got).abs().max().item() > 1e-3
    meta = yaml.safe_load((artifacts["dpo"] / "README.md").read_text().split("---\n")[1])
    assert meta["base_model"] == "../sft" and meta["base_model_relation"] == "adapter"
    assert meta["align"]["applies_to"]["merged_first"] == ["../sft/adapter"]
    first = (
        (artifacts["dpo"] / "adapter" / "README.md")
        .read_text()
        .split("# dpo model (align)")[1]
        .split("\n\n")[1]
    )
    assert (
        first.startswith("> **This adapter applies to") and "align export" in first
    )  # the card's first words


def _ids_for(artifacts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(artifacts["sft"] / "adapter")
    return _ids(tok, [*MESSAGES, {"role": "assistant", "content": RESPONSES[1]}])


def test_dpo_as_one_peft_adapter_on_the_base(artifacts, tmp_path):
    """--adapter: the SFT and DPO LoRAs concatenated along the rank, relative to the base: plain PEFT loads it by
    itself (base from adapter_config.json) and computes align's logits."""
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "adapter"
    assert main(["export", str(artifacts["dpo"]), "--to", str(out), "--adapter"]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    sft_r = json.loads((artifacts["sft"] / "adapter" / "adapter_config.json").read_text())["r"]
    dpo_r = json.loads((artifacts["dpo"] / "adapter" / "adapter_config.json").read_text())["r"]
    assert cfg["r"] == sft_r + dpo_r and cfg["base_model_name_or_path"].endswith("tiny-random-llama-v2")
    model = AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    want, _ = _align_logits(artifacts["dpo"], _ids_for(artifacts))
    with torch.no_grad():
        got = model(input_ids=_ids_for(artifacts)).logits
    assert (want - got).abs().max().item() < 1e-4
    meta = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert meta["base_model_relation"] == "adapter" and meta["base_model"] == cfg["base_model_name_or_path"]
    assert (
        main(["export", str(artifacts["dpo"]), "--to", str(tmp_path / "b"), "--adapter", "--base", "org/m"])
        == 0
    )
    assert (
        json.loads((tmp_path / "b" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/m"
    )


@pytest.mark.parametrize("adapter", [False, True])
def test_exported_reward_model_scores_what_align_scores(artifacts, tmp_path, adapter):
    """A reward model from an SFT artifact: whole (AutoModelForSequenceClassification) or one adapter on the base
    (AutoPeftModelForSequenceClassification, num_labels=1), on a padded batch of two responses."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lib.reward_model import RewardScorer

    out = tmp_path / "rm"
    assert (
        main(["export", str(artifacts["reward"]), "--to", str(out), *(["--adapter"] if adapter else [])]) == 0
    )
    want = RewardScorer(artifacts["reward"]).score([MESSAGES, MESSAGES], RESPONSES)
    tok = AutoTokenizer.from_pretrained(out)
    if adapter:
        from peft import AutoPeftModelForSequenceClassification

        model = AutoPeftModelForSequenceClassification.from_pretrained(out, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
    else:
        model = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32)
    texts = [tok.apply_chat_template([*MESSAGES, {"role": "assistant", "content": r}], tokenize=False)
             for r in RESPONSES]  # fmt: skip
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        got = model(**batch).logits[:, 0].tolist()
    assert got == pytest.approx(want, abs=1e-4)
    assert want[0] != pytest.approx(want[1], abs=1e-6)  # the two responses are told apart: not a constant


def test_export_card_parses_and_names_the_lineage(artifacts, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "e"
    assert main(["export", str(artifacts["dpo"]), "--to", str(out)]) == 0
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "tiny-random-llama (random weights, for tests)"
    assert data["base_model_relation"] == "finetune" and data["library_name"] == "transformers"
    stages = [a["stage"] for a in data["align"]["lineage"]]
    assert stages == ["sft", "dpo"]
    sft_inputs = json.loads((artifacts["sft"] / "manifest.json").read_text())["inputs"]
    assert all(i["sha256"] in card.text for i in sft_inputs)  # training data to the root, with hashes
    assert data["model-index"][0]["results"]  # the gate checks and held-out metrics
    assert "AutoModelForCausalLM.from_pretrained" in card.text


def test_export_refuses_what_it_cannot_do_in_one_sentence(artifacts, tmp_path, capsys, monkeypatch):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "x").write_text("keep")
    cases = [
        (["export", str(artifacts["dpo"]), "--to", str(occupied)], "not empty"),
        (["export", str(artifacts["root"] / "prefs"), "--to", str(tmp_path / "a")], "holds no model"),
        (["export", str(tmp_path), "--to", str(tmp_path / "b")], "not an align artifact"),
        (["export", str(artifacts["dpo"]), "--to", str(tmp_path / "c"), "--base", "x/y"], "add --adapter"),
        (["export", str(artifacts["dpo"]), "--to", str(artifacts["dpo"] / "x")], "inside the artifact"),
        (["export", str(artifacts["dpo"]), "--to", str(tmp_path / "d"), "--gguf"], "convert_hf_to_gguf.py"),
    ]
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cases.append(
        (["export", str(artifacts["dpo"]), "--to", str(tmp_path / "e"), "--push-to-hub", "me/m"], "token")
    )
    for argv, words in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (argv, err)
    assert (occupied / "x").read_text() == "keep"
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_push_to_hub_uploads_the_checked_folder(artifacts, tmp_path, monkeypatch):
    """Everything up to the network: the repository is created private and the checked folder is uploaded whole
    (HfApi's two calls are recorded here instead of sent)."""
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo, **kw: calls.append(("create", repo, kw)))

    def upload(self, **kw):
        calls.append(("upload", sorted(p.name for p in (tmp_path / "e").iterdir()), kw))

    monkeypatch.setattr(HfApi, "upload_folder", upload)
    assert main(["export", str(artifacts["sft"]), "--to", str(tmp_path / "e"), "--push-to-hub", "me/m"]) == 0
    (create, repo, ckw), (upload_, files, ukw) = calls
    assert create == "create" and repo == "me/m" and ckw["private"] is True
    assert ukw["folder_path"] == str(tmp_path / "e") and ukw["repo_id"] == "me/m"
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(files)


@pytest.mark.parametrize("rslora", [False, True])
def test_a_lora_merged_file_by_file_computes_what_peft_merged_computes(tmp_path, tiny_model_path, rslora):
    """merge_lora_files folds W + s·B·A into the base one safetensors file at a time; the folder computes what PEFT's
    merge_and_unload of the same adapter computes, and what this does not cover (DoRA) is left to PEFT."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from bench.harness import peaked_llama
    from lib.merge import merge_lora_files

    base = peaked_llama(tmp_path / "base", tiny_model_path)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, target_modules=["q_proj", "v_proj", "down_proj"])
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    policy.save_pretrained(tmp_path / "adapter")
    assert merge_lora_files(base, tmp_path / "adapter", tmp_path / "merged")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")
    ids = torch.tensor([[1, 17, 4, 99, 23, 5, 8]])
    with torch.no_grad():
        want = peft.merge_and_unload()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base)(ids).logits
    assert (got - want).abs().max().item() < 1e-4 and (plain - want).abs().max().item() > 1e-2
    dora = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    assert not merge_lora_files(base, tmp_path / "dora", tmp_path / "not")
    assert not (tmp_path / "not").exists()
