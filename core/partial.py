"""Partial fine-tuning: which weights train, gradual unfreezing, and layer-wise learning-rate decay.

The alternatives to LoRA a team with a tight budget chooses between (when `lora.enabled` is false):
- `trainable: top_blocks` trains only the top N transformer blocks (with the final norm and the head): the lower
  layers hold general features, the top ones adapt (Yosinski et al. 2014; Lee et al. 2019, "What would Elsa do?").
- `head` trains the output head alone (and the final norm); `layernorm` the normalisation weights alone (Zhao et
  al. 2023: LayerNorm tuning); `bias` the bias terms alone (BitFit, Ben Zaken et al. 2022). A model without biases
  (Llama) has nothing to train under `bias`: refused with a sentence.
- `unfreeze: {every_steps: N, blocks_per_step: k}` starts from that selection and unfreezes k more blocks from the
  top every N optimizer steps, until every block trains: ULMFiT's gradual unfreezing (Howard & Ruder 2018), "freeze
  the body, train the new head, unfreeze gradually from the top".
- `layerwise_lr_decay: d` gives block i of L the rate lr * d^(L - i), the head lr, the embeddings lr * d^(L + 1)
  (discriminative fine-tuning, ULMFiT; LLRD as in ELECTRA and BEiT): the lower layers move least.

Tied embeddings (the head *is* the input embedding matrix, as in SmolLM2) train with the head: there is one
tensor. Depth is read from parameter names (`...layers.<i>....`), the convention of every decoder in transformers.
The optimizer holds every parameter that can ever train, so that blocks unfrozen later are updated (AdamW skips a
parameter whose gradient is None, so frozen ones cost nothing).
"""

from __future__ import annotations

import re
from typing import Any

from core import dist

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def depth(name: str, n_layers: int) -> int:
    """-1 embeddings, i for transformer block i, n_layers for everything after the blocks (final norm, head)."""
    m = _LAYER.search(name)
    if m:
        return int(m.group(1))
    return -1 if "embed" in name else n_layers


def depths(model) -> dict[str, int]:
    """depth() of every parameter, the output head's (and so tied embeddings') at n_layers: with tied weights
    named_parameters() lists the one tensor under its embedding name."""
    L = n_layers_of(model)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = {id(p) for p in out_emb.parameters()} if out_emb is not None else set()
    return {n: (L if id(p) in head else depth(n, L)) for n, p in model.named_parameters()}


def n_layers_of(model) -> int:
    n = getattr(model.config, "num_hidden_layers", None)
    if n is None:
        raise ValueError("partial fine-tuning needs config.num_hidden_layers")
    return int(n)


def _is_norm(name: str) -> bool:
    return "norm" in name.lower() or ".ln" in name.lower()


def trainable_names(model, settings, unfrozen_blocks: int = 0) -> set[str]:
    """Names of the parameters that train under `settings.trainable`, with the top `unfrozen_blocks` blocks added."""
    L = n_layers_of(model)
    names = set()
    for name, d in depths(model).items():
        if settings.trainable == "all":
            keep = True
        elif settings.trainable == "top_blocks":
            keep = d >= L - settings.top_blocks
        elif settings.trainable == "head":
            keep = d == L
        elif settings.trainable == "layernorm":
            keep = _is_norm(name)
        else:  # bias
            keep = name.endswith(".bias")
        if keep or (d >= L - unfrozen_blocks and d < L):
            names.add(name)
    if not names:
        raise ValueError(
            f"partial.trainable={settings.trainable}: this model has no such parameters"
            + (
                " (it has no bias terms; choose layernorm or top_blocks)"
                if settings.trainable == "bias"
                else ""
            )
        )
    return names


def unfrozen_at(step: int, settings, n_layers: int) -> int:
    """Blocks unfrozen by the schedule after `step` optimizer steps (0 without a schedule)."""
    u = settings.unfreeze
    if u is None:
        return 0
    return min(n_layers, (step // u.every_steps) * u.blocks_per_step)


def apply_trainable(model, settings, step: int = 0) -> dict[str, int]:
    """Set requires_grad for `step`; returns the counts (trainable, total parameters)."""
    names = trainable_names(model, settings, unfrozen_at(step, settings, n_layers_of(model)))
    trainable = total = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
        total += p.numel()
        trainable += p.numel() if name in names else 0
    return {"trainable": trainable, "total": total}


def param_groups(model, lr: float, weight_decay: float, settings) -> list[dict[str, Any]]:
    """Optimizer groups over every parameter that can ever train: per depth when layerwise_lr_decay is set
    (lr * d^(L - depth)), each split into decayed weights and undecayed biases/norms."""
    L = n_layers_of(model)
    ever = (
        {n for n, _ in model.named_parameters()}
        if settings.unfreeze is not None
        else trainable_names(model, settings)
    )
    decay = settings.layerwise_lr_decay
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    where = depths(model)
    for name, p in model.named_parameters():
        if name not in ever:
            continue
        d = where[name]
        rate = lr * (decay ** (L - d) if decay is not None else 1.0)
        no_decay = name.endswith(".bias") or _is_norm(name)
        key = (d if decay is not None else 0, no_decay)
        g = groups.setdefault(
            key,
            {"params": [], "lr": rate, "weight_decay": 0.0 if no_decay else weight_decay, "depth": key[0]},
        )
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def unfreeze_callback(settings):
    """A TrainerCallback that re-applies the schedule at the start of every step (and so after a resume)."""
    from transformers import TrainerCallback

    class Unfreeze(TrainerCallback):
        def __init__(self):
            self.blocks = -1

        def on_step_begin(self, args, state, control, model=None, **kw):
            inner = dist.unwrap(model)
            blocks = unfrozen_at(state.global_step, settings, n_layers_of(inner))
            if blocks != self.blocks:
                apply_trainable(inner, settings, state.global_step)
                self.blocks = blocks

    return Unfreeze()
