"""A reward model as a library: how a (prompt, response) is encoded, how K-wise groups are packed into rows, how a
packed row yields one scalar per response, how a reward artifact is rebuilt, and `RewardScorer`, which the reward
stage, PPO, the policy gate and `align score` all score through.

The model is a sequence-classification model (a scalar head) on the base model's trunk, with the SFT adapter
merged when the artifact was initialised from one; the reward is read at each response's last token. All
responses of a batch go through the trunk as padding-free rows (core/packing.py): with `sdpa_segments` a
group's prompt is computed once and its responses branch off it; other kernels get restarting positions and a
block-diagonal causal mask.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core import dist, sharded
from core.chat import chat_ids, chat_messages
from core.config import UserError, load_config, printable
from core.manifest import atomic_write_text, recorded_gates, refuse_overwriting_input, require_complete
from core.models import (
    choose_precision,
    eval_resident_limit,
    init_lora,
    input_device,
    load_start,
    load_tokenizer,
    peft_config,
    torch_dtype,
)
from core.packing import SEGMENT_KERNEL, needs_dense_mask, pack, pack_shared_prefix
from core.progress import steps
from core.readers import LoadReport, iter_rows
from core.stage import console, print_skipped
from data_schemas.config import RewardConfig
from lib.artifacts import Start, resolve_start
from lib.merge import sharded_start
from lib.rankings import implied_pairs_of


# ==========================================================================================================
# Data
# ==========================================================================================================
def encode_response(tokenizer, prompt: list[dict], response: str, max_length: int) -> tuple[list[int], bool]:
    """Token ids of prompt + response through the chat template. Longer sequences are cut from the left, so the
    response's end, where the reward is read, is always kept; returns (ids, truncated)."""

    ids = chat_ids(tokenizer, [*prompt, {"role": "assistant", "content": response}])
    if len(ids) > max_length:
        return ids[-max_length:], True
    return ids, False


