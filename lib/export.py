"""`align export`: an align model artifact as a standard folder that plain transformers, PEFT, vLLM and a model hub
load as exactly the model align computes with.

Why it is needed: align keeps a policy as a stack (stack.json: the base, the SFT adapter merged into it, then the
stage's own adapter on top) and a reward model as a sequence-classification trunk with the SFT adapter merged and a
trained scalar head. A loader that sees only `adapter/` applies it to the raw base and gets another model, without a
word. Export rebuilds the model the way align does and writes it whole:

- **merged** (default): every adapter folded into the weights; a policy as a causal LM, a reward model as
  `AutoModelForSequenceClassification` with `num_labels=1` (the head reads the last non-pad token: the chat
  template's closing newline, the token align reads). safetensors, config, tokenizer with its chat template,
  generation config, model card.
- **--adapter**: one PEFT LoRA relative to the root base model. LoRA updates of linear layers add, so the SFT
  adapter and the stage's adapter are concatenated along the rank (PEFT's `add_weighted_adapter(..., "cat")`:
  W + s1·B1·A1 + s2·B2·A2 = W + [s1·B1 | s2·B2]·[A1; A2]), an exact rewrite, not an approximation. Only LoRA (not
  DoRA, AdaLoRA or IA3) composes this way; the others export merged.

Every export is checked before it is moved into place: the written folder is loaded back with plain transformers
(and PEFT) and must compute align's logits (or rewards) on a probe conversation within `TOLERANCE`; otherwise
nothing is written. `--push-to-hub` uploads the checked folder; `--gguf` runs llama.cpp's converter on it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import HfApi, get_token

from core.chat import chat_ids
from core.config import UserError, load_config, printable
from core.manifest import replace_dir, require_complete
from core.model_card import CardInfo, write_export_card
from core.models import ALIASES, load_tokenizer, resolve_model_path, torch_dtype
from core.progress import steps
from data_schemas.config import ModelConfig, RewardConfig
from data_schemas.manifest import Manifest
from lib.artifacts import resolve_start
from lib.merge import lora_scale

# Largest |align - exported| over the probe's logits (fp32 on one machine: a re-association of the same sums).
TOLERANCE = 1e-3
PROBE = [
    {"role": "user", "content": "Name three colours of the rainbow."},
    {"role": "assistant", "content": "Red, orange and yellow."},
]
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class ArtifactModel:
    """How an artifact's model is built, read from its folder: the base, the adapters merged into it in order, then
    the artifact's own adapter (or its full weights)."""

    dir: Path
    manifest: Manifest
    kind: str  # "causal-lm" | "reward"
    base: str  # the base model as configured (alias, path or hub id)
    merged: tuple[
        Path, ...
    ] = ()  # adapters folded into the base first (the SFT adapter under DPO, PPO, reward)
    adapter: Path | None = None  # the artifact's own adapter
    weights: Path | None = None  # a full checkpoint folder (SFT's merged/, a full fine-tune's model/)


def read_artifact(ref: Path) -> ArtifactModel:
    """The recipe of an artifact's model, or a sentence saying why it has none."""
    ref = Path(ref)
    if not (ref / "manifest.json").exists():
        raise UserError(
            f"{ref}: not an align artifact (no manifest.json); export takes a stage's output folder"
        )
    m = require_complete(ref)
    if m.model is None:
        raise UserError(
            f"{ref}: this {m.stage} artifact holds no model; export takes sft, reward, dpo or ppo"
        )
    cfg_adapter = ref / "adapter" / "adapter_config.json"
    task = json.loads(cfg_adapter.read_text()).get("task_type") if cfg_adapter.exists() else None
    if task == "SEQ_CLS":
        cfg = load_config(RewardConfig, ref / "config.yaml")
        merged = resolve_start(cfg.init_from).merge if cfg.init_from is not None else ()
        return ArtifactModel(ref, m, "reward", m.model.name, merged, ref / "adapter")
    if m.stage == "reward" and (ref / "model" / "config.json").exists():  # trained full-parameter
        return ArtifactModel(ref, m, "reward", m.model.name, weights=ref / "model")
    if (ref / "stack.json").exists():
        stack = json.loads((ref / "stack.json").read_text())
        merged = tuple(ref / a for a in stack.get("merge", []))
        return ArtifactModel(ref, m, "causal-lm", m.model.name, merged, ref / stack.get("adapter", "adapter"))
    if (ref / "adapter").is_dir():
        return ArtifactModel(ref, m, "causal-lm", m.model.name, (), ref / "adapter")
    for folder in ("model", "merged"):
        if (ref / folder / "config.json").exists():
            return ArtifactModel(ref, m, "causal-lm", m.model.name, weights=ref / folder)
    raise UserError(f"{ref}: this {m.stage} artifact holds no model (no adapter/, model/ or merged/)")


