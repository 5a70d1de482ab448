"""Gate scoring with the adapter applied vs merged into the weights (what `load_for_eval(merge=True)` does for the
bias and perplexity gates): the bias gate's scoring of one artifact, timed both ways, and how far the scores move.

    .venv/bin/python bench/eval_merge.py ARTIFACT [--repeats 2]     (e.g. the quickstart's runs/quickstart/sft)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import cpu_flags  # noqa: E402


def _numbers(x) -> list[float]:
    if isinstance(x, dict):
        return [z for v in x.values() for z in _numbers(v)]
    if isinstance(x, list):
        return [z for v in x for z in _numbers(v)]
    return [float(x)] if isinstance(x, int | float) and not isinstance(x, bool) else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    from core.config import read_yaml
    from core.models import load_for_eval
    from data_schemas.config import GatesConfig
    from eval.bias import evaluate_model, load_items

    settings = GatesConfig.model_validate(read_yaml(ROOT / "configs" / "gates.yaml")).bias
    items = load_items(settings)
    seconds: dict[str, list[float]] = {"adapter": [], "merged": []}
    scores = {}
    for _ in range(a.repeats):
        for name, merge in (("adapter", False), ("merged", True)):
            model, tok, _ = load_for_eval(a.artifact, merge=merge)
            t = time.perf_counter()
            scores[name] = evaluate_model(model, tok, items, settings)
            seconds[name].append(time.perf_counter() - t)
            del model
    x, y = _numbers(scores["adapter"]), _numbers(scores["merged"])
    print(json.dumps({
        "artifact": a.artifact, "cpu_flags": cpu_flags(), "seconds": seconds,
        "scores": len(x), "max_abs_score_difference": max(abs(p - q) for p, q in zip(x, y, strict=True)),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
