"""Several processes, one artifact: what a stage needs to know about the launch it runs in.

align does not launch processes itself beyond `--num-processes` (which hands the command to torchrun's own
launcher, align/launch.py): it runs under the launchers users already trust (torchrun, `accelerate launch`,
DeepSpeed's), which set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR. Everything here reads that environment:

- one process group for the whole run, created by accelerate's `PartialState` (the object the transformers
  Trainer uses too, so Trainer stages and PPO share it): gloo on CPUs, NCCL on GPUs;
- `is_main()`: the one process that writes manifests, configs, logs, gates and reports; the others compute;
- `barrier()` / `broadcast()`: the main process prepares or decides, the others wait for it and learn the result;
- `device()`: this process's accelerator (cuda:LOCAL_RANK), or the CPU.

A single process (no launcher) never creates a process group: every helper degrades to a no-op.
"""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

# Long enough for the main process to run a stage's gates (minutes on a CPU, longer on 70B) while the others
# wait at the closing barrier; override with ALIGN_DIST_TIMEOUT_S.
TIMEOUT_S = int(os.environ.get("ALIGN_DIST_TIMEOUT_S", str(4 * 3600)))


def launched() -> bool:
    """True under a multi-process launcher (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def state():
    """accelerate's PartialState for this launch, created once (it initialises the process group: gloo with
    `cpu=True` on machines without CUDA, which is also what the Trainer asks for through `use_cpu`)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=TIMEOUT_S))


def init() -> None:
    """Create the process group now when launched (a no-op otherwise). Stages call it first, so that every
    collective below has a group, and the Trainer later reuses it."""
    if launched():
        state()


def close() -> None:
    """Take the process group down before the interpreter exits (a no-op without one): left to the interpreter's
    teardown, the group's threads can end the process with `terminate called without an active exception` after
    the stage has finished and written everything."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        with contextlib.suppress(Exception):  # a peer already gone changes nothing here: the work is done
            torch.distributed.destroy_process_group()


def fresh_stage() -> None:
    """Forget the engine a previous stage in this process chose (a DPO Trainer under DeepSpeed leaves accelerate's
    AcceleratorState and transformers' ZeRO config behind, and the next stage's Accelerator would silently wrap
    its model in that DeepSpeed engine). The process group stays."""
    import sys

    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState, PartialState
        from accelerate.utils import DistributedType

        AcceleratorState._reset_state(reset_partial_state=False)
        # a DeepSpeed Trainer also marks the shared process state as DEEPSPEED; the process group is a plain one
        shared = PartialState._shared_state
        if shared and shared.get("distributed_type") == DistributedType.DEEPSPEED:
            cuda = torch.cuda.is_available()
            shared["distributed_type"] = DistributedType.MULTI_GPU if cuda else DistributedType.MULTI_CPU
    if "transformers.integrations.deepspeed" in sys.modules:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def world_size() -> int:
    return torch.distributed.get_world_size() if _active() else 1


def rank() -> int:
    return torch.distributed.get_rank() if _active() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0


def is_main() -> bool:
    return rank() == 0


_solo = False


def _active() -> bool:
    return not _solo and torch.distributed.is_available() and torch.distributed.is_initialized()


@contextlib.contextmanager
def solo() -> Iterator[None]:
    """Work the main process does alone inside a multi-process run (a data stage, a gate): every helper here acts
    as in a single process, so nothing in it waits for processes that are not taking part."""
    global _solo
    before, _solo = _solo, True
    try:
        yield
    finally:
        _solo = before


def barrier() -> None:
    if _active() and world_size() > 1:
        torch.distributed.barrier()


def broadcast(obj: Any) -> Any:
    """The main process's `obj`, on every process (picklable objects of align's own making only: never data read
    from a file without validation)."""
    if not (_active() and world_size() > 1):
        return obj
    box = [obj if is_main() else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def peak_memory_gib() -> float:
    """This process's peak memory since it started or since `reset_peak_memory`: the accelerator's allocated peak on
    CUDA, the resident set's high-water mark on CPU (/proc/self/status VmHWM, else getrusage's lifetime peak)."""
    if device().type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def capacity(dev: str) -> float | None:
    """Memory free for this process's models on `dev` in bytes: the GPU's free memory, or the host's MemAvailable;
    None where it cannot be read."""
    if dev.startswith("cuda"):
        # planning for a GPU from a machine without one: the estimate, but no free memory to compare it with
        return float(torch.cuda.mem_get_info()[0]) if torch.cuda.is_available() else None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def memory_cap() -> float | None:
    """This process's hard memory limit in bytes: its cgroup's (v2 `memory.max`, v1 `memory.limit_in_bytes`), the
    smallest where several apply; None without one (a limit past 2^60 bytes is the kernel's "none")."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    caps = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            files = [Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max"]
        elif "memory" in controllers.split(","):
            files = [Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"]
        else:
            continue
        for f in files:
            try:
                text = f.read_text().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < 2**60:
                caps.append(float(text))
    return min(caps) if caps else None


def reset_peak_memory() -> None:
    """Start `peak_memory_gib` again from what this process holds now (CUDA's peak statistics; on Linux the resident
    set's high-water mark, by writing 5 to /proc/self/clear_refs), so that a later part of a run is measured alone."""
    if device().type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def all_gather(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order (a one-element list in a single process)."""
    if not (_active() and world_size() > 1):
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over processes (a copy; `x` itself is unchanged)."""
    y = x.detach().clone()
    if _active() and world_size() > 1:
        torch.distributed.all_reduce(y, op=torch.distributed.ReduceOp.SUM)
    return y


def device() -> torch.device:
    """This process's device: cuda:LOCAL_RANK when CUDA is there, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def unwrap(model):
    """The module inside DDP / DeepSpeed wrappers (the model itself when it has none)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def shard(n: int) -> range:
    """This process's contiguous block of `n` items (n must divide evenly; callers check and say so)."""
    w, r = world_size(), rank()
    size = n // w
    return range(r * size, (r + 1) * size)
