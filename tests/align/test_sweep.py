"""`align sweep` through the real CLI on the tiny model: keyed trial artifacts, the best trial, resuming the study,
pruning, and bad sweep configs."""

from __future__ import annotations

import json

import pytest
import yaml

from align.cli import main
from tests.conftest import EXAMPLES

FIXED = {
    "model.name_or_path": "tiny-random-llama",
    "data.train_file": str(EXAMPLES / "instructions_train.jsonl"),
    "data.validation_file": str(EXAMPLES / "instructions_validation.jsonl"),
    "train.max_steps": 4,
    "train.eval_steps": 2,
    "train.save_steps": 2,
    "train.early_stopping_patience": None,
    "train.report_to": ["none"],
}


def write_sweep(path, out, n_trials=3, **extra):
    sweep = {
        "stage": "sft",
        "config": "configs/sft.yaml",
        "overrides": FIXED,
        "output_dir": str(out),
        "n_trials": n_trials,
        "params": {
            "train.learning_rate": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
            "lora.r": {"type": "categorical", "choices": [4, 8]},
        },
        "pruner": "none",
        **extra,
    }
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_model_path):
    d = tmp_path_factory.mktemp("sweep")
    cfg = write_sweep(d / "sweep.yaml", d / "out")
    assert main(["sweep", "--config", str(cfg)]) == 0
    return d, cfg


def test_each_trial_is_a_keyed_artifact_and_the_best_is_the_lowest(swept):
    from align.sweep import trial_config
    from core.config import load_config
    from data_schemas.config import SweepConfig

    d, cfg_path = swept
    cfg = load_config(SweepConfig, cfg_path)
    s = json.loads((d / "out" / "sweep.json").read_text())
    trials = s["trials"]
    assert len(trials) == 3 and all(t["state"] == "COMPLETE" for t in trials)
    for t in trials:
        stage_cfg, key = trial_config(cfg, t["params"])  # the folder is the trial config's content key
        assert key == t["key"] and stage_cfg.output_dir == d / "out" / "trials" / key[:16]
        m = json.loads((d / "out" / "trials" / t["key"][:16] / "manifest.json").read_text())
        assert m["status"] == "complete"
        assert m["metrics"]["eval_loss"] == t["value"]
        written = yaml.safe_load((d / "out" / "trials" / t["key"][:16] / "config.yaml").read_text())
        assert written["train"]["learning_rate"] == t["params"]["train.learning_rate"]
        assert written["lora"]["r"] == t["params"]["lora.r"] and written["train"]["max_steps"] == 4
        assert list(t["intermediate"]) == ["2", "4"]  # held-out loss reported at each evaluation
    assert s["best"]["value"] == min(t["value"] for t in trials)
    assert s["metric"] == "eval_loss" and s["direction"] == "minimize"
    assert (d / "out" / "sweep.png").stat().st_size > 5000


def test_rerun_continues_the_study(swept, capsys):
    d, cfg = swept
    assert main(["sweep", "--config", str(cfg)]) == 0  # 3 of 3 ended: nothing runs
    assert "nothing to run" in " ".join(capsys.readouterr().err.split())
    assert main(["sweep", "--config", str(cfg), "n_trials=4"]) == 0  # one more trial only
    s = json.loads((d / "out" / "sweep.json").read_text())
    assert [t["number"] for t in s["trials"]] == [0, 1, 2, 3]
    assert len({t["key"] for t in s["trials"]}) == 4


def test_a_trial_worse_than_the_median_is_pruned(tmp_path, tiny_model_path):
    """Trial 0 learns (learning rate 3e-2 on the tiny random model: held-out loss 10.87 -> 10.61 by step 2); trial 1
    barely moves (1e-4: still 10.87 at step 2), worse than the median of the earlier trials there, so the median
    pruner (one startup trial) stops it at that evaluation, unfinished."""
    import optuna

    from align.sweep import open_study, run_sweep
    from core.config import load_config
    from data_schemas.config import SweepConfig

    cfg = load_config(SweepConfig, write_sweep(tmp_path / "s.yaml", tmp_path / "out", n_trials=2, pruner="median",
                                                pruner_startup_trials=1, pruner_warmup_evaluations=0))  # fmt: skip
    study = open_study(cfg)
    study.enqueue_trial({"train.learning_rate": 3e-2, "lora.r": 4})
    study.enqueue_trial({"train.learning_rate": 1e-4, "lora.r": 4})
    assert run_sweep(cfg) == 0
    trials = json.loads((tmp_path / "out" / "sweep.json").read_text())["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE", "PRUNED"]
    assert list(trials[1]["intermediate"]) == ["2"]  # stopped at its first evaluation
    pruned = json.loads((tmp_path / "out" / "trials" / trials[1]["key"][:16] / "manifest.json").read_text())
    assert pruned["status"] == "failed" and "pruned at step 2" in json.dumps(pruned)
    assert optuna.trial.TrialState.PRUNED.name == "PRUNED"


@pytest.mark.parametrize(
    "change, message",
    [({"params": {"train.learnig_rate": {"type": "float", "low": 1e-4, "high": 1e-3}}}, "train.learnig_rate: unknown key"),
     ({"params": {"lora.r": {"type": "int", "low": 0, "high": 8}}}, "lora.r: Input should be greater than or equal to 1"),
     ({"params": {"lora.r": {"type": "int", "low": 8}}}, "takes low and high"),
     ({"metric": "eval_accuracy"}, "direction: say whether"),
     ({"overrides": {**FIXED, "lora.r": 4}}, "both searched")],
)  # fmt: skip
def test_bad_sweeps_are_refused_before_any_trial(tmp_path, capsys, change, message):
    cfg = write_sweep(tmp_path / "s.yaml", tmp_path / "out", **change)
    assert main(["sweep", "--config", str(cfg)]) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out" / "trials").exists()


def test_a_first_trial_that_fails_stops_the_sweep_with_its_reason(tmp_path, capsys):
    """A missing data file would fail every trial alike: the sweep says so once, exit 2, instead of n_trials times."""
    cfg = write_sweep(tmp_path / "s.yaml", tmp_path / "out", n_trials=5,
                      overrides={**FIXED, "data.train_file": str(tmp_path / "missing.jsonl")})  # fmt: skip
    assert main(["sweep", "--config", str(cfg)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "trial 0 failed before any trial completed" in err and "missing.jsonl" in err
    trials = json.loads((tmp_path / "out" / "sweep.json").read_text())["trials"]
    assert [t["state"] for t in trials] == ["FAIL"]