# ==========================================================================================================
# Building the models
# ==========================================================================================================
def _base_model(a: ArtifactModel):
    """The root base checkpoint in fp32: a causal LM, or a one-label classifier for a reward model."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if a.kind == "reward" else AutoModelForCausalLM
    extra = {"num_labels": 1} if a.kind == "reward" else {}
    return cls.from_pretrained(resolve_model_path(a.base), dtype=torch.float32, **extra)


def align_model(a: ArtifactModel, tokenizer):
    """The model as align computes with it (built by align's own loaders), every adapter folded in; fp32, CPU,
    plain `sdpa` attention (align's packed-sequence kernels are not for other loaders)."""
    from core.models import is_prompt_learning, load_for_eval

    if a.kind == "reward":
        from peft import PeftModel

        from lib.reward_model import build_reward_model

        cfg = load_config(RewardConfig, a.dir / "config.yaml")
        if a.weights is not None:
            model = build_reward_model(cfg, tokenizer, "fp32", weights=a.weights)
        else:
            model = PeftModel.from_pretrained(build_reward_model(cfg, tokenizer, "fp32"), a.adapter)
            model = model.merge_and_unload()
    else:
        model, _, _ = load_for_eval(str(a.dir), precision="fp32", merge=True)
        if is_prompt_learning(model):
            raise UserError(
                f"{a.dir}: its adapter is virtual tokens ({model.active_peft_config.peft_type}), which cannot be "
                "folded into the weights; export it with --adapter (a PEFT adapter on the base model)"
            )
    model.set_attn_implementation("sdpa")
    return model.cpu().eval()


def composed_adapter(a: ArtifactModel, base_name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, adapter_config) of one PEFT LoRA on the base model equal to the artifact's stack.

    LoRA deltas of a linear layer add: W + s1·B1·A1 + s2·B2·A2 = W + [s1·B1 | s2·B2]·[A1; A2]. Each module's A
    matrices are stacked along the rank and its B matrices, scaled, side by side (zeros where an adapter leaves the
    module alone), so the result has rank r1 + r2 and scale 1 (lora_alpha = r). Tensors that are not LoRA factors
    (a reward model's trained head) come from the artifact's own adapter. An adapter already relative to the base
    is written as it is."""
    from safetensors.torch import load_file

    if a.weights is not None:
        raise UserError(
            f"{a.dir}: holds full weights ({a.weights.name}/), not an adapter; export without --adapter"
        )
    top_cfg = json.loads((a.adapter / "adapter_config.json").read_text())
    top = load_file(str(a.adapter / "adapter_model.safetensors"))
    if not a.merged:
        return top, {**top_cfg, "base_model_name_or_path": base_name, "inference_mode": True}
    layers = [*a.merged, a.adapter]
    configs = [json.loads((f / "adapter_config.json").read_text()) for f in layers]
    scales = [lora_scale(c, f) for c, f in zip(configs, layers, strict=True)]
    tensors = [load_file(str(f / "adapter_model.safetensors")) for f in layers]
    ranks = [c["r"] for c in configs]
    total = sum(ranks)
    factors = (".lora_A.weight", ".lora_B.weight")
    modules = sorted({k[: -len(f)] for t in tensors for k in t for f in factors if k.endswith(f)})
    out: dict[str, torch.Tensor] = {k: v for k, v in top.items() if not k.endswith(factors)}
    for mod in modules:
        some = next(t for t in tensors if f"{mod}.lora_A.weight" in t)
        in_f, out_f = some[f"{mod}.lora_A.weight"].shape[1], some[f"{mod}.lora_B.weight"].shape[0]
        A = torch.zeros(total, in_f, dtype=torch.float32)
        B = torch.zeros(out_f, total, dtype=torch.float32)
        lo = 0
        for t, r, s in zip(tensors, ranks, scales, strict=True):
            if f"{mod}.lora_A.weight" in t:
                A[lo : lo + r] = t[f"{mod}.lora_A.weight"].float()
                B[:, lo : lo + r] = t[f"{mod}.lora_B.weight"].float() * s
            lo += r
        out[f"{mod}.lora_A.weight"], out[f"{mod}.lora_B.weight"] = A.contiguous(), B.contiguous()
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    config = {**top_cfg, "r": total, "lora_alpha": total, "use_rslora": False, "target_modules": targets,
              "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": base_name,
              "inference_mode": True}  # fmt: skip
    return out, config


# ==========================================================================================================
# The check: the written folder, loaded without align, computes what align computes
# ==========================================================================================================
def probe_ids(tokenizer) -> torch.Tensor:
    return torch.tensor([chat_ids(tokenizer, PROBE)])


@torch.no_grad()
def outputs_of(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM over the probe, or the reward of a classifier ([1, 1])."""
    return model(input_ids=ids).logits.float()


def load_exported(folder: Path, kind: str, adapter: bool, base_path: Path | str):
    """The exported folder as a user would load it: transformers alone, or PEFT on the named base."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if kind == "reward" else AutoModelForCausalLM
    if not adapter:
        return cls.from_pretrained(folder, dtype=torch.float32).eval()
    from peft import PeftModel

    extra = {"num_labels": 1} if kind == "reward" else {}
    base = cls.from_pretrained(base_path, dtype=torch.float32, **extra)
    return PeftModel.from_pretrained(base, folder).eval()


def check_export(
    reference, folder: Path, kind: str, adapter: bool, base_path, tokenizer, loaded=lambda: None
) -> float:
    """Largest |reference - exported| over the probe; a UserError above TOLERANCE (nothing is published).
    `loaded()` is called once the folder is read back (the export's progress)."""
    ids = probe_ids(tokenizer)
    want = outputs_of(reference, ids)
    exported = load_exported(folder, kind, adapter, base_path)
    loaded()
    got = outputs_of(exported, ids)
    err = (want - got).abs().max().item() if want.shape == got.shape else float("inf")
    if not err <= TOLERANCE:
        raise UserError(
            f"export check failed: the written model computes other outputs than align's (max difference {err:.3g} "
            f"> {TOLERANCE}); nothing was written. Please report this with the artifact's stack.json"
        )
    return err


# ==========================================================================================================
# The command
# ==========================================================================================================
@dataclass(frozen=True)
class Exported:
    folder: Path
    kind: str  # "causal-lm" | "sequence-classification" | "peft-adapter"
    base: str
    max_difference: float


def default_base(a: ArtifactModel) -> str:
    """The base an exported adapter names: the model as configured (a hub id stays a hub id), or the resolved
    folder for align's built-in aliases (they are local conversions, not hub checkpoints)."""
    return str(resolve_model_path(a.base)) if a.base in ALIASES else a.base


def _output_dtype(a: ArtifactModel, dtype: str) -> torch.dtype:
    if dtype == "auto":  # the base checkpoint's own dtype
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(resolve_model_path(a.base))
        name = str(getattr(c, "dtype", None) or getattr(c, "torch_dtype", None) or "float32").replace(
            "torch.", ""
        )
        return torch_dtype(DTYPES.get(name, "fp32"))
    return torch_dtype(DTYPES[dtype])


def export_artifact(
    ref: Path,
    to: Path,
    *,
    adapter: bool = False,
    base: str | None = None,
    dtype: str = "auto",
    force: bool = False,
) -> Exported:
    """Write the artifact's model to `to` (see the module docstring); `to` is replaced only after the check."""
    a = read_artifact(ref)
    to = Path(to)
    if to.exists() and not to.is_dir():
        raise UserError(f"{to}: exists and is not a folder; give --to a folder")
    if to.is_dir() and any(to.iterdir()) and not force:
        raise UserError(f"{to}: not empty; give an empty or new folder, or --force to replace it")
    if to.resolve() == a.dir.resolve() or a.dir.resolve() in to.resolve().parents:
        raise UserError(f"{to}: inside the artifact; export next to it, not into it")
    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose auto, {', '.join(DTYPES)}")
    with steps("export: align's model, written, loaded back, compared", 4) as advance:
        return _export(a, to, adapter, base, dtype, advance)


def _export(a: ArtifactModel, to: Path, adapter: bool, base: str | None, dtype: str, advance) -> Exported:
    """The export's four steps, `advance`d after each: align's model, the folder written, read back, compared."""
    tokenizer = load_tokenizer(ModelConfig(name_or_path=a.base))
    reference = align_model(a, tokenizer)
    advance()
    base_name = base or default_base(a)
    if adapter:
        tensors, adapter_config = composed_adapter(a, base_name)
        kind = "peft-adapter"
    else:
        kind = "sequence-classification" if a.kind == "reward" else "causal-lm"
        _stopping_tokens(reference, tokenizer)
    model = reference
    out_dtype = _output_dtype(a, dtype)
    err = [float("nan")]

    def save(tmp: Path) -> None:
        if adapter:
            from safetensors.torch import save_file

            tmp.mkdir(parents=True)
            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
        else:  # a bf16/fp16 export is the rounded weights: the check compares with them, read back in fp32
            model.to(out_dtype).save_pretrained(tmp)
            model.float()
        tokenizer.save_pretrained(tmp)
        write_export_card(tmp, a.dir, a.manifest, kind, base_name, CardInfo(pipeline_tag=_pipeline(a)))
        advance()
        err[0] = check_export(reference, tmp, a.kind, adapter, resolve_model_path(a.base), tokenizer, advance)
        advance()

    replace_dir(save, to)
    return Exported(to, kind, base_name, err[0])


def _pipeline(a: ArtifactModel) -> str:
    return "text-classification" if a.kind == "reward" else "text-generation"


def _stopping_tokens(model, tokenizer) -> None:
    """Generation stops at the end of a turn, and pads with the tokenizer's pad token, in every loader."""
    g = getattr(model, "generation_config", None)
    if g is None:
        return
    eos = g.eos_token_id if isinstance(g.eos_token_id, list) else [g.eos_token_id]
    g.eos_token_id = sorted({e for e in [*eos, tokenizer.eos_token_id] if e is not None})
    if g.pad_token_id is None:
        g.pad_token_id = tokenizer.pad_token_id


# ==========================================================================================================
# Publishing: a model hub, GGUF
# ==========================================================================================================
def hub_api(repo: str):
    """The logged-in HfApi for `repo`, or a sentence saying how to log in (said before anything is exported)."""
    if "/" not in repo or repo.count("/") > 1 or repo.strip() != repo:
        raise UserError(f"--push-to-hub {printable(repo)}: give a repository id as OWNER/NAME")
    if get_token() is None:
        raise UserError(
            "--push-to-hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN, then rerun"
        )
    return HfApi()


def push_to_hub(api, folder: Path, repo: str, private: bool = True) -> str:
    """Create the model repository (private by default) and upload the checked folder as one commit."""
    api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo, repo_type="model", folder_path=str(folder), commit_message="align export"
    )
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo}")


GGUF_CONVERTER = "convert_hf_to_gguf.py"


def gguf_converter(explicit: str | None = None) -> Path:
    """llama.cpp's converter script: --gguf-converter, $LLAMA_CPP_DIR/convert_hf_to_gguf.py, or on PATH."""
    candidates = [Path(explicit)] if explicit else []
    if os.environ.get("LLAMA_CPP_DIR"):
        candidates.append(Path(os.environ["LLAMA_CPP_DIR"]) / GGUF_CONVERTER)
    on_path = shutil.which(GGUF_CONVERTER)
    if on_path:
        candidates.append(Path(on_path))
    for c in candidates:
        if c.is_file():
            return c
    raise UserError(
        f"--gguf needs llama.cpp's {GGUF_CONVERTER}: clone https://github.com/ggml-org/llama.cpp and pass "
        f"--gguf-converter PATH/{GGUF_CONVERTER} (or set LLAMA_CPP_DIR); the exported folder is written without it"
    )


def to_gguf(converter: Path, folder: Path, outtype: str = "f16") -> Path:
    """Run the converter on the exported folder (an argument list, no shell): FOLDER/model-OUTTYPE.gguf."""
    target = folder / f"model-{outtype}.gguf"
    r = subprocess.run(
        [sys.executable, str(converter), str(folder), "--outfile", str(target), "--outtype", outtype],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0 or not target.exists():
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"{converter}: GGUF conversion failed: {printable(tail[0])}")
    return target
