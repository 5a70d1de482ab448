"""`align reward`: a scalar reward model from K-wise human rankings.

Reads top to bottom: losses (pure functions), data, model, train, evaluate + gate, write the artifact; then the
scorer that PPO and the gates use.

Why K-wise: InstructGPT (Ouyang et al. 2022, sec. 3.5) keeps all C(K,2) comparisons of one prompt in one batch
element, with one forward pass per response: K forwards instead of 2*C(K,2) when pairs are shuffled apart
(4 instead of 12 for K=4), and less overfitting because each completion is seen once per epoch. All K responses
of a micro-batch go through the model as one padding-free row, and the reward is read from each response's last
token. With `sdpa_segments` (the default) a group's prompt is computed once and its K responses branch off it
(core/packing.py `pack_shared_prefix`): K x (prompt + response) tokens become prompt + K x response. Other
kernels get restarting positions and a block-diagonal causal mask, each response with its own copy of the prompt.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import sharded
from core.config import UserError, printable
from core.manifest import (
    atomic_write_json,
    require_complete,
)
from core.models import (
    init_lora,
    load_tokenizer,
    mark_stacked_adapter,
    model_identity,
)
from core.stage import StageContext, StageResult, console, print_skipped, print_verdict
from data_schemas.config import RewardConfig
from data_schemas.gates import GateResult
from eval.gates import run_gate
from eval.reward_gate import decide_reward_gate, pairwise_metrics
from lib import trainer as plumbing  # Trainer plumbing the Trainer stages share
from lib.artifacts import Start
from lib.merge import MERGED_START
from lib.rankings import implied_pairs_of, kwise_of_pair, read_pairs
from lib.reward_losses import REWARD_LOSSES, centering_penalty, reward_loss
from lib.reward_model import (
    GroupCollator,
    build_reward_model,
    build_sharded_reward_model,
    encode_response,
    reward_adapter,
    reward_start,
    score_groups,
    sequence_rewards,
)
from stages.registry import STAGES


def encode_groups(tokenizer, rows: list[dict], max_length: int, counts: dict) -> list[dict]:
    out = []
    for r in rows:
        seqs = []
        for resp in r["responses"]:
            ids, cut = encode_response(tokenizer, r["prompt"], resp, max_length)
            counts["truncated_sequences"] = counts.get("truncated_sequences", 0) + int(cut)
            seqs.append(ids)
        out.append(
            {
                "seqs": seqs,
                "tiers": r["tiers"],
                "agreement": r.get("agreement"),
                "annotators": r.get("annotators", 1),
                "lengths": [len(x) for x in r["responses"]],
            }
        )
    return out


def as_pair_examples(groups: list[dict]) -> list[dict]:
    """Bradley-Terry view: every implied pair becomes its own two-sequence example (how pair trainers see it)."""
    out = []
    for g in groups:
        for a, b in implied_pairs_of(g["tiers"]):
            out.append(
                {
                    "seqs": [g["seqs"][a], g["seqs"][b]],
                    "tiers": [[0], [1]],
                    "agreement": g["agreement"],
                    "annotators": g["annotators"],
                    "lengths": [g["lengths"][a], g["lengths"][b]],
                }
            )
    return out


def _plots(groups, rewards, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    preds, labels = [], []
    for g, r in zip(groups, rewards, strict=True):
        for a, b in implied_pairs_of(g["tiers"]):
            p = 1 / (1 + math.exp(-(r[a] - r[b])))
            preds += [p, 1 - p]
            labels += [1, 0]
    bins = [[] for _ in range(10)]
    for p, y in zip(preds, labels, strict=True):
        bins[min(int(p * 10), 9)].append((p, y))
    xs = [sum(p for p, _ in b) / len(b) for b in bins if b]
    ys = [sum(y for _, y in b) / len(b) for b in bins if b]
    ns = [len(b) for b in bins if b]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    ax1.plot([0, 1], [0, 1], "--", color="#999", label="perfect calibration")
    ax1.scatter(
        xs, ys, s=[10 + 200 * n / max(ns) for n in ns], color="#3b6ea8", label="held-out pairs (size = count)"
    )
    ax1.plot(xs, ys, color="#3b6ea8")
    ax1.set_xlabel("predicted P(first preferred) = sigmoid(r1 - r2)")
    ax1.set_ylabel("empirical share preferred by annotators")
    ax1.set_title("Reward calibration")
    ax1.legend(fontsize=8)
    best = [r[i] for g, r in zip(groups, rewards, strict=True) for i in g["tiers"][0]]
    rest = [r[i] for g, r in zip(groups, rewards, strict=True) for t in g["tiers"][1:] for i in t]
    ax2.hist(
        [best, rest],
        bins=30,
        label=["top-ranked responses", "lower-ranked responses"],
        color=["#3b8a4a", "#b35a3b"],
    )
    ax2.set_xlabel("reward")
    ax2.set_title("Reward distribution (held out)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "calibration.png")
    plt.close(fig)


# ==========================================================================================================
# The stage
# ==========================================================================================================
def _load_kwise(cfg: RewardConfig):
    """(train, held-out) K-wise group rows: the preferences folder's kwise/ splits, or pairs_file's pairs."""
    from datasets import load_from_disk

    if cfg.data.pairs_file is not None:
        train, val, report = read_pairs(cfg.data.pairs_file, cfg.data.validation_fraction, cfg.train.seed)
        print_skipped(report.problems)
        groups = [kwise_of_pair(x) for x in train], [kwise_of_pair(x) for x in val]
        return groups[0][: cfg.data.max_groups], groups[1][: cfg.data.max_eval_groups]
    folder = Path(cfg.data.preferences_dir)
    require_complete(folder, "preferences")
    try:
        ds = load_from_disk(str(folder / "kwise"))
    except (FileNotFoundError, ValueError) as e:
        raise UserError(
            f"{folder}: no kwise/ dataset ({e}); build it with `align data build-preferences`"
        ) from None
    if "train" not in ds:
        raise UserError(f"{folder}/kwise: has no train split")
    train = list(ds["train"])[: cfg.data.max_groups]
    val = list(ds["validation"])[: cfg.data.max_eval_groups] if "validation" in ds else []
    return train, val


@dataclass
class HeldOut:
    """Held-out rewards scored at one global step, and what was logged for them."""

    step: int
    rewards: list[list[float]]
    logged: dict[str, float]


def _trainer_class(cfg: RewardConfig, eval_groups: list[dict]):
    from transformers import Trainer

    t = cfg.train
    objective = REWARD_LOSSES[t.loss]

    class RewardTrainer(plumbing.FSDP2Accelerator, Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            r = sequence_rewards(model, inputs)
            loss = objective.fn(r, inputs, t.margin)
            if t.center_rewards_coefficient:
                loss = loss + centering_penalty(r, t.center_rewards_coefficient)
            return (loss, r) if return_outputs else loss

        heldout: HeldOut | None = None  # the last held-out scoring: read it with heldout_rewards()

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            # The Trainer may ask twice at the last step (step end and epoch end), and the stage needs the same
            # held-out rewards after training: score once per global step (it costs minutes on a CPU).
            if not eval_groups:
                return {}
            step = self.state.global_step
            if self.heldout is not None and self.heldout.step == step:
                return self.heldout.logged
            rewards = score_groups(self.model, eval_groups)
            m = pairwise_metrics(eval_groups, rewards)
            logged = {
                f"{metric_key_prefix}_accuracy": m["accuracy"],
                f"{metric_key_prefix}_reward_mean": m["reward_mean"],
                f"{metric_key_prefix}_reward_std": m["reward_std"],
            }
            self.heldout = HeldOut(step, rewards, logged)
            self.log(logged)
            # as Trainer.evaluate does: callbacks see the held-out metrics (early stopping watches them)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, logged)
            self.model.train()
            return logged

        def heldout_rewards(self) -> list[list[float]]:
            """Every held-out response's reward at the current step (scored now unless already scored)."""
            if not eval_groups:
                return []
            if self.heldout is None or self.heldout.step != self.state.global_step:
                self.evaluate()
            return self.heldout.rewards

    return RewardTrainer


