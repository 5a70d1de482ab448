"""Where an `align sft` step spends its time: torch.profiler over one optimizer step of bench/sft_throughput.py's
align configuration (SmolLM2-135M-Instruct, LoRA, self-instruct, batch 8, max length 512).

    .venv/bin/python bench/profile_sft_step.py [--step 3] [--rows 30]

Prints the operators by self CPU time, grouped by input shape (so the LM head's [tokens x vocabulary] work shows
apart from the body's [tokens x hidden] work), and the step's wall time. The profiler's shape recording adds
overhead: read shares, not absolute times (bench/sft_throughput.py measures those).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--step", type=int, default=3, help="which optimizer step to profile (1 includes warm-up)"
    )
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("/tmp/align-profile-sft"))
    a = ap.parse_args()

    from sft_throughput import run_align
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from align.cli import _quiet_libraries

    class Profile(TrainerCallback):
        def __init__(self):
            self.n, self.prof, self.t0 = 0, None, 0.0

        def on_step_begin(self, *args, **kw):
            self.n += 1
            if self.n == a.step:
                self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kw):
            if self.n == a.step:
                self.prof.__exit__(None, None, None)
                print(f"step {a.step}: {time.perf_counter() - self.t0:.2f} s (profiled)")
                table = self.prof.key_averages(group_by_input_shape=True)
                print(table.table(sort_by="self_cpu_time_total", row_limit=a.rows))

    _quiet_libraries()
    shutil.rmtree(a.out, ignore_errors=True)
    cb = Profile()
    data = ROOT.parent / "shared" / "data" / "self_instruct_seed_tasks.jsonl"
    if not data.exists():
        data = ROOT / "examples" / "data" / "instructions_train.jsonl"
    run_align(data, a.step + 1, a.out, callbacks=[cb])


if __name__ == "__main__":
    main()
