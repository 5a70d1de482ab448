"""`--num-processes`: what every process runs, what torchrun is given, and what is refused before any starts."""

import pytest
from torch.distributed.run import get_args_parser

from align.cli import main
from align.launch import strip_launch_flags, torchrun_args
from core import dist
from core.config import UserError


def test_launch_flags_are_removed_from_what_each_process_runs():
    argv = ["sft", "--config", "c.yaml", "--num-processes", "4", "x=1", "--nnodes=2", "--node-rank", "1",
            "--rdzv-endpoint", "h:29400", "--resume"]  # fmt: skip
    assert strip_launch_flags(argv) == ["sft", "--config", "c.yaml", "x=1", "--resume"]


def test_one_machine_is_standalone_and_several_need_an_endpoint():
    one = get_args_parser().parse_args(torchrun_args(["sft"], 4))
    assert one.standalone and one.nproc_per_node == "4" and one.module and one.training_script == "align"
    two = get_args_parser().parse_args(torchrun_args(["sft"], 8, "2", 1, "10.0.0.1:29400"))
    assert not two.standalone and two.nnodes == "2" and two.node_rank == 1
    assert two.rdzv_endpoint == "10.0.0.1:29400" and two.rdzv_backend == "c10d"
    # every machine derives the same rendezvous id from the same command
    again = get_args_parser().parse_args(torchrun_args(["sft"], 8, "2", 0, "10.0.0.1:29400"))
    assert two.rdzv_id == again.rdzv_id
    with pytest.raises(UserError, match="rdzv-endpoint"):
        torchrun_args(["sft"], 8, "2")


def test_bad_config_is_refused_once_before_any_process_starts(capsys):
    assert main(["sft", "--config", "configs/sft.yaml", "train.nope=1", "--num-processes", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("train.nope") == 1 and "Traceback" not in err


def test_single_process_helpers_are_no_ops():
    assert not dist.launched() and dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    assert dist.broadcast({"a": 1}) == {"a": 1} and dist.all_gather(3) == [3]
    assert list(dist.shard(8)) == list(range(8))
    with dist.solo():
        assert dist.is_main()