def run(cfg: RewardConfig, resume: bool = False, force: bool = False, callbacks=()) -> StageResult:
    reward_loss(cfg.train.loss)  # a name that is no row of the loss table is said before any model loads
    ctx = StageContext(cfg, resume, force, STAGES[cfg.stage], callbacks)
    if ctx.finished:
        return ctx.existing_result()

    # 1. Data
    start = reward_start(cfg)
    tokenizer = load_tokenizer(start.model)
    train_examples, eval_groups = load_data(cfg, tokenizer, ctx.counts)

    # 2. Model, 3. Train, 4. Evaluate, gate, write
    d = cfg.data
    parents = ([Path(d.preferences_dir)] if d.preferences_dir else []) + start.parents
    inputs = [(d.pairs_file, "pairs")] if d.pairs_file else []
    adapter = "adapter" if cfg.lora.enabled else None
    with ctx.open(
        inputs=inputs, parents=parents, model=model_identity(start.model, ctx.precision, adapter=adapter)
    ):
        trainer, result, paused = train(cfg, ctx, tokenizer, train_examples, eval_groups)
        if paused:
            return ctx.paused()
        metrics = save(ctx, trainer, result, tokenizer, eval_groups, start)
        if not ctx.is_main:
            return ctx.complete(metrics)  # the main process gates and writes; this one returns its result
        gate = run_gate("reward", ctx.out, None, cfg.gate, ctx.out / "gates" / "reward", _gate(metrics, cfg))
        print_verdict(
            "reward",
            ctx.out,
            gate,
            f"held-out accuracy {metrics.get('accuracy', float('nan')):.3f} "
            f"(length baseline {metrics.get('length_baseline_accuracy', float('nan')):.3f})",
        )
        return ctx.complete(metrics, gates=[gate])