@dataclass
class GroupCollator:
    """All responses of the micro-batch's groups, packed (core/packing.py): into one row for the segment kernels,
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
        mask on `sdpa`/`eager`, one sequence per run otherwise (core/packing.py)."""
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

    Training under a DDP / DeepSpeed wrapper calls the model through the wrapper's forward, which is what
    synchronises gradients across processes; its pooled logits assume one sequence per row, so the head is applied
    here to the final hidden state at each packed sequence's last token instead. Otherwise (scoring, one process,
    FSDP2, whose units synchronise themselves) the trunk alone runs, without keeping every layer's hidden states."""
    inner = dist.unwrap(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    if (
        torch.is_grad_enabled() and inner is not model
    ):  # through the wrapper, which synchronises the gradients
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
def reward_start(cfg: RewardConfig) -> Start:
    """Where the reward model's trunk starts: init_from (an SFT artifact or any checkpoint) with cfg.model's load
    settings, else cfg.model itself."""
    if cfg.init_from is None:
        return Start(cfg.model)
    return resolve_start(cfg.init_from, like=cfg.model)


def build_reward_model(
    cfg: RewardConfig,
    tokenizer,
    precision: str,
    weights: Path | None = None,
    resident: float | None = None,
    partitioned: bool = False,
):
    """Sequence-classification model (scalar head) whose trunk is the start's weights (an SFT adapter merged in);
    `weights`: a trained full-parameter reward model's folder (model/), loaded as it was saved, keeping at most
    `resident` bytes of its weights in memory (scoring only: core.models.offloaded; its head stays in memory).
    `partitioned`: the training model of a ZeRO-3 Trainer, created under DeepSpeed's zero.Init (a collective;
    lib.trainer.zero3_init), for a start with nothing to merge."""
    from transformers import AutoModelForSequenceClassification

    import core.attention  # noqa: F401 (registers sdpa_segments with transformers)
    from core.models import loading, offloaded, resolve_model_path, whole_model_load

    start = reward_start(cfg)
    source = str(weights) if weights is not None else start.model.name_or_path
    path = resolve_model_path(source)
    offload = offloaded(path, precision, resident) if weights is not None else None
    whole = contextlib.nullcontext() if partitioned else whole_model_load()
    with loading(f"model {source}"), whole:
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=1,
            dtype=torch_dtype(precision),
            attn_implementation=start.model.attn_implementation,
            trust_remote_code=start.model.trust_remote_code,
            revision=None if weights is not None else start.model.revision,
            **(offload.kwargs if offload else {}),
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    if offload:
        return resident_head(offload.mark(model), path)
    if weights is None and start.merge:
        model.model.load_state_dict(load_start(start, precision).model.state_dict())
    # The scalar head stays in fp32 at every precision (like PPO's value head): bf16 updates of a small, freshly
    # initialised head are mostly rounded away, and sequence_rewards applies it to fp32 hidden states. (Partitioned,
    # DeepSpeed keeps its own fp32 master copy of every weight.)
    if not partitioned:
        model.score.float()
    if weights is None:
        init_score(model, cfg.train.seed)
    return model


def build_sharded_reward_model(cfg: RewardConfig, tokenizer, precision: str, out: Path):
    """train.sharding=fsdp2: the reward model built on the meta device and sharded (core/sharded.py), each process
    reading only its slices of the start's checkpoint (an SFT LoRA start merged file by file first into
    `out`/.start-merged: lib.merge.sharded_start). Units: every decoder layer (and its LoRA, lora.enabled), the
    trunk (embeddings and final norm, so that scoring can run the trunk alone: sequence_rewards), the fp32 head
    (FSDP2 gathers one dtype per unit; under LoRA PEFT's trainable copy of it beside the original), the root. The
    head is not in the checkpoint: init_score draws it as build_reward_model does, and init_lora the adapter."""
    m = sharded_start(reward_start(cfg), cfg.init_from or cfg.model.name_or_path, out)
    adapter = reward_adapter(cfg) if cfg.lora.enabled else None
    offload = cfg.train.cpu_offload
    model = sharded.build(
        m.name_or_path, precision, m.attn_implementation, m.trust_remote_code, "scalar", adapter, offload
    )
    hf = model.get_base_model() if adapter is not None else model
    hf.config.pad_token_id = tokenizer.pad_token_id
    hf.score.float()
    sharded.shard(hf.base_model, offload)
    sharded.shard(hf.score, offload)
    sharded.shard_root(model, offload)
    sharded.materialise(model, dist.device(), offload)
    sharded.load_checkpoint(model, skip=("score.",))
    init_score(model, cfg.train.seed)
    if adapter is not None:
        init_lora(model, cfg.train.seed)
    return model


def reward_adapter(cfg: RewardConfig):
    """The reward model's PEFT config: the lora block's method on the trunk, the scalar head trained whole (PEFT
    keeps a trainable copy of it, `modules_to_save`)."""
    return peft_config(
        cfg.lora, cfg.peft, "SEQ_CLS", total_steps=cfg.train.max_steps, modules_to_save=["score"]
    )


def _is_head(name: str) -> bool:
    """A weight of the scalar head (`score`), under PEFT either copy of it (the original and the trained one)."""
    parts = name.split(".")
    return "score" in parts and parts[-1] in ("weight", "bias") and ".lora_" not in name


def init_score(model, seed: int) -> None:
    """A new scalar head drawn from N(0, initializer_range^2) (transformers' initialisation) by a generator of its
    own seeded with `seed`, bias zero: the same head whether the model was loaded whole or sharded (FSDP2: each
    process keeps its slice; ZeRO-3: its partition), with or without PEFT's copy of it (both copies get it), and
    whatever the run drew before."""
    from torch.distributed.fsdp import FSDPModule

    std = getattr(model.config, "initializer_range", 0.02)
    head = {n: p for n, p in model.named_parameters() if _is_head(n)}
    shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in head.items()}  # whole: DTensor, ZeRO-3
    (weight_shape,) = {s for n, s in shapes.items() if n.endswith(".weight")}
    weight = torch.randn(weight_shape, generator=torch.Generator().manual_seed(seed)) * std
    drawn = {n: weight if n.endswith(".weight") else torch.zeros(s) for n, s in shapes.items()}
    if isinstance(model, FSDPModule):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, drawn, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    gathered = contextlib.nullcontext()
    if any(
        getattr(p, "ds_id", None) is not None for p in head.values()
    ):  # ZeRO-3: gathered, set, partitioned
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(head.values()), modifier_rank=0)
    with gathered, torch.no_grad():
        for name, value in drawn.items():
            head[name].copy_(value.to(head[name].dtype))


