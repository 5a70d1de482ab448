"""Shared fixtures. Real data is read from ../shared/data (never copied here); tests that need it skip with
a reason where it is absent. Models come from align's own cache (ALIGN_CACHE or ~/.cache/align)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("ALIGN_SHARED_DATA", ROOT.parent / "shared" / "data"))
EXAMPLES = ROOT / "examples" / "data"


def shared_file(name: str) -> Path:
    p = SHARED_DATA / name
    if not p.exists():
        pytest.skip(f"real data file {p} is absent (the shared data folder sits beside the repository)")
    return p


def hh_preferences(root: Path, validation_fraction: float) -> Path:
    """HH-RLHF (harmless, from the shared data) imported as rankings and built into preferences under `root`."""
    from align.cli import main

    hh = shared_file("hh_rlhf_harmless_test_1000.jsonl")
    assert (
        main(["data", "import-rankings", "--from", "hh-rlhf", str(hh), "--out", str(root / "hh.jsonl")]) == 0
    )
    args = ["data", "build-preferences", str(root / "hh.jsonl"), "--out", str(root / "prefs"),
            "--set", f"validation_fraction={validation_fraction}"]  # fmt: skip
    assert main(args) == 0
    return root / "prefs"


def fused_lora_policy(model_path: Path, kernel: str = "sdpa", outputs: tuple[str, ...] = ("log_probs",)):
    """A causal LM with TRL's fused LM head (`outputs` fields) and a LoRA on q/v whose B matrices are random
    (seed 0), so that the adapter changes what the model computes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    import align.attention  # noqa: F401 (registers sdpa_segments)

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation=kernel)
    add_fused_lm_head(model, outputs=outputs)
    torch.manual_seed(0)
    policy = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return policy


@pytest.fixture(scope="session")
def tokenizer():
    from align.models import load_tokenizer
    from data_schemas.config import ModelConfig

    return load_tokenizer(ModelConfig(name_or_path="smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    from align.models import resolve_model_path

    return Path(resolve_model_path("tiny-random-llama"))


@pytest.fixture(scope="session")
def real_model_path() -> Path:
    from align.models import resolve_model_path

    return Path(resolve_model_path("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def real_sft(tmp_path_factory) -> Path:
    """An `align sft` artifact on the real SmolLM2 (one step: the later stages' tests need a real parent, not a
    good one). Shared by the DPO and PPO real-model tests."""
    from align.cli import main

    out = tmp_path_factory.mktemp("real") / "sft"
    args = ["sft", "--config", "configs/sft.yaml", f"output_dir={out}", "train.max_steps=1",
            f"data.train_file={EXAMPLES / 'instructions_train.jsonl'}",
            f"data.validation_file={EXAMPLES / 'instructions_validation.jsonl'}",
            "train.early_stopping_patience=null"]  # fmt: skip
    assert main(args) == 0
    return out


@pytest.fixture(scope="session")
def real_reward(tmp_path_factory) -> tuple[Path, int]:
    """(artifact, exit code) of `align reward` on the real SmolLM2 with OpenAssistant K-wise rankings (3 steps)."""
    from align.cli import main

    oa = shared_file("oasst_en_trees_60.jsonl")
    root = tmp_path_factory.mktemp("real_reward")
    assert main(["data", "import-rankings", "--from", "oasst", str(oa), "--out", str(root / "oa.jsonl")]) == 0
    args = ["data", "build-preferences", str(root / "oa.jsonl"), "--out", str(root / "prefs"),
            "--set", "validation_fraction=0.2"]  # fmt: skip
    assert main(args) == 0
    out = root / "reward"
    code = main(
        ["reward", "--config", "configs/reward.yaml", f"output_dir={out}", f"data.preferences_dir={root / 'prefs'}",
         "data.max_length=256", "data.max_eval_groups=12", "train.max_steps=3", "train.groups_per_batch=2",
         "train.eval_steps=100", "train.save_steps=100", "gate.min_pairs=10"]
    )  # fmt: skip
    return out, code
