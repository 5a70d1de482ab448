"""`align reward`: a scalar reward model from K-wise human rankings.

Reads top to bottom: losses (pure functions), data, model, train, evaluate + gate, write the artifact; then the
scorer that PPO and the gates use.

Why K-wise: InstructGPT (Ouyang et al. 2022, sec. 3.5) keeps all C(K,2) comparisons of one prompt in one batch
element, with one forward pass per response: K forwards instead of 2*C(K,2) when pairs are shuffled apart
(4 instead of 12 for K=4), and less overfitting because each completion is seen once per epoch. All K responses
of a micro-batch go through the model as one padding-free row, and the reward is read from each response's last
token. With `sdpa_segments` (the default) a group's prompt is computed once and its K responses branch off it
(align/packing.py `pack_shared_prefix`): K x (prompt + response) tokens become prompt + K x response. Other
kernels get restarting positions and a block-diagonal causal mask, each response with its own copy of the prompt.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from align import dist
from align.chat import chat_messages, neutralise, special_strings
from align.config import UserError, load_config, printable
from align.manifest import (
    atomic_write_json,
    atomic_write_text,
    refuse_overwriting_input,
    require_complete,
)
from align.models import (
    choose_precision,
    load_causal_lm,
    load_tokenizer,
    model_identity,
    peft_config,
    torch_dtype,
)
from align.packing import SEGMENT_KERNEL, needs_dense_mask, pack, pack_shared_prefix
from align.readers import LoadReport, iter_rows
from align.stage import StageContext, StageResult, console, print_skipped, print_verdict
from data_schemas.config import ModelConfig, RewardConfig
from data_schemas.gates import GateResult
from eval.gates import run_gate
from eval.reward_gate import decide_reward_gate, implied_pairs_of, pairwise_metrics
from stages.common import (
    adalora_callbacks,
    callbacks,
    save_trained,
    train_with_resume,
    trainer_kwargs,
    training_summary,
)


# ==========================================================================================================
# Losses. Shapes: rewards [N] (one per response in the micro-batch); pairs [P, 2] (winner, loser) indices into
# rewards; pair_group [P] the group each pair belongs to; G groups.
# ==========================================================================================================
def kwise_loss(
    rewards: torch.Tensor, pairs: torch.Tensor, pair_group: torch.Tensor, n_groups: int, margin: float = 0.0
) -> torch.Tensor:
    """InstructGPT all-pairs loss (Ouyang et al. 2022, eq. 1), normalised per group:

        loss = -(1/G') sum_g (1/|P_g|) sum_{(w,l) in P_g} log sigmoid(r_w - r_l - m)

    P_g holds every pair of group g whose members sit in different tiers (tied responses form no pair); G' counts
    the groups with at least one pair. With K responses and no ties |P_g| = C(K,2), the paper's 1/C(K,2).
    """
    per_pair = -F.logsigmoid(rewards[pairs[:, 0]] - rewards[pairs[:, 1]] - margin)  # [P]
    sums = torch.zeros(n_groups, dtype=per_pair.dtype, device=per_pair.device).index_add(
        0, pair_group, per_pair
    )
    counts = torch.bincount(pair_group, minlength=n_groups)
    has = counts > 0
    return (sums[has] / counts[has]).mean()


def bradley_terry_loss(rewards: torch.Tensor, pairs: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Bradley-Terry (1952) on independent pairs, with an optional margin (Touvron et al. 2023, Llama 2):

    loss = -(1/P) sum_p log sigmoid(r_chosen - r_rejected - m)
    """
    return -F.logsigmoid(rewards[pairs[:, 0]] - rewards[pairs[:, 1]] - margin).mean()


def plackett_luce_loss(rewards: torch.Tensor, group_tiers: list[list[list[int]]]) -> torch.Tensor:
    """Plackett-Luce listwise loss (Plackett 1975; Luce 1959), with tiers:

        loss_g = -(1/|T_g|) sum_{t < last} sum_{i in tier t} [ r_i - log( e^{r_i} + sum_{j in tiers > t} e^{r_j} ) ]

    For a strict ranking this is the exact negative log-likelihood of the ordering, normalised per term. A tied
    response is only required to beat every response below its tier, never its tie partners. The loss is the
    mean of loss_g over groups with at least one term. `group_tiers[g]` lists tiers of indices into `rewards`.
    """
    losses = []
    for tiers in group_tiers:
        terms = []
        for t, tier in enumerate(tiers[:-1]):
            below = [j for lower in tiers[t + 1 :] for j in lower]
            below_r = rewards[below]
            for i in tier:
                terms.append(rewards[i] - torch.logsumexp(torch.cat([rewards[i : i + 1], below_r]), dim=0))
        if terms:
            losses.append(-torch.stack(terms).mean())
    return torch.stack(losses).mean()


def centering_penalty(rewards: torch.Tensor, coefficient: float) -> torch.Tensor:
    """Auxiliary loss coefficient * mean(r^2) that keeps rewards centred on 0 (Eisenstein et al. 2023)."""
    return coefficient * rewards.pow(2).mean()


# ==========================================================================================================
# Data
# ==========================================================================================================
def encode_response(tokenizer, prompt: list[dict], response: str, max_length: int) -> tuple[list[int], bool]:
    """Token ids of prompt + response through the chat template. Longer sequences are cut from the left, so the
    response's end, where the reward is read, is always kept; returns (ids, truncated)."""

    specials = special_strings(tokenizer)
    msgs = [{"role": m["role"], "content": neutralise(m["content"], specials)} for m in prompt]
    msgs.append({"role": "assistant", "content": neutralise(response, specials)})
    ids = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    if len(ids) > max_length:
        return ids[-max_length:], True
    return ids, False


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


@dataclass
class GroupCollator:
    """All responses of the micro-batch's groups, packed (align/packing.py): into one row for the segment kernels,
    into rows of at most max_row_tokens with a dense mask for `sdpa`/`eager` (dense_mask).

    Output: input_ids/position_ids [R, L]; attention_mask [R, 1, L, L] bool block-diagonal causal (dense_mask
    only); rows/ends [N]
    where each sequence's last token sits; pairs [P, 2] and pair_group [P] (global sequence indices);
    group_tiers: per group, tiers of global sequence indices (for Plackett-Luce).
    """

    max_row_tokens: int = 1024
    pad_token_id: int = 0
    dense_mask: bool = True
    # sdpa_segments: each group's prompt computed once, its responses branching off it (pack_shared_prefix)
    shared_prefix: bool = False

    @classmethod
    def for_kernel(cls, attn_implementation: str, **kw) -> GroupCollator:
        """The layout the model's attention implementation can run: shared prompts on the segment kernel, a dense
        mask on `sdpa`/`eager`, one sequence per run otherwise (align/packing.py)."""
        return cls(
            dense_mask=needs_dense_mask(attn_implementation),
            shared_prefix=attn_implementation == SEGMENT_KERNEL,
            **kw,
        )

    def __call__(self, groups: list[dict]) -> dict[str, Any]:
        if self.shared_prefix:
            p = pack_shared_prefix([g["seqs"] for g in groups], self.pad_token_id)
        else:
            p = pack(
                [s for g in groups for s in g["seqs"]],
                self.max_row_tokens,
                self.pad_token_id,
                self.dense_mask,
            )
        pairs, pair_group, group_tiers, offset = [], [], [], 0
        for gi, g in enumerate(groups):
            tiers = [[offset + i for i in tier] for tier in g["tiers"]]
            group_tiers.append(tiers)
            for a, b in implied_pairs_of(tiers):
                pairs.append((a, b))
                pair_group.append(gi)
            offset += len(g["seqs"])
        return {
            **p.model_inputs(),
            "rows": p.rows,
            "ends": p.ends,
            "pairs": torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),
            "pair_group": torch.tensor(pair_group, dtype=torch.long),
            "group_tiers": group_tiers,
        }


