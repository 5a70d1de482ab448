"""Trainer plumbing the Trainer stages (SFT, reward, DPO) share: TrainingArguments from the shared
TrainerSettings, the callbacks (the stage contract's hooks among them; `LoopHooks` calls them from PPO's own loop),
resume, and saving. The SFT artifact the other stages build on is lib/artifacts.py.

Each stage still reads top to bottom (core/stage.py is the contract around it); this only keeps the same dozen
lines from being written three times.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from core import dist, sharded
from core import zero3 as ds_zero3
from core.config import UserError


def trainer_kwargs(
    t,
    out: Path,
    precision: str,
    has_eval: bool,
    batch_size: int,
    best: tuple[str, bool] = ("eval_loss", False),
    run_name: str | None = None,
) -> dict[str, Any]:
    """TrainingArguments fields every stage sets the same way, from its TrainerSettings `t`. `best` is the held-out
    metric early stopping watches and whether greater is better; `run_name` names the trackers' run (the stage and
    its artifact key: `StageContext.run_name`)."""

    stopping = t.early_stopping_patience is not None
    if stopping and not has_eval:
        raise UserError("train.early_stopping_patience needs held-out data (this run has none)")
    return {
        "output_dir": str(out / "checkpoints"),
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler_type,
        "warmup_steps": t.warmup_ratio,  # transformers 5: a float < 1 is a ratio of total steps
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "num_train_epochs": t.num_train_epochs,
        "max_steps": t.max_steps,
        "logging_steps": t.logging_steps,
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": t.eval_steps,
        "save_strategy": "steps",
        "save_steps": t.save_steps,
        "save_total_limit": t.save_total_limit,
        "seed": t.seed,
        "data_seed": t.seed,
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        # TensorBoard is wired by `callbacks` (its folder is the artifact's logs/); others go through transformers
        "report_to": [r for r in t.report_to if r not in ("tensorboard", "none")] or "none",
        "run_name": run_name,
        "disable_tqdm": True,  # rich progress instead
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": torch.cuda.is_available(),  # pinned host memory only helps copies to a GPU
        # Without CUDA, accelerate builds a multi-process (gloo) state only when told it is on the CPU; left False,
        # a 2-process launch would train as two unsynchronised single processes.
        "use_cpu": not torch.cuda.is_available(),
        "gradient_checkpointing": t.gradient_checkpointing,
        "deepspeed": str(t.deepspeed) if t.deepspeed is not None else None,
        **fsdp2_arguments(t),
        "ddp_timeout": dist.TIMEOUT_S,  # the main process may gate while the others wait
        "load_best_model_at_end": stopping,
        "metric_for_best_model": best[0] if stopping else None,
        "greater_is_better": best[1] if stopping else None,
    }


# accelerate's FSDP2 plugin as train.sharding=fsdp2 uses it: checkpoints per process (DCP: resume gathers nothing);
# no loading of its own (the model arrives sharded and loaded by core.sharded.load, so accelerate wraps nothing)
FSDP2_CONFIG = {"version": 2, "state_dict_type": "SHARDED_STATE_DICT", "reshard_after_forward": True,
                "cpu_ram_efficient_loading": False}  # fmt: skip


def fsdp2_arguments(t) -> dict[str, Any]:
    """TrainingArguments fields of train.sharding=fsdp2 in several processes (transformers refuses `fsdp` in one:
    there `FSDP2Accelerator` sets the same plugin up itself)."""
    if getattr(t, "sharding", "ddp") != "fsdp2" or dist.world_size() < 2:
        return {}
    return {"fsdp": True, "fsdp_config": fsdp2_config(bool(getattr(t, "cpu_offload", False)))}


def fsdp2_config(offload: bool) -> dict[str, Any]:
    """The plugin's settings: FSDP2_CONFIG, with the CPU offload the model's units were sharded with
    (core.sharded; train.cpu_offload), so that accelerate is told what FSDP2 does."""
    return dict(FSDP2_CONFIG, cpu_offload=offload)


class FSDP2Accelerator:
    """Mixed in before a stage's Trainer class: when the model arrives sharded (an FSDP2 module from
    core.sharded.load), the Trainer's accelerate state is FSDP2 wherever accelerate would not make it so itself.
    accelerate turns its FSDP plugin on only for GPU-like devices in several processes; on CPUs (gloo) it would wrap
    the sharded model in DDP, and in one process leave it be. With the state set, the Trainer takes accelerate's
    FSDP2 paths: the model passes through, gradients are reduce-scattered by FSDP2 itself, checkpoints are DCP files
    per process."""

    def create_accelerator_and_postprocess(self):
        from torch.distributed.fsdp import FSDPModule

        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if not isinstance(self.model, FSDPModule) or getattr(state, "fsdp_plugin", None) is not None:
            return
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        config = fsdp2_config(sharded.offloaded(self.model))
        state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, **{k: v for k, v in config.items() if k != "version"}
        )
        state.distributed_type = DistributedType.FSDP
        self.is_fsdp_enabled = True


def zero3_init(args) -> bool:
    """True when the Trainer's model is to be created partitioned: `args` (TrainingArguments, built before the model
    and kept alive) carry a ZeRO-3 config, which registers it with transformers, and several processes run. Then
    `from_pretrained` builds the model under DeepSpeed's zero.Init (each parameter partitioned as it is created,
    the checkpoint read file by file into the partitions), so no process holds it whole before DeepSpeed wraps it.
    DeepSpeed's communication is set up on the running process group first: its config reads the world size there."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not (args.deepspeed and is_deepspeed_zero3_enabled() and dist.world_size() > 1):
        return False
    import deepspeed

    _ = args.device  # the Trainer's process group (accelerate's state)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return True


