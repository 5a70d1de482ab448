"""Run under torchrun by tests/core/test_sharded.py: core/sharded.py's path in N processes, with what each step
computed written to OUT/rank-R.json for the test to compare with one process."""

import json
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from core import sharded


def main(checkpoint: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out_dir = Path(out)
    model = sharded.build(checkpoint, "fp32")
    sharded.shard_root(model)
    sharded.materialise(model, torch.device("cpu"))
    sharded.load_checkpoint(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # on the sharded parameters, before any forward
    record = {"local_rows": {n: p.to_local().shape[0] for n, p in model.named_parameters()}}
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [2, 4, 6, 8, 10, 12, 14, 16]])
    with torch.no_grad():
        record["logits"] = model(input_ids=ids).logits[:, -1, :8].tolist()
    model.reshard()  # a forward without backward leaves the root unit gathered
    # one AdamW step on this process's share of the batch; FSDP2 averages the gradients like DDP
    model.train()
    mine = ids.tensor_split(world)[rank]
    loss = model(input_ids=mine, labels=mine).loss
    loss.backward()
    record["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9))
    opt.step()
    opt.zero_grad()
    sharded.save_consolidated(model, out_dir / "stepped")
    # resume: the sharded state saved, the weights spoiled, the state read back
    sharded.save_state(out_dir / "state", model, opt)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    sharded.load_state(out_dir / "state", model, opt)
    sharded.save_consolidated(model, out_dir / "resumed")
    record["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out_dir / f"rank-{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