def sequence_rewards(model, batch: dict[str, Any]) -> torch.Tensor:
    """Scalar reward of each packed sequence, read from its last token: [N].

    Training calls the model through its own forward (and so through any DDP / DeepSpeed wrapper, which is what
    synchronises gradients across processes); its pooled logits assume one sequence per row, so the head is applied
    here to the final hidden state at each packed sequence's last token instead. Without gradients (scoring) there
    is nothing to synchronise: the trunk alone, without keeping every layer's hidden states."""
    inner = dist.unwrap(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    if torch.is_grad_enabled():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[
            -1
        ]  # [R, L, H], after the final norm
    else:
        hidden = base.model(**inputs).last_hidden_state  # [R, L, H]
    # The head is fp32 (build_reward_model); the trunk's hidden state is bf16 or fp32 by precision and by whether
    # accelerate's mixed precision converted the forward's outputs.
    return base.score(hidden[batch["rows"], batch["ends"]].float()).squeeze(-1)  # [N]


# ==========================================================================================================
# Model
# ==========================================================================================================
def base_model_config(cfg: RewardConfig) -> tuple[ModelConfig, Path | None]:
    """The base model to build on: the SFT artifact's base when init_from is set, else cfg.model."""
    if cfg.init_from is None:
        return cfg.model, None
    m = require_complete(cfg.init_from, "sft")
    return cfg.model.model_copy(update={"name_or_path": m.model.name}), Path(cfg.init_from)


def build_reward_model(cfg: RewardConfig, tokenizer, precision: str):
    """Sequence-classification model (scalar head) whose trunk is the base model, with the SFT adapter merged."""
    from transformers import AutoModelForSequenceClassification

    import align.attention  # noqa: F401 (registers sdpa_segments with transformers)
    from align.models import resolve_model_path, whole_model_load

    base_cfg, sft_dir = base_model_config(cfg)
    with whole_model_load():
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path(base_cfg.name_or_path),
            num_labels=1,
            dtype=torch_dtype(precision),
            attn_implementation=base_cfg.attn_implementation,
            trust_remote_code=base_cfg.trust_remote_code,
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    if sft_dir is not None and (sft_dir / "adapter").exists():
        from peft import PeftModel

        causal = PeftModel.from_pretrained(load_causal_lm(base_cfg, precision), sft_dir / "adapter")
        model.model.load_state_dict(causal.merge_and_unload().model.state_dict())
    # The scalar head stays in fp32 at every precision (like PPO's value head): bf16 updates of a small, freshly
    # initialised head are mostly rounded away, and sequence_rewards applies it to fp32 hidden states.
    model.score.float()
    return model


# ==========================================================================================================
# Evaluation (the gate's decision is eval/reward_gate.py)
# ==========================================================================================================
@torch.no_grad()
def score_groups(
    model, groups: list[dict], max_batch_tokens: int = 4096, max_row_tokens: int = 1024
) -> list[list[float]]:
    """Rewards for every response of every group (no grad); whole groups per batch, packed into bounded rows."""
    model.eval()
    collate = GroupCollator.for_kernel(model.config._attn_implementation, max_row_tokens=max_row_tokens)
    out: list[list[float]] = []
    dev = next(model.parameters()).device
    i = 0
    while i < len(groups):
        chunk = [groups[i]]
        tokens = sum(len(s) for s in groups[i]["seqs"])
        while i + len(chunk) < len(groups):
            nxt = sum(len(s) for s in groups[i + len(chunk)]["seqs"])
            if tokens + nxt > max_batch_tokens:
                break
            tokens += nxt
            chunk.append(groups[i + len(chunk)])
        batch = collate(chunk)
        batch = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}
        r = sequence_rewards(model, batch).tolist()
        for g in chunk:
            out.append(r[: len(g["seqs"])])
            r = r[len(g["seqs"]) :]
        i += len(chunk)
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
    from datasets import load_from_disk

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

    class RewardTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            r = sequence_rewards(model, inputs)
            if t.loss == "plackett_luce":
                loss = plackett_luce_loss(r, inputs["group_tiers"])
            elif t.loss == "bradley_terry":
                loss = bradley_terry_loss(r, inputs["pairs"], t.margin)
            else:
                loss = kwise_loss(
                    r, inputs["pairs"], inputs["pair_group"], len(inputs["group_tiers"]), t.margin
                )
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