def callbacks(out: Path, t, extra=()) -> list:
    """Rich progress, metrics.jsonl, a clean stop after `t.stop_after_steps`, TensorBoard under out/logs, and the
    caller's own hooks (`extra`: the stage contract's `callbacks`, e.g. a sweep's pruning or a benchmark's timer)."""
    from transformers import TrainerCallback
    from trl.trainer.callbacks import RichProgressCallback

    stop_after = t.stop_after_steps

    class MetricsFile(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs:
                with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    class StopAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if stop_after is not None and state.global_step >= stop_after:
                control.should_save = True
                control.should_training_stop = True

    cbs = [RichProgressCallback(), MetricsFile(), StopAfter()]
    if t.early_stopping_patience is not None:
        from transformers import EarlyStoppingCallback

        cbs.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    if "tensorboard" in t.report_to and dist.is_main():
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        cbs.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(out / "logs"))))
    return cbs + list(extra)


def stage_callbacks(ctx, cfg, extra=()) -> list:
    """Every callback of a Trainer stage's Trainer: align's own (`callbacks`), the stage contract's hooks
    (`ctx.callbacks`), AdaLoRA's budget where the adapter is AdaLoRA, and the stage's `extra`."""
    return [
        *callbacks(ctx.out, cfg.train, ctx.callbacks),
        *adalora_callbacks(cfg),
        tracking_callback(ctx),
        *extra,
    ]