def load_data(cfg: RewardConfig, tokenizer, counts: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """(training examples, held-out groups): K-wise groups (or their pairs, for bradley_terry) as token ids."""
    train_rows, val_rows = _load_kwise(cfg)
    train_groups = encode_groups(tokenizer, train_rows, cfg.data.max_length, counts)
    eval_groups = encode_groups(tokenizer, val_rows, cfg.data.max_length, counts)
    train_examples = (
        as_pair_examples(train_groups) if REWARD_LOSSES[cfg.train.loss].pairwise else train_groups
    )
    counts.update(
        {
            "train_groups": len(train_groups),
            "train_examples": len(train_examples),
            "eval_groups": len(eval_groups),
            "train_pairs": sum(len(implied_pairs_of(g["tiers"])) for g in train_groups),
            "eval_pairs": sum(len(implied_pairs_of(g["tiers"])) for g in eval_groups),
        }
    )
    if not train_examples:
        raise UserError(
            f"{cfg.data.preferences_dir or cfg.data.pairs_file}: no training groups with a preference"
        )
    console.print(
        f"data: {counts['train_groups']} groups ({counts['train_pairs']} pairs) to train, "
        f"{counts['eval_groups']} groups ({counts['eval_pairs']} pairs) held out; "
        f"{counts.get('truncated_sequences', 0)} sequences cut from the left to {cfg.data.max_length} tokens"
    )
    return train_examples, eval_groups


def train(
    cfg: RewardConfig, ctx: StageContext, tokenizer, train_examples: list[dict], eval_groups: list[dict]
):
    """(trainer, train result, paused): the scalar-head model (LoRA on the trunk, full head) trained on groups."""
    from peft import get_peft_model
    from transformers import TrainingArguments

    t = cfg.train
    args = (
        TrainingArguments(  # before the model: a ZeRO-3 config registered here partitions it as it is created
            **plumbing.trainer_kwargs(
                t,
                ctx.out,
                ctx.precision,
                bool(eval_groups),
                t.groups_per_batch,
                ("eval_accuracy", True),
                run_name=ctx.run_name,
            )
        )
    )
    name = printable(str(cfg.init_from or cfg.model.name_or_path))
    if t.sharding == "fsdp2":  # 1/N of every weight per process, read shard by shard (core/sharded.py)
        console.print(
            f"model: {name} in {ctx.precision}, {sharded.described(t.cpu_offload)}", highlight=False
        )
        if ctx.is_main and not ctx.resume:  # a merged start left by an earlier run may be another start's
            shutil.rmtree(ctx.out / MERGED_START, ignore_errors=True)
        model = build_sharded_reward_model(
            cfg, tokenizer, ctx.precision, ctx.out
        )  # LoRA on it (lora.enabled)
    else:
        # partitioned where nothing needs the weights whole: a start to merge, PEFT's copy of the head (LoRA)
        zero3 = plumbing.zero3_init(args) and not (cfg.lora.enabled or reward_start(cfg).merge)
        how = ", partitioned as it is created (ZeRO-3)" if zero3 else ""
        console.print(f"model: {name} in {ctx.precision}{how}", highlight=False)
        model = build_reward_model(cfg, tokenizer, ctx.precision, partitioned=zero3)
        if cfg.lora.enabled:
            model = get_peft_model(model, reward_adapter(cfg))
            if cfg.peft.method == "lora":  # the adapter FSDP2 draws: the same start however the model is held
                init_lora(model, t.seed)
    trainer = _trainer_class(cfg, eval_groups)(
        model=model,
        args=args,
        **plumbing.trainer_datasets(train_examples, eval_groups),  # held out: scored by our evaluate()
        data_collator=GroupCollator.for_kernel(
            model.config._attn_implementation,
            max_row_tokens=max(cfg.data.max_length, 1024),
            pad_token_id=tokenizer.pad_token_id,
        ),
        callbacks=plumbing.stage_callbacks(ctx, cfg),
    )
    result, paused = plumbing.train_with_resume(trainer, ctx.out, ctx.resume, t.stop_after_steps)
    if ctx.is_main and not paused:  # every process read its shards of it before training
        shutil.rmtree(ctx.out / MERGED_START, ignore_errors=True)
    return trainer, result, paused


def save(
    ctx: StageContext, trainer, result, tokenizer, eval_groups: list[dict], start: Start
) -> dict[str, Any]:
    """Held-out metrics, calibration plot, every held-out reward, the adapter (model/ when trained full-parameter),
    metrics.json."""
    out, state = ctx.out, trainer.state
    eval_rewards = trainer.heldout_rewards()
    metrics = pairwise_metrics(eval_groups, eval_rewards) if eval_groups else {"pairs": 0}
    metrics.update(plumbing.training_summary(trainer, result, ctx.precision))
    folder = "adapter" if ctx.cfg.lora.enabled else "model"
    plumbing.save_trained(trainer, out / folder, tokenizer)  # every process (ZeRO-3 gathers)
    if not ctx.is_main:
        return metrics
    if (
        start.merge and ctx.cfg.lora.enabled
    ):  # trained on the SFT-merged trunk: its config must not name the raw base
        mark_stacked_adapter(
            out / "adapter", [os.path.relpath(a.resolve(), out.resolve()) for a in start.merge]
        )
    if eval_groups:
        _plots(eval_groups, eval_rewards, out)
        # every held-out reward, in the validation split's order: reviewers and benchmarks can audit any pair
        atomic_write_json(out / "heldout_rewards.json", eval_rewards)
    atomic_write_json(out / "metrics.json", {**metrics, "log_history": state.log_history})
    return metrics


def _gate(metrics: dict[str, Any], cfg: RewardConfig):
    def evaluate(gate_dir: Path) -> GateResult:
        r = decide_reward_gate(metrics, cfg.gate)
        if (
            gate_dir.parent.parent / "calibration.png"
        ).exists():  # a copy: reports read only their own folder
            shutil.copyfile(gate_dir.parent.parent / "calibration.png", gate_dir / "calibration.png")
            r.images = ["calibration.png"]
        return r

    return evaluate
