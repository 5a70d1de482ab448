"""Sharded by construction with FSDP2: no process ever holds the whole model.

torch's FSDP2 (`fully_shard`) keeps 1/N of every parameter in each of N processes (a DTensor sharded on its first
dimension), gathers one unit's weights (a decoder layer; the root: embeddings, final norm, head) just before that
unit computes, and frees them after; gradients are reduce-scattered back to the shards, and AdamW's moments exist
only for the shard a process owns. What align adds is the path from a checkpoint on disk to that state and back,
without a whole copy on the way:

1. **build** (`build`): the model's modules from its config on the meta device (no memory), tied weights tied
   before sharding (FSDP2 must see one parameter, not two);
2. **shard**: `fully_shard` on every decoder layer (the longest ModuleList), then on `root` (the model itself, or a
   module holding it, such as PPO's policy-with-value-head, whose forward then gathers the root unit);
3. **materialise** (`materialise`): `to_empty` allocates only this process's shards; the non-persistent buffers
   computed at build (rotary frequencies) are put back;
   with CPU offload (`offload`, train.cpu_offload) every unit's shards, their gradients and AdamW's moments live in
   host memory (FSDP2's CPUOffloadPolicy): a unit is copied to the accelerator only to be gathered and computed, and
   the optimizer steps on the host; buffers stay on the accelerator;
4. **load** (`load_checkpoint`): torch.distributed.checkpoint's `HuggingFaceStorageReader` reads from the
   checkpoint's safetensors files only the slices this process holds;
5. **resume** (`save_state`, `load_state`): DCP writes model and optimizer state one file per process, and reads it
   back with no gather (same number of processes);
6. **consolidate** (`save_consolidated`): `HuggingFaceStorageWriter(save_distributed, enable_consolidation)` writes a
   plain transformers checkpoint from the shards, slice by slice: no process gathers the model.

Every function is collective: every process of the group calls it, in the same order. The test
(tests/core/test_sharded.py) runs it in real processes with gloo: the loaded shards compute the checkpoint's
logits, the consolidated folder equals the checkpoint byte for byte, one sharded AdamW step equals the same step in
one process, and a resumed state equals the saved one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from core import dist as align_dist
from core.config import UserError
from core.manifest import replace_dir
from core.models import loading, resolve_model_path, save_model_files, torch_dtype


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks FSDP2 shards one by one: the longest ModuleList of the model (Llama, Qwen, Mistral,
    GPT-NeoX, ... all hold their layers in one)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def ensure_process_group() -> None:
    """FSDP2 shards over a process group: one process started without a launcher gets a group of its own (an
    in-memory store, no port)."""
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(
            backend, store=torch.distributed.HashStore(), rank=0, world_size=1
        )


def shard(modules, offload: bool = False) -> None:
    """`fully_shard` on a module (or a list of modules forming one unit), its shards kept in host memory with
    `offload` (FSDP2's CPUOffloadPolicy: parameters, gradients and the optimizer step on the host)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    policy = {"offload_policy": CPUOffloadPolicy(pin_memory=torch.cuda.is_available())} if offload else {}
    fully_shard(modules, **policy)


# What `build` puts on the trunk: a language-model head, or a scalar head (a reward model: its "score" is not in a
# causal LM's checkpoint, so the caller initialises it).
HEADS = {"causal_lm": "AutoModelForCausalLM", "scalar": "AutoModelForSequenceClassification"}


def build(
    name_or_path: str,
    precision: str,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    head: str = "causal_lm",
    adapter=None,
    offload: bool = False,
):
    """The model on the meta device (`head`: a HEADS row), tied weights tied, layers sharded with `fully_shard` (the
    root is the caller's: `shard_root`; `offload`: `shard`). `adapter`: a PEFT LoraConfig put on the model before sharding (a PEFT
    model comes back); each layer's LoRA weights are a unit of their own inside the layer's, so that a unit holds
    one dtype (PEFT keeps the adapter in fp32 on a bf16 base). Its weights are the caller's to initialise
    (core.models.init_lora) after `load_checkpoint`."""
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    import core.attention  # noqa: F401 (registers sdpa_segments with transformers)

    ensure_process_group()
    path = resolve_model_path(name_or_path)
    with loading(f"model {name_or_path}"):
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    config._attn_implementation = attn_implementation
    if head == "scalar":
        config.num_labels = 1
    auto = getattr(transformers, HEADS[head])
    with init_empty_weights(include_buffers=False):  # buffers real: the rotary frequencies are computed here
        model = auto.from_config(config, dtype=torch_dtype(precision), trust_remote_code=trust_remote_code)
    tie = getattr(config.get_text_config(), "tie_word_embeddings", False)
    if tie and model.get_output_embeddings() is not None:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    model._align_buffers = {n: b.clone() for n, b in model.named_buffers()}
    model._align_source = path
    if adapter is not None:
        from peft import get_peft_model

        model = get_peft_model(model, adapter)
    for layer in decoder_layers(model):
        lora = [
            m for n, m in layer.named_modules() if ".lora_" in f".{n}" and list(m.parameters(recurse=False))
        ]
        if lora:
            shard(lora, offload)
        shard(layer, offload)
    return model


def shard_root(root: torch.nn.Module, offload: bool = False) -> torch.nn.Module:
    """`fully_shard` on the root: what no layer holds (embeddings, final norm, head, a value head) is its unit."""
    shard(root, offload)
    root._align_offload = offload  # read by `offloaded`
    return root


def described(offload: bool) -> str:
    """How a stage says it holds its model under FSDP2."""
    return "sharded (FSDP2)" + (", its shards in host memory" if offload else "")


def offloaded(root: torch.nn.Module) -> bool:
    """Whether `shard_root` sharded `root` with its shards in host memory."""
    return bool(getattr(root, "_align_offload", False))


def materialise(root: torch.nn.Module, device: torch.device, offload: bool = False) -> None:
    """Allocate this process's shards (uninitialised; in host memory with `offload`) and put back every model's
    build-time buffers, on `device`."""
    root.to_empty(device=torch.device("cpu") if offload else device)
    with torch.no_grad():
        for model in root.modules():
            saved = getattr(model, "_align_buffers", None)
            if saved:
                for name, buf in list(model.named_buffers()):
                    if name in saved:
                        owner, _, leaf = name.rpartition(".")
                        module = model.get_submodule(owner) if owner else model
                        module._buffers[leaf] = saved[name].to(device=device, dtype=buf.dtype)


def load(
    name_or_path: str,
    precision: str,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    adapter=None,
    offload: bool = False,
):
    """A causal LM that is its own root, sharded over the group and read from its checkpoint shard by shard (build,
    shard_root, materialise on this process's device, load_checkpoint): what a Trainer stage trains under FSDP2,
    or its frozen reference copy. `adapter`: a LoRA config (build); its weights are the caller's to initialise.
    `offload`: its shards in host memory (`shard`)."""
    model = build(
        name_or_path, precision, attn_implementation, trust_remote_code, adapter=adapter, offload=offload
    )
    shard_root(model, offload)
    materialise(model, align_dist.device(), offload)
    load_checkpoint(model)
    return model


def _without_tied(model, state: dict) -> dict:
    """A state dict without the key of a tied head (a checkpoint stores it once, under the input embeddings)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is embed.weight:
        name = next(n for n, m in model.named_modules() if m is head)
        state.pop(f"{name}.weight", None)
    return state


def _checkpoint_names(model, state: dict) -> dict:
    """A PEFT model's base weights under the names its checkpoint gives them (no `base_model.model.` prefix, no
    `.base_layer`), its adapter's weights left out (they are new)."""
    if not hasattr(model, "peft_config"):
        return state
    return {
        k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
        for k, v in state.items()
        if ".lora_" not in k
    }