def tracking_callback(ctx):
    """At train begin, after transformers' integrations have opened their runs (they come first among the
    Trainer's callbacks), align's record goes into them (core/trackers.py)."""
    from transformers import TrainerCallback

    class AlignRecord(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            ctx.begin_tracking()

    return AlignRecord()


def trainer_datasets(train: list[dict], held_out: list[dict]) -> dict[str, Any]:
    """The Trainer's train_dataset and eval_dataset (None without held-out rows) from tokenized rows."""
    from datasets import Dataset

    return {
        "train_dataset": Dataset.from_list(train),
        "eval_dataset": Dataset.from_list(held_out) if held_out else None,
    }


def adalora_callback():
    """AdaLoRA re-allocates its rank budget from the gradients' importance after every optimizer step, before the
    gradients are cleared (PEFT: `update_and_allocate(global_step)`)."""
    from transformers import TrainerCallback

    class AdaLoraBudget(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, **kw):
            dist.unwrap(model).base_model.update_and_allocate(state.global_step)

    return AdaLoraBudget()


def adalora_callbacks(cfg) -> list:
    """[the AdaLoRA budget callback] when the stage's adapter is AdaLoRA, else []."""
    on = cfg.lora.enabled and cfg.peft.method == "adalora"
    return [adalora_callback()] if on else []


def checkpoint_state(folder: Path) -> dict[str, Any] | None:
    """The TrainerState of a whole checkpoint, or None. The Trainer writes trainer_state.json last (after the
    weights, optimizer, scheduler, scaler and RNG states), so a folder whose state parses and names its own step is
    whole; a process killed (or a disk filled) while writing one leaves it without, or with a torn one."""
    try:
        state = json.loads((Path(folder) / "trainer_state.json").read_text(encoding="utf-8"))
        step = int(Path(folder).name.rsplit("-", 1)[1])
    except (OSError, ValueError, IndexError):
        return None
    return state if isinstance(state, dict) and state.get("global_step") == step else None


def latest_checkpoint(ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """(folder, state) of the latest whole checkpoint. Incomplete ones are moved aside (`.incomplete-checkpoint-N`,
    kept for inspection), so that neither the Trainer's own search nor its rotation picks them up again."""
    found = []
    for folder in Path(ckpt_dir).glob("checkpoint-*") if Path(ckpt_dir).is_dir() else []:
        state = checkpoint_state(folder)
        if state is not None:
            found.append((state["global_step"], folder, state))
        elif dist.is_main():
            aside = folder.with_name(f".incomplete-{folder.name}")
            shutil.rmtree(aside, ignore_errors=True)
            folder.rename(aside)
            print(
                f"{folder}: incomplete (its write was interrupted); resuming from the one before",
                file=sys.stderr,
            )
    dist.barrier()
    if not found:
        return None
    _, folder, state = max(found, key=lambda x: x[0])
    return folder, state


def train_with_resume(trainer, out: Path, resume: bool, stop_after: int | None):
    """Run trainer.train (from the latest whole checkpoint when resuming). Returns (result, paused): paused means
    the run stopped at `stop_after` before its last step, so the caller leaves the artifact 'running'.

    A checkpoint at the last step (the run was killed after training, in its gate or while saving) is loaded, not
    trained from: transformers' resume would take one more optimizer step past max_steps."""
    from transformers.trainer_callback import PrinterCallback
    from trl.trainer.callbacks import RichProgressCallback

    trainer.remove_callback(PrinterCallback)  # raw dict prints; rich progress and metrics.jsonl replace it
    latest = latest_checkpoint(out / "checkpoints") if resume else None
    if not resume and dist.is_main():
        (out / "metrics.jsonl").unlink(missing_ok=True)
    if latest is not None and latest[1]["global_step"] >= latest[1].get("max_steps", float("inf")) > 0:
        result = _finished_from_checkpoint(trainer, out, *latest)
    else:
        result = trainer.train(resume_from_checkpoint=str(latest[0]) if latest is not None else None)
    if dist.is_main():
        print(flush=True)  # the rich progress panel leaves its last line open
    trainer.remove_callback(RichProgressCallback)  # its live display is closed once training ends
    state = trainer.state
    early = _early_stopped(trainer)
    if early and dist.is_main():
        metric = str(trainer.args.metric_for_best_model).removeprefix("eval_")
        print(
            f"stopped early at step {state.global_step} of {state.max_steps}: held-out {metric} did not improve "
            f"for {_early_stopping(trainer).early_stopping_patience} evaluations; the best weights "
            f"({state.best_model_checkpoint and Path(state.best_model_checkpoint).name}, {metric} "
            f"{state.best_metric}) are kept",
            file=sys.stderr,
        )
    paused = stop_after is not None and state.global_step < state.max_steps and not early
    if paused and dist.is_main():
        print(
            f"stopped after step {state.global_step} of {state.max_steps}; continue with --resume",
            file=sys.stderr,
        )
    return result, paused


def _finished_from_checkpoint(trainer, out: Path, folder: Path, state: dict[str, Any]):
    """The Trainer as it was at the end of training: the last checkpoint's weights and state, and the training
    loss the finished run logged (metrics.jsonl), else the mean of its logged losses."""
    from transformers import TrainerState
    from transformers.trainer_utils import TrainOutput

    if (
        trainer.is_deepspeed_enabled
    ):  # DeepSpeed restores its engine inside train(): the checkpoint is its input
        return trainer.train(resume_from_checkpoint=str(folder))
    trainer._load_from_checkpoint(str(folder))
    trainer.state = TrainerState.load_from_json(str(folder / "trainer_state.json"))
    loss = None
    if (out / "metrics.jsonl").exists():
        for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                row = json.loads(line)
                if row.get("step") == state["global_step"] and "train_loss" in row:
                    loss = row["train_loss"]
    if loss is None:
        losses = [x["loss"] for x in state.get("log_history", []) if "loss" in x]
        loss = sum(losses) / len(losses) if losses else float("nan")
    print(
        f"training had finished (step {state['global_step']}); its last checkpoint is loaded", file=sys.stderr
    )
    return TrainOutput(state["global_step"], loss, {"train_loss": loss})


def final_eval(trainer) -> dict[str, Any]:
    """Held-out metrics at the last step: the Trainer usually evaluated there already (a held-out pass costs
    minutes on a CPU), so reuse that; evaluate only if it did not."""
    if (
        trainer.args.load_best_model_at_end
    ):  # the weights were swapped for the best checkpoint after that pass
        return trainer.evaluate()
    step = trainer.state.global_step
    last = [x for x in trainer.state.log_history if "eval_loss" in x and x.get("step") == step]
    return last[-1] if last else trainer.evaluate()


def training_summary(trainer, result, precision: str) -> dict[str, Any]:
    """The metrics every Trainer stage reports about its run; with early stopping, whether it stopped early and
    which held-out evaluation's weights were kept (the Trainer restores the best checkpoint)."""
    state = trainer.state
    out: dict[str, Any] = {
        "train_loss": result.training_loss,
        "global_step": state.global_step,
        "max_steps": state.max_steps,
        "precision": precision,
        # training's peak, per process (a collective: every process calls this)
        "peak_memory_gib_per_process": [round(x, 3) for x in dist.all_gather(dist.peak_memory_gib())],
    }
    if trainer.args.load_best_model_at_end:
        out["stopped_early"] = _early_stopped(trainer)
        out["best_step"] = (
            int(state.best_model_checkpoint.rsplit("-", 1)[1]) if state.best_model_checkpoint else None
        )
        out["best_" + str(trainer.args.metric_for_best_model).removeprefix("eval_")] = state.best_metric
    return out


def _early_stopping(trainer):
    """The Trainer's EarlyStoppingCallback, or None."""
    return next(
        (cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "EarlyStoppingCallback"),
        None,
    )


def _early_stopped(trainer) -> bool:
    cb = _early_stopping(trainer)
    return cb is not None and getattr(cb, "early_stopping_patience_counter", 0) >= cb.early_stopping_patience


def zero3(trainer) -> bool:
    """True when the Trainer runs DeepSpeed ZeRO-3 (parameters partitioned: gathering them is collective)."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return bool(trainer.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3)


def fsdp(trainer) -> bool:
    """True when the Trainer runs FSDP (train.sharding=fsdp2: every process holds 1/N of each weight)."""
    return bool(getattr(trainer, "is_fsdp_enabled", False))


def partitioned(trainer) -> bool:
    """True when no process holds the whole trained model (ZeRO-3 or FSDP): what needs the weights whole reads them
    back from the saved artifact."""
    return zero3(trainer) or fsdp(trainer)


def save_trained(trainer, target: Path, tokenizer=None, **save_kwargs) -> None:
    """Write the trained model (the adapter of a PEFT model, all weights otherwise) to `target`, swapped in whole.

    Every process calls it: under FSDP2 each writes its shards and they are joined on disk (core.sharded, nothing
    gathered); under ZeRO-3 a whole model is gathered one weight at a time and written file by file as it fills
    (core.zero3), an adapter's weights are gathered alone (the base stays partitioned); then only the main process
    writes, and the others wait until the folder is in place."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    peft = hasattr(model, "peft_config")
    if fsdp(trainer) and peft:
        sharded.save_adapter(model, target, tokenizer, **save_kwargs)
        return
    if fsdp(trainer):
        sharded.save_consolidated(model, target, tokenizer)
        return
    if zero3(trainer) and not peft:
        ds_zero3.save_consolidated(model, target, tokenizer)
        return
    ds_zero3.save_trainable(model, target, tokenizer, **save_kwargs)  # ZeRO-3: an adapter gathered alone


@contextlib.contextmanager
def compact_lm_head():
    """TRL's fused LM head scores only the positions that have a label on every device, not only Triton ones; and
    on devices without Triton, through align's faster function for a frozen head (lib/lm_head.py).

    TRL (`add_fused_lm_head`) projects only labelled positions through the vocabulary where Triton runs and every
    position elsewhere, because on compiled backends (Neuron) a varying number of rows would recompile. On CPUs
    and CUDA in eager mode that is pure waste: an SFT prompt's tokens carry no label, and the LM head (vocabulary x
    hidden, a fifth of SmolLM2-135M) is the costliest layer per token. Where Triton is missing, TRL's chunked
    function then runs in torch ops that pass over each [tokens x vocabulary] chunk some twenty-five times and
    recompute the logits in backward; `lib.lm_head.LabelledLogProbs` computes the same outputs with the gradient
    in the forward, when the head is frozen and unscaled (`lib.lm_head.labelled_logprobs` chooses). The results
    are the same numbers; the tests are tests/stages/test_sft_batching.py and tests/lib/test_lm_head.py. If TRL
    renames what is patched here, this does nothing and TRL's own path runs."""
    import trl.trainer.utils as trl_utils

    from lib.lm_head import labelled_logprobs

    original = getattr(trl_utils, "_use_triton", None)
    chunked = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if original is None or chunked is None:
        yield
        return

    class Dispatch:
        apply = staticmethod(labelled_logprobs)

    trl_utils._use_triton = lambda device: True
    trl_utils._ChunkedLogProbFunction = Dispatch
    try:
        yield
    finally:
        trl_utils._use_triton = original
        trl_utils._ChunkedLogProbFunction = chunked


class LoopHooks:
    """The stage contract's callbacks (transformers `TrainerCallback`s) at the events of a loop that is not a
    Trainer's (PPO): train begin, each step's end with its logged metrics, evaluation, train end. A hook that sets
    `control.should_training_stop` stops the loop after that step, as it would a Trainer."""

    def __init__(self, callbacks, out: Path, max_steps: int):
        from transformers import TrainerControl, TrainerState

        self.callbacks = list(callbacks)
        # PPO has no TrainingArguments (building one would reset accelerate's state under the running loop): the
        # callbacks get the fields a callback reads of them
        self.args = SimpleNamespace(output_dir=str(out / "checkpoints"), max_steps=max_steps, logging_steps=1)
        self.state = TrainerState(max_steps=max_steps)
        self.state.is_world_process_zero = dist.is_main()
        self.control = TrainerControl()

    def _call(self, event: str, **kw) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self.args, self.state, self.control, **kw)

    def begin(self, step: int) -> None:
        self.state.global_step = step
        self._call("on_train_begin")

    def step(self, step: int, logs: dict[str, Any]) -> bool:
        """After iteration `step`: on_step_end, then on_log with its metrics; True when a hook asks to stop."""
        self.state.global_step = step
        self.state.log_history.append({"step": step, **logs})
        self._call("on_step_end")
        self._call("on_log", logs=logs)
        return bool(self.control.should_training_stop)

    def end(self) -> None:
        self._call("on_train_end")
