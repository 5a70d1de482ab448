"""DeepSpeed ZeRO-3 in a loop of align's own (PPO/GRPO): no process holds the whole model.

The Trainer stages (SFT, reward, DPO) run ZeRO-3 through transformers (`train.deepspeed`, lib/trainer.py). PPO
has its own loop, so it takes the same pieces directly:

1. **config** (`config`): the user's DeepSpeed JSON (configs/deepspeed/zero3.json) with its `auto` values filled
   from the stage's settings, as transformers fills them for a Trainer (batch sizes, clipping, precision, bucket
   sizes from the hidden size); an `auto` left that align cannot fill is a sentence, not a DeepSpeed assertion;
2. **create partitioned** (`partitioned_loading`): while a ZeRO-3 config is registered with transformers,
   `from_pretrained` builds the model under `deepspeed.zero.Init` (each parameter partitioned across the processes
   as it is created, the checkpoint read file by file into the partitions); the registration is dropped after, so
   that later loads (the reward model, the gates) load whole or offloaded, as they do elsewhere;
3. **train** (`deepspeed.initialize`): the engine gathers each module's weights just before it computes and frees
   them after, reduce-scatters the gradients, clips them by their global norm, and steps AdamW on its fp32
   partition only;
4. **resume**: DeepSpeed's own checkpoint (each process its partition of weights and optimizer state; nothing is
   gathered). These are DeepSpeed's files (pickles), read back only from the run's own checkpoints folder;
5. **consolidate** (`save_consolidated`): one parameter gathered at a time, in the model's order; the main process
   writes safetensors files of at most `shard_bytes` each as they fill (an index when there are several), so no
   process ever holds more than one file's worth of the model.

Every function that gathers is collective: every process calls it, in the same order.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from core import dist
from core.config import UserError, printable
from core.manifest import replace_dir
from core.models import save_model_files


def read(path: Path | str) -> dict[str, Any]:
    """A DeepSpeed config file, or a sentence saying why it cannot be used."""
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"train.deepspeed={printable(str(path))}: not a readable JSON file ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"train.deepspeed={printable(str(path))}: a DeepSpeed config is a JSON object")
    return cfg


def stage_of(cfg: dict[str, Any]) -> int:
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    return int(stage) if isinstance(stage, int | str) and str(stage).isdigit() else 0


def config(
    path: Path | str, *, micro_batch: int, world: int, max_grad_norm: float, precision: str, hidden: int
) -> dict[str, Any]:
    """The DeepSpeed config of `path` with its `auto` values filled (transformers' rules for a Trainer): one
    micro-batch per optimizer step (the loop steps once per minibatch), clipping at max_grad_norm, bf16/fp16 as
    the stage's precision, bucket sizes from the hidden size."""
    cfg = read(path)
    zero = dict(cfg.get("zero_optimization", {}))
    autos = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    for key, value in autos.items():
        if zero.get(key) == "auto":
            zero[key] = value
    cfg["zero_optimization"] = zero
    top = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world,
        "gradient_clipping": max_grad_norm,
    }
    for key, value in top.items():
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
    for key, on in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        section = dict(cfg.get(key, {}))
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = on
        cfg[key] = section
    left = [k for k, v in _flat(cfg) if v == "auto"]
    if left:
        raise UserError(
            f"train.deepspeed={printable(str(path))}: align cannot fill {', '.join(left)}='auto' for this stage; "
            "give a value"
        )
    cfg.setdefault("steps_per_print", 10**9)  # the loop logs its own metrics
    return cfg


def _flat(cfg: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in cfg.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def init_distributed() -> None:
    """DeepSpeed's communication on the running process group (it reads the world size from there)."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


@contextlib.contextmanager
def partitioned_loading(ds_config: dict[str, Any]) -> Iterator[None]:
    """Inside: `from_pretrained` creates models partitioned under zero.Init (a collective: every process loads the
    same models in the same order). After: no ZeRO-3 config is registered with transformers."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    init_distributed()
    registered = HfDeepSpeedConfig(ds_config)  # transformers keeps a weak reference: alive for the block
    try:
        yield
    finally:
        del registered
        unset_hf_deepspeed_config()


def gathered(params: list[torch.nn.Parameter]):
    """The full values of partitioned parameters inside the block, in every process (collective; read-only)."""
    import deepspeed

    params = [p for p in params if hasattr(p, "ds_id")]
    return deepspeed.zero.GatheredParameters(params) if params else contextlib.nullcontext()


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A small module's state (a value head, an adapter's weights), gathered: CPU copies in every process."""
    with gathered(list(module.parameters())):
        return {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}


def save_trainable(model, target: Path, tokenizer=None, **save_kwargs) -> None:
    """`model.save_pretrained(target)` by the main process, swapped in whole, with its trainable weights gathered
    first where they are partitioned (a PEFT model's adapter under ZeRO-3: small; the frozen base stays
    partitioned, and PEFT saves only the adapter). A model nothing partitions is saved as it is."""
    with gathered([p for p in model.parameters() if p.requires_grad]):
        if dist.is_main():

            def save(p: Path) -> None:
                model.save_pretrained(p, **save_kwargs)
                if tokenizer is not None:
                    tokenizer.save_pretrained(p)

            replace_dir(save, Path(target))
    dist.barrier()


def save_consolidated(model, target: Path, tokenizer=None, shard_bytes: int = 2 * 2**30) -> None:
    """`target` as a plain transformers checkpoint (safetensors, config.json, tokenizer) from a partitioned model,
    one parameter gathered at a time; the main process writes files of at most `shard_bytes` as they fill, so it
    never holds more than one file's worth. A tied head is one parameter, stored once under its first name, as
    transformers stores it. Swapped in whole."""
    from safetensors.torch import save_file

    staging = Path(str(target) + ".zero3")
    main = dist.is_main()
    if main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    files: list[dict[str, torch.Tensor]] = []
    current: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal current, size
        if current and main:
            save_file(current, str(staging / f"part-{len(files)}.safetensors"), metadata={"format": "pt"})
            files.append({k: torch.empty(0) for k in current})  # the names only
        current, size = {}, 0

    for name, p in model.named_parameters():  # shared parameters once, under their first name
        with gathered([p]):
            if main:
                current[name] = p.detach().cpu().clone().contiguous()
                size += current[name].numel() * current[name].element_size()
        if size >= shard_bytes:
            flush()
    names = {n for n, _ in model.named_parameters()}
    persistent = {k for k in model.state_dict() if k not in names}  # persistent buffers: never partitioned
    for name, b in model.named_buffers():
        if name in persistent and main:
            current[name] = b.detach().cpu().clone().contiguous()
    flush()
    if main:

        def write(p: Path) -> None:
            p.mkdir(parents=True, exist_ok=True)
            if len(files) == 1:
                shutil.move(str(staging / "part-0.safetensors"), p / "model.safetensors")
            else:
                index, total = {}, 0
                for i, names_in in enumerate(files):
                    fname = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
                    shutil.move(str(staging / f"part-{i}.safetensors"), p / fname)
                    index.update(dict.fromkeys(names_in, fname))
                    total += (p / fname).stat().st_size
                (p / "model.safetensors.index.json").write_text(
                    json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2)
                )
            save_model_files(model, p, tokenizer)

        replace_dir(write, Path(target))
        shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()
