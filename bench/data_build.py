"""`align data build` on 100k synthetic instruction rows: rows/s and peak memory.

    .venv/bin/python bench/data_build.py [--rows 100000] [--no-tokenizer]

Rows are alpaca-style, 20-80 words each from a 5,000-word vocabulary, with 5% exact duplicates and 5% near
duplicates (one word changed in a 40+ word answer), so that both duplicate passes have work to do. The build runs
the full default pipeline: validation, control-token check, exact and MinHash-LSH near-duplicate removal, token
lengths with the SmolLM2 chat template, the split and the dataset write. Peak RSS is the process maximum.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_rows(n: int, path: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    vocab = [f"w{k}" for k in range(5000)]
    rows = []
    for i in range(n):
        r = rng.random()
        if r < 0.05 and rows:
            rows.append(dict(rows[rng.randrange(len(rows))]))  # exact duplicate
            continue
        if r < 0.10 and rows:
            src = rows[rng.randrange(len(rows))]
            words = src["output"].split()
            if len(words) >= 40:
                words[rng.randrange(len(words))] = "changed"
                rows.append({"instruction": src["instruction"], "output": " ".join(words)})
                continue
        rows.append(
            {
                "instruction": f"Task {i}: " + " ".join(rng.choices(vocab, k=rng.randint(5, 20))),
                "output": " ".join(rng.choices(vocab, k=rng.randint(20, 80))),
            }
        )
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--no-tokenizer", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("/tmp/align-bench-data"))
    a = ap.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    src = a.work / "rows.jsonl"
    make_rows(a.rows, src)
    from align.cli import _quiet_libraries
    from data_schemas.config import DataBuildConfig
    from stages.data import run as build

    _quiet_libraries()
    cfg = DataBuildConfig(
        inputs=[src], output_dir=a.work / "out", tokenizer=None if a.no_tokenizer else "smollm2-135m-instruct"
    )
    if cfg.tokenizer:  # load (and convert, first time) outside the timed region
        from core.models import load_tokenizer
        from data_schemas.config import ModelConfig

        load_tokenizer(ModelConfig(name_or_path=cfg.tokenizer))
    t = time.perf_counter()
    build(cfg)
    secs = time.perf_counter() - t
    c = json.loads((a.work / "out" / "manifest.json").read_text())["counts"]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res = {
        "rows": a.rows,
        "seconds": round(secs, 1),
        "rows_per_s": round(a.rows / secs),
        "peak_rss_mb": round(peak_mb),
        "dropped": c["dropped"],
        "kept": c["examples_kept"],
        "tokenizer": cfg.tokenizer,
    }
    print(json.dumps(res, indent=2))
    from bench.harness import save

    save(None, "data_build", res)


if __name__ == "__main__":
    main()