def load_checkpoint(model, folder: Path | str | None = None, skip: tuple[str, ...] = ()) -> None:
    """Fill this process's shards of `model` (from `build`, materialised) from a transformers checkpoint's safetensors
    files, reading only the slices it holds; the weights named with a prefix in `skip` (a new head), and a PEFT
    model's adapter, are the caller's to set."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    folder = Path(folder or model._align_source)
    if not list(folder.glob("*.safetensors")):
        raise UserError(f"{folder}: sharded loading reads safetensors files, and this checkpoint has none")
    state = _checkpoint_names(model, _without_tied(model, get_model_state_dict(model)))
    state = {k: v for k, v in state.items() if not k.startswith(skip)} if skip else state
    with loading(f"model {folder}"):
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(folder)))


def save_state(folder: Path, root: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Model (and optimizer) state, sharded: every process writes its own file (DCP), nothing is gathered."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(root, optimizer if optimizer is not None else [])
    state = {"model": model_state} | ({"optim": optim_state} if optimizer is not None else {})
    dcp.save(state, checkpoint_id=str(folder))


def load_state(folder: Path, root: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Read back what `save_state` wrote, into the same sharding (each process its own file)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(root, optimizer if optimizer is not None else [])
    state = {"model": model_state} | ({"optim": optim_state} if optimizer is not None else {})
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(
        root, optimizer if optimizer is not None else [], model_state_dict=state["model"],
        optim_state_dict=state.get("optim", {}),
    )  # fmt: skip


def save_consolidated(model, target: Path, tokenizer=None) -> None:
    """`target` as a plain transformers checkpoint (safetensors, config.json, tokenizer), written from the shards
    slice by slice (every process writes its shards, then they are joined on disk), swapped in whole."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    staging = Path(str(target) + ".shards")
    if align_dist.is_main() and staging.exists():
        shutil.rmtree(staging)
    align_dist.barrier()
    state = _without_tied(model, get_model_state_dict(model))
    writer = HuggingFaceStorageWriter(str(staging), save_distributed=True, enable_consolidation=True)
    dcp.save(state, storage_writer=writer)
    dist.barrier()
    if align_dist.is_main():

        def write(p: Path) -> None:
            p.mkdir(parents=True, exist_ok=True)
            for f in staging.iterdir():
                if f.is_file():
                    shutil.move(str(f), p / f.name)
            index = p / "model.safetensors.index.json"
            files = sorted(p.glob("*.safetensors"))
            if len(files) == 1 and index.exists():  # one file: the name transformers looks for first
                files[0].rename(p / "model.safetensors")
                index.unlink()
            elif index.exists():
                json.loads(index.read_text())  # written by DCP; read once to fail here rather than on load
            save_model_files(model, p, tokenizer)

        replace_dir(write, Path(target))
        shutil.rmtree(staging, ignore_errors=True)
    align_dist.barrier()


def save_adapter(model, target: Path, tokenizer=None, **save_kwargs) -> None:
    """A sharded PEFT model's adapter folder (adapter_config.json, adapter_model.safetensors): each trainable weight
    gathered whole in turn (a collective, every process in the same order; the adapter is small), written by the
    main process, swapped in whole. The frozen base stays sharded."""
    full = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            value = p.full_tensor() if hasattr(p, "full_tensor") else p
            if align_dist.is_main():
                full[name] = value.detach().cpu().contiguous()
    if align_dist.is_main():

        def write(p: Path) -> None:
            model.save_pretrained(p, state_dict=full, **save_kwargs)
            if tokenizer is not None:
                tokenizer.save_pretrained(p)

        replace_dir(write, Path(target))
    align_dist.barrier()
