"""An SFT LoRA folded into its base one safetensors file at a time, for the loads that must not hold the merged model
whole: SFT's `merged/` from a partitioned run, and a sharded stage's start (`sharded_start`: every process then reads
its own shards of the merged folder).

LoRA's update of a linear layer is W + s·B·A with s = alpha / r (alpha / sqrt(r) under rsLoRA), as PEFT merges it.
Each base file is read, the weights an adapter touches are updated in fp32 and cast back, and the file is written
before the next is read: no more of the model is in memory than its largest file. What this does not cover (DoRA,
per-module ranks, fan_in_fan_out, a trained head or embedding) is left to PEFT on the whole model (False).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from core import dist
from core.config import UserError
from core.manifest import replace_dir
from core.models import resolve_model_path, weight_files
from core.progress import steps
from data_schemas.config import ModelConfig
from lib.artifacts import Start


def lora_scale(c: dict, folder: Path) -> float:
    if c.get("peft_type") != "LORA" or c.get("use_dora") or c.get("lora_bias"):
        kind = "DoRA" if c.get("use_dora") else str(c.get("peft_type", "?")).lower()
        raise UserError(
            f"{folder}: a {kind} adapter does not compose with the others into one LoRA; export without --adapter "
            "(merged weights)"
        )
    if c.get("rank_pattern") or c.get("alpha_pattern"):
        raise UserError(f"{folder}: per-module ranks do not compose into one LoRA; export without --adapter")
    r, alpha = c["r"], c["lora_alpha"]
    return alpha / r**0.5 if c.get("use_rslora") else alpha / r


def merge_lora_files(base: Path | str, adapter: Path, target: Path, tokenizer=None) -> bool:
    """Write `target`: the checkpoint at `base` with the LoRA at `adapter` folded into its weights, W + s·B·A (s =
    alpha / r, or alpha / sqrt(r) with rsLoRA; PEFT's merge), one safetensors file of the base at a time: no more of
    the model is in memory than one of its files, where loading it to merge would hold all of it. Returns False,
    writing nothing, for what this does not cover (merge it with PEFT instead): an adapter that is not a plain LoRA
    of linear layers (DoRA, per-module ranks, fan_in_fan_out, modules_to_save, a LoRA'd embedding), or a base
    without safetensors files."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    files = [f for f in weight_files(Path(base)) if f.suffix == ".safetensors"]
    if not files or config.get("fan_in_fan_out") or config.get("modules_to_save"):
        return False
    try:
        scale = lora_scale(config, adapter)
    except UserError:
        return False
    factors = load_file(str(adapter / "adapter_model.safetensors"))
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in factors.items():
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                return False  # a tensor that is not a LoRA factor (a trained head, embedding factors)
            continue
        module = key.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
        deltas[f"{module}.weight"] = (a, factors[key.replace(".lora_A.", ".lora_B.")])

    def write(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        seen = set()
        with steps("merging the adapter: checkpoint files", len(files)) as advance:
            for f in files:
                tensors = {}
                with safe_open(f, "pt") as fh:
                    metadata = fh.metadata()
                    for key in fh.keys():  # noqa: SIM118 (safe_open is not iterable)
                        w = fh.get_tensor(key)
                        if key in deltas:
                            a, b = deltas[key]
                            w = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
                            seen.add(key)
                        tensors[key] = w.contiguous()
                save_file(tensors, str(folder / f.name), metadata=metadata)
                del tensors
                advance()
        if seen != set(deltas):
            raise UserError(
                f"{adapter}: LoRA factors for weights {sorted(set(deltas) - seen)[:3]} not in {base}"
            )
        for name in Path(base).iterdir():  # config, generation config, the shards' index, tokenizer files
            if name.is_file() and name.suffix in (".json", ".txt", ".model", ".jinja"):
                shutil.copyfile(name, folder / name.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    replace_dir(write, Path(target))
    return True


# Under a stage's output folder: its start merged for a sharded load (sharded_start); no part of the artifact, the
# stage removes it when training is done and before a fresh run.
MERGED_START = ".start-merged"


def sharded_start(start: Start, init_from: Path | str, out: Path) -> ModelConfig:
    """The checkpoint a sharded load (core/sharded.py) reads shard by shard: the start's model, or, for an SFT artifact
    whose adapters are still to be merged, its weights with them folded in one safetensors file at a time
    (`merge_lora_files`), written once by the main process into `out`/MERGED_START (kept for a resume) and then read
    by every process, each its own shards. No process holds the merged model. An
    adapter `merge_lora_files` does not cover (DoRA, per-module ranks, a trained head) is refused in a sentence.
    A collective: every process calls it."""
    if not start.merge:
        return start.model
    work = out / MERGED_START
    ok = True
    if dist.is_main() and not (work / "config.json").exists():  # replace_dir: present means complete
        source = Path(resolve_model_path(start.model.name_or_path))
        steps = [work.with_name(f"{work.name}.{i}") for i in range(len(start.merge) - 1)] + [work]
        for adapter, target in zip(start.merge, steps, strict=True):
            ok = merge_lora_files(source, adapter, target)
            if not ok:
                break
            source = target
        for step in steps[:-1]:
            shutil.rmtree(step, ignore_errors=True)
    if not dist.broadcast(ok):
        raise UserError(
            f"train.sharding=fsdp2 reads the start's weights shard by shard, and init_from {init_from} has an adapter "
            "that align merges only whole (not a plain LoRA): export it first (align export "
            f"{init_from} --to DIR) and start from DIR"
        )
    return start.model.model_copy(update={"name_or_path": str(work)})