def resident_head(model, folder: Path):
    """An offloaded reward model with its scalar head read back from `folder` into memory in fp32 (as
    build_reward_model keeps it): accelerate would bring an offloaded head in at the trunk's precision."""
    from accelerate.hooks import remove_hook_from_module
    from safetensors import safe_open

    from core.models import weight_files

    tensors = {}
    for f in weight_files(folder):
        with safe_open(f, "pt") as fh:
            tensors.update({k: fh.get_tensor(k) for k in fh.keys() if k.startswith("score.")})  # noqa: SIM118
    remove_hook_from_module(model.score)
    head = torch.nn.Linear(model.score.in_features, model.score.out_features, bias="score.bias" in tensors)
    head.load_state_dict({k.removeprefix("score."): v.float() for k, v in tensors.items()})
    model.score = head.to(dist.device())
    return model


# ==========================================================================================================
# Evaluation (the gate's decision is eval/reward_gate.py)
# ==========================================================================================================
@torch.no_grad()
def score_groups(
    model,
    groups: list[dict],
    max_batch_tokens: int = 4096,
    max_row_tokens: int = 1024,
    progress: str | None = None,
) -> list[list[float]]:
    """Rewards for every response of every group (no grad); whole groups per batch, packed into bounded rows;
    `progress`: what a bar over the groups says (core.progress; none inside training loops)."""
    with steps(progress or "", len(groups), show=progress is not None) as advance:
        return _score_groups(model, groups, max_batch_tokens, max_row_tokens, advance)


def _score_groups(model, groups, max_batch_tokens, max_row_tokens, advance) -> list[list[float]]:
    model.eval()
    collate = GroupCollator.for_kernel(model.config._attn_implementation, max_row_tokens=max_row_tokens)
    out: list[list[float]] = []
    dev = input_device(model)
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
        advance(len(chunk))
    return out


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
        for _, r in recorded_gates(
            self.dir, manifest
        ):  # its own records, checked against its manifest's hashes
            if not r.passed:
                console.print(
                    f"[bold yellow]warning:[/] reward model {printable(str(self.dir))} FAILED its {r.gate} gate "
                    f"({printable('; '.join(r.reasons))}); its scores may not reflect the annotators' preferences",
                    highlight=False,
                )
        cfg = load_config(RewardConfig, self.dir / "config.yaml")
        self.tokenizer = load_tokenizer(reward_start(cfg).model)
        self.max_length = cfg.data.max_length
        precision = choose_precision(cfg.precision)
        if (
            self.dir / "model" / "config.json"
        ).exists():  # trained full-parameter: offloaded beyond the limit
            self.model = build_reward_model(
                cfg, self.tokenizer, precision, weights=self.dir / "model", resident=eval_resident_limit()
            ).eval()
        else:
            model = build_reward_model(cfg, self.tokenizer, precision)
            self.model = PeftModel.from_pretrained(model, self.dir / "adapter").eval()
        if not getattr(self.model, "hf_device_map", None):
            self.model.to(device or dist.device())  # this process's accelerator when there is one

    def score(
        self, prompts: list, responses: list[str], max_batch_tokens: int = 4096, progress: str | None = None
    ) -> list[float]:
        groups = []
        for p, r in zip(prompts, responses, strict=True):
            ids, _ = encode_response(self.tokenizer, chat_messages(p), r, self.max_length)
            groups.append({"seqs": [ids], "tiers": [[0]]})
        return [x[0] for x in score_groups(self.model, groups, max_batch_tokens, progress=progress)]


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
    rewards = scorer.score([r["prompt"] for r in rows], [r["response"] for r in rows], progress="scoring")
    atomic_write_text(
        Path(output_path),
        "".join(json.dumps({**r, "reward": x}) + "\n" for r, x in zip(rows, rewards, strict=True)),
    )
    return len(rows)
