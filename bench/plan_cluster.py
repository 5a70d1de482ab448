"""`align plan --gpus 8` for Llama-3.1-8B and -70B shapes on 8 x 80 GB: what one process holds under each sharding,
and the smallest layout that fits, for full-parameter and LoRA DPO and full-parameter GRPO.

    .venv/bin/python bench/plan_cluster.py     # -> bench/results/plan_cluster.json and a markdown table on stdout

The models are their published configs (hidden size, layers, heads, vocabulary), written as config.json folders
with no weights: `align plan` builds them on the meta device. Settings: bf16, DPO 1 pair per process of 2048
tokens, GRPO 4 responses per process of 1024 + 1024 tokens, gradient checkpointing on (what 8B+ recipes use).
The machine: 8 GPUs of 80 GB sharing 2 TB of host memory (an HGX/DGX H100 node), which offloaded state must fit.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import write_result  # noqa: E402
from core.plan import GIB, estimate, layouts, smallest_fit  # noqa: E402
from data_schemas.config import DPOConfig, PPOConfig  # noqa: E402
from stages.registry import STAGES  # noqa: E402

HOST = 2e12  # bytes of host memory of one 8-GPU node (DGX H100: 2 TB), shared by its processes

SHAPES = {
    "Llama-3.1-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256),
    "Llama-3.1-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, vocab_size=128256),
}  # fmt: skip


def folder(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
                "tie_word_embeddings": False,
                "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-5,
                "torch_dtype": "bfloat16",
                **SHAPES[name],
            }
        )  # fmt: skip
    )
    return d


def configs(path: Path) -> dict[str, tuple[object, str]]:
    dpo = {"output_dir": "x", "init_from": str(path), "precision": "bf16",
           "data": {"pairs_file": "p.jsonl", "max_length": 2048, "max_prompt_length": 1024},
           "train": {"per_device_train_batch_size": 1, "gradient_checkpointing": True}}  # fmt: skip
    grpo = {"output_dir": "x", "init_from": str(path), "precision": "bf16", "lora": {"enabled": False},
            "prompts": {"train_file": "p.jsonl", "max_prompt_length": 1024}, "rollout": {"engine": "generate",
            "max_new_tokens": 1024}, "reward": {"rule": {"kind": "contains", "text": "a"}},
            "train": {"advantage_estimator": "grpo", "group_size": 8, "mini_batch_size": 4, "rollout_batch_size": 8,
                      "sharding": "fsdp2", "gradient_checkpointing": True}}  # fmt: skip
    return {
        "DPO full-parameter (frozen reference copy)": (DPOConfig(**dpo, lora={"enabled": False}), "dpo"),
        "DPO LoRA r16": (DPOConfig(**dpo), "dpo"),
        "GRPO full-parameter (frozen reference copy)": (PPOConfig(**grpo), "ppo"),
    }


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in SHAPES:
            path = folder(Path(tmp), name)
            for what, (cfg, stage) in configs(path).items():
                plan = estimate(cfg, STAGES[stage].plan, device="cuda", precision="bf16")
                shape = STAGES[stage].plan
                found = layouts(
                    plan, 8, 80 * GIB, shape.shardings, shape.offloads, shape.offload_shardings, HOST
                )
                best = smallest_fit(found)
                eight = {  # what align offers this run on 8 processes (the table's columns)
                    f"{r.sharding}/{r.offload}": round(r.total / GIB, 1) for r in found if r.processes == 8
                }
                rows.append({"model": name, "run": what, "params_b": round(plan.params / 1e9, 2),
                             "one_process_gib": round(plan.total / GIB, 1), "eight_processes_gib": eight,
                             "smallest_fit": None if best is None else
                             f"{best.processes} x {best.sharding}" + ("" if best.offload == "none" else
                                                                      f" + {best.offload} offload"),
                             "smallest_fit_gib": None if best is None else round(best.total / GIB, 1)})  # fmt: skip
    metrics = {f"{r['model']} {r['run']}: smallest fit GiB per process": r["smallest_fit_gib"] for r in rows}
    write_result(
        None,
        "plan_cluster",
        metrics,
        {"rows": rows, "gpus": 8, "gpu_memory_gib": 80, "host_memory_gib": HOST / GIB},
    )
    print(
        "| model | run | one process | 8 x FSDP2 | 8 x FSDP2 + CPU offload | 8 x ZeRO-3 "
        "| 8 x ZeRO-3 + optimizer offload | smallest align offers, 8 x 80 GB, 2 TB host |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        e = r["eight_processes_gib"]
        fit = (
            "nothing fits"
            if r["smallest_fit"] is None
            else f"{r['smallest_fit']} ({r['smallest_fit_gib']} GiB)"
        )
        cells = [
            f"{e[k]} GiB" if k in e else "not offered"
            for k in ("fsdp2/none", "fsdp2/optimizer+weights", "zero3/none", "zero3/optimizer")
        ]
        print(f"| {r['model']} | {r['run']} | {r['one_process_gib']} GiB | {' | '.join(cells)} | {fit} |")


if __name__ == "__main__":
    main()