def run(cfg: RewardConfig, resume: bool = False, force: bool = False) -> StageResult:
    ctx = StageContext(cfg, resume, force)
    if ctx.finished:
        return ctx.existing_result()

    # 1. Data
    base_cfg, sft_dir = base_model_config(cfg)
    tokenizer = load_tokenizer(base_cfg)
    train_examples, eval_groups = load_data(cfg, tokenizer, ctx.counts)

    # 2. Model, 3. Train, 4. Evaluate, gate, write
    parents = [Path(cfg.data.preferences_dir)] + ([sft_dir] if sft_dir else [])
    with ctx.open(parents=parents, model=model_identity(base_cfg, ctx.precision, adapter="adapter")):
        trainer, result, paused = train(cfg, ctx, tokenizer, train_examples, eval_groups)
        if paused:
            return ctx.paused()
        metrics = save(ctx, trainer, result, tokenizer, eval_groups)
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
    train_examples = as_pair_examples(train_groups) if cfg.train.loss == "bradley_terry" else train_groups
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
        raise UserError(f"{cfg.data.preferences_dir}: no training groups with a preference")
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
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import TrainingArguments

    model = build_reward_model(cfg, tokenizer, ctx.precision)
    t = cfg.train
    if cfg.lora.enabled:
        adapter = peft_config(
            cfg.lora, cfg.peft, "SEQ_CLS", total_steps=t.max_steps, modules_to_save=["score"]
        )
        model = get_peft_model(model, adapter)
    args = TrainingArguments(
        **trainer_kwargs(
            t, ctx.out, ctx.precision, bool(eval_groups), t.groups_per_batch, ("eval_accuracy", True)
        )
    )
    trainer = _trainer_class(cfg, eval_groups)(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_examples),
        eval_dataset=Dataset.from_list(eval_groups) if eval_groups else None,  # scored by our evaluate()
        data_collator=GroupCollator.for_kernel(
            model.config._attn_implementation,
            max_row_tokens=max(cfg.data.max_length, 1024),
            pad_token_id=tokenizer.pad_token_id,
        ),
        callbacks=[*callbacks(ctx.out, t), *adalora_callbacks(cfg)],
    )
    result, paused = train_with_resume(trainer, ctx.out, ctx.resume, t.stop_after_steps)
    return trainer, result, paused


