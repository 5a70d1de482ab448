"""`align <stage> --num-processes N`: the same command in N processes, started by torchrun's own launcher.

A convenience in the spirit of TRL's CLI: instead of typing

    torchrun --standalone --nproc-per-node 4 -m align sft --config configs/sft.yaml

a user adds `--num-processes 4` to the command they already run. Nothing is launched by hand: the arguments go
through torch.distributed.run's own parser and `elastic_launch` (rendezvous, environment, signal handling and
the teardown of the others when one process fails are torchrun's). Several machines: the same flags torchrun takes
(`--nnodes 2 --node-rank K --rdzv-endpoint HOST:PORT`), run on every machine, with the run folder on a filesystem
they share (docs/distributed.md).

The exit status is the main process's (0 done, 1 gate failed, 2 bad input, 3 paused), so scripts and `align run`
read a multi-process run the way they read a single one.
"""

from __future__ import annotations

import logging
import uuid

from core.config import UserError

LAUNCH_FLAGS = frozenset({"--num-processes", "--nnodes", "--node-rank", "--rdzv-endpoint"})


def strip_launch_flags(argv: list[str]) -> list[str]:
    """The command line without the launch flags (what every process runs)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in LAUNCH_FLAGS:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def torchrun_args(
    argv: list[str],
    nproc: int,
    nnodes: str = "1",
    node_rank: int | None = None,
    rdzv_endpoint: str | None = None,
) -> list[str]:
    """torchrun's own arguments for running `python -m align <argv>` in `nproc` processes per machine."""
    args = ["--nproc-per-node", str(nproc)]
    if nnodes in ("1", "1:1") and rdzv_endpoint is None:
        args.append("--standalone")  # a free port on this machine, no endpoint to agree on
    else:
        if rdzv_endpoint is None:
            raise UserError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT (the same on every machine)")
        args += ["--nnodes", nnodes, "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint]
        args += ["--rdzv-id", f"align-{uuid.uuid5(uuid.NAMESPACE_URL, ' '.join(argv)).hex[:12]}"]
        if node_rank is not None:
            args += ["--node-rank", str(node_rank)]
    return [*args, "--module", "align", *argv]


def relaunch(argv: list[str], nproc: int, **placement) -> int:
    """Run `align <argv>` in nproc processes (per machine); return the main process's exit status. `placement`:
    torchrun_args's nnodes, node_rank and rdzv_endpoint."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    args = get_args_parser().parse_args(torchrun_args(argv, nproc, **placement))
    if args.standalone:  # as torch.distributed.run.run does before building its config
        args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    if args.master_port is None:
        args.master_port = 29500
    config, cmd, cmd_args = config_from_args(args)
    # torchrun reports a non-zero exit (a failed gate, a pause) as an error with a table; align says it better
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, cmd)(*cmd_args)
    except ChildFailedError as e:
        # the main process's status; else the first process that failed on its own (not killed by the teardown)
        codes = {rank: f.exitcode for rank, f in e.failures.items() if f.exitcode > 0}
        return codes.get(0) or (codes[min(codes)] if codes else 1)
    return 0
