"""Trainer plumbing the training stages share: the common TrainingArguments and the callbacks.

Each stage still reads top to bottom; this only keeps the same dozen lines from being written three times.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def trainer_kwargs(t, out: Path, precision: str, has_eval: bool, batch_size: int) -> dict[str, Any]:
    """TrainingArguments fields every stage sets the same way, from its train settings `t`."""
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
        "disable_tqdm": True,  # rich progress instead
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
    }


# Callbacks appended to every stage's Trainer (for applications that embed align, and the benchmarks' timers).
EXTRA_CALLBACKS: list = []


def callbacks(out: Path, t) -> list:
    """Rich progress, metrics.jsonl, a clean stop after `t.stop_after_steps`, and TensorBoard under out/logs."""
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
    if "tensorboard" in t.report_to:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        cbs.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(out / "logs"))))
    return cbs + EXTRA_CALLBACKS
