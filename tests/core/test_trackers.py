"""Trackers: `train.report_to` takes what transformers takes, a tracker that is not installed is one sentence with
its pip line before any model loads (it was an 'internal error' after loading, leaving the artifact 'failed'), and
the trackers' run is named by the stage and its artifact key."""

from __future__ import annotations

import importlib.util
import json

import pytest

from align.cli import main
from data_schemas.config import TRACKERS
from tests.conftest import EXAMPLES

SFT = ["sft", "--config", "configs/sft.yaml", "model.name_or_path=tiny-random-llama",
       f"data.train_file={EXAMPLES / 'instructions_train.jsonl'}", "train.early_stopping_patience=null"]  # fmt: skip


def test_the_tracker_table_is_transformers_own():
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    assert set(TRACKERS) == set(INTEGRATION_TO_CALLBACK)


def test_a_tracker_that_is_not_installed_is_said_before_the_model_loads(tmp_path, capsys):
    missing = next(
        (n for n, (mod, _) in TRACKERS.items() if importlib.util.find_spec(mod.split(".")[0]) is None), None
    )
    if missing is None:
        pytest.skip("every tracker transformers knows is installed here")
    out = tmp_path / "sft"
    assert main([*SFT, f"output_dir={out}", f"train.report_to=[{missing}]"]) == 2
    err = capsys.readouterr().err
    assert f"pip install {TRACKERS[missing][1]}" in err and "internal error" not in err
    assert not (out / "manifest.json").exists()  # nothing started, nothing marked failed


def test_an_unknown_tracker_is_a_config_error(tmp_path, capsys):
    assert main([*SFT, f"output_dir={tmp_path / 's'}", "train.report_to=[wandbb]"]) == 2
    assert "unknown tracker wandbb" in capsys.readouterr().err


def test_the_run_is_named_by_stage_and_key(tmp_path):
    from transformers import TrainerCallback

    from core.config import load_config
    from data_schemas.config import SFTConfig
    from stages.registry import STAGES

    seen = []

    class RunName(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            seen.append(args.run_name)

    overrides = [f"output_dir={tmp_path / 'sft'}", "model.name_or_path=tiny-random-llama", "train.max_steps=1",
                 f"data.train_file={EXAMPLES / 'instructions_train.jsonl'}", "train.early_stopping_patience=null"]  # fmt: skip
    cfg = load_config(SFTConfig, "configs/sft.yaml", overrides)
    assert STAGES["sft"].run(cfg, callbacks=[RunName()]).status == "complete"
    key = json.loads((tmp_path / "sft" / "manifest.json").read_text())["key"]
    assert seen == [f"sft-{key}"]