def save(ctx: StageContext, trainer, result, tokenizer, eval_groups: list[dict]) -> dict[str, Any]:
    """Held-out metrics, calibration plot, every held-out reward, the adapter, metrics.json."""
    out, state = ctx.out, trainer.state
    eval_rewards = trainer.heldout_rewards()
    metrics = pairwise_metrics(eval_groups, eval_rewards) if eval_groups else {"pairs": 0}
    metrics.update(training_summary(trainer, result, ctx.precision))
    save_trained(trainer, out / "adapter", tokenizer)  # every process (ZeRO-3 gathers)
    if not ctx.is_main:
        return metrics
    if eval_groups:
        _plots(eval_groups, eval_rewards, out)
        # every held-out reward, in the validation split's order: reviewers and benchmarks can audit any pair
        atomic_write_json(out / "heldout_rewards.json", eval_rewards)
    atomic_write_json(out / "metrics.json", {**metrics, "log_history": state.log_history})
    return metrics


def _gate(metrics: dict[str, Any], cfg: RewardConfig):
    def evaluate(gate_dir: Path) -> GateResult:
        r = decide_reward_gate(metrics, cfg.gate)
        if (gate_dir.parent.parent / "calibration.png").exists():
            r.images = ["../../calibration.png"]
        return r

    return evaluate


# ==========================================================================================================
# Scoring API (used by PPO and the gates) and loading
# ==========================================================================================================
class RewardScorer:
    """Load a reward artifact once and score (prompt, response) pairs in batches.

    scorer = RewardScorer("runs/reward")
    scorer.score([[{"role": "user", "content": "Hi"}]], ["Hello!"])  # -> [0.73]
    """

    def __init__(self, artifact_dir: Path | str, device: str | None = None):
        from peft import PeftModel

        self.dir = Path(artifact_dir)
        manifest = require_complete(self.dir, "reward")
        overridden = {o.get("gate") for o in manifest.overrides}
        for g in manifest.gates:
            if g["verdict"] != "pass" and g["gate"] not in overridden:
                console.print(
                    f"[bold yellow]warning:[/] reward model {printable(str(self.dir))} FAILED its {g['gate']} gate "
                    f"({printable('; '.join(g['reasons']))}); its scores may not reflect the annotators' preferences",
                    highlight=False,
                )
        cfg = load_config(RewardConfig, self.dir / "config.yaml")
        base_cfg, _ = base_model_config(cfg)
        self.tokenizer = load_tokenizer(base_cfg)
        self.max_length = cfg.data.max_length
        precision = choose_precision(cfg.precision)
        model = build_reward_model(cfg, self.tokenizer, precision)
        self.model = PeftModel.from_pretrained(model, self.dir / "adapter").eval()
        self.model.to(device or dist.device())  # this process's accelerator when there is one

    def score(self, prompts: list, responses: list[str], max_batch_tokens: int = 4096) -> list[float]:
        groups = []
        for p, r in zip(prompts, responses, strict=True):
            ids, _ = encode_response(self.tokenizer, chat_messages(p), r, self.max_length)
            groups.append({"seqs": [ids], "tiers": [[0]]})
        return [x[0] for x in score_groups(self.model, groups, max_batch_tokens)]


def read_score_rows(input_path: Path) -> tuple[list[dict], LoadReport]:
    """Rows of a scoring file that have a prompt (text or valid chat messages) and a response (text); every
    other row is named in the report."""
    report = LoadReport()
    rows = []
    for lineno, row in iter_rows(Path(input_path), report):
        where = f"{input_path}:{lineno}"
        if not isinstance(row.get("response"), str):
            report.drop(where, "invalid_response", "response: required, as text")
            continue
        try:
            chat_messages(row.get("prompt"))
        except ValueError as e:
            report.drop(where, "invalid_prompt", str(e))
            continue
        report.kept += 1
        rows.append(row)
    return rows, report


def score_file(artifact_dir: Path, input_path: Path, output_path: Path) -> int:
    """`align score`: JSONL rows with prompt (text or messages) and response -> the same rows + reward."""
    refuse_overwriting_input(output_path, [input_path])
    rows, report = read_score_rows(input_path)
    print_skipped(report.problems)
    if not rows:
        raise UserError(f"{input_path}: no rows to score")
    scorer = RewardScorer(artifact_dir)
    rewards = scorer.score([r["prompt"] for r in rows], [r["response"] for r in rows])
    atomic_write_text(
        Path(output_path),
        "".join(json.dumps({**r, "reward": x}) + "\n" for r, x in zip(rows, rewards, strict=True)),
    )
    return len(rows)
