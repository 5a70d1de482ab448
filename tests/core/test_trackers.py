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


# ---- W&B (offline) and MLflow (a local file store) for every stage, for real ------------------------------------
def _rankings(path, n=24):
    rows = [{"prompt_id": f"p{i}", "prompt": f"Tell me about tea ({i})", "annotator": "ann", "ranking": ["g", "b"],
             "responses": [{"id": "g", "text": "gladly, tea is a drink"}, {"id": "b", "text": "no"}]}
            for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _pairs(path, n=16):
    rows = [{"prompt": f"Tell me about tea ({i})", "chosen": "gladly, tea is a drink", "rejected": "no"}
            for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    out = tmp_path_factory.mktemp("trackers") / "sft"
    assert main([*SFT, f"output_dir={out}", "train.max_steps=1", "train.report_to=[none]"]) == 0
    return out


def _stage_args(stage, root, sft):
    if stage == "sft":
        return [*SFT, "train.max_steps=2", "train.logging_steps=1"]
    if stage == "reward":
        _rankings(root / "r.jsonl")
        assert main(["data", "build-preferences", str(root / "r.jsonl"), "--out", str(root / "prefs"),
                     "--set", "validation_fraction=0.25"]) == 0  # fmt: skip
        return ["reward", "--config", "configs/reward.yaml", f"init_from={sft}", f"data.preferences_dir={root / 'prefs'}",
                "train.max_steps=2", "train.logging_steps=1", "train.groups_per_batch=4", "gate.min_pairs=2"]  # fmt: skip
    if stage == "dpo":
        _pairs(root / "pairs.jsonl")
        return ["dpo", "--config", "configs/dpo.yaml", f"init_from={sft}", "data.preferences_dir=null",
                f"data.pairs_file={root / 'pairs.jsonl'}", "data.validation_fraction=0.25", "train.max_steps=2",
                "train.logging_steps=1", "train.per_device_train_batch_size=4", "eval.prompts=2",
                "eval.max_new_tokens=4", "perplexity_gate.min_examples=5",
                "perplexity_gate.max_relative_increase=1000"]  # fmt: skip
    return ["ppo", "--config", "configs/ppo.yaml", f"init_from={sft}", "reward.artifact=null",
            "reward.rule={kind: contains, text: a}", "reward.missing_eos_penalty=null", "rollout.engine=generate",
            "rollout.max_new_tokens=6", "train.steps=2", "train.rollout_batch_size=4", "train.mini_batch_size=4",
            "prompts.heldout_prompts=2", "policy_gate.min_prompts=2", "policy_gate.max_new_tokens=6",
            "perplexity_gate.min_examples=5", "perplexity_gate.max_relative_increase=1000"]  # fmt: skip


def wandb_records(path):
    """The records of an offline W&B run file (run-*.wandb): W&B's log format, LevelDB's framing (a 7-byte file
    header, 32 KiB blocks, each chunk behind a 7-byte header: crc32, length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4)
    around the protobuf `Record`s wandb itself writes and syncs."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, chunks, out = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7]) if left >= 7 else (0, 0)
        if left < 7 or (length == 0 and kind == 0):  # a block's padding
            pos += left
            continue
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunks)
            out.append(record)
            chunks = b""
    return out


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "ppo"])
def test_every_stage_logs_align_record_to_wandb_and_mlflow(stage, tiny_sft, tmp_path, monkeypatch):
    """One run per stage in each tracker, named `<stage>-<key>`: the training metrics (transformers' or
    accelerate's integration), align's config and key, every gate's verdict, and sample completions as a table
    where the stage made some (PPO's rollouts, the policy gate's answers)."""
    import mlflow
    import wandb
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()  # wandb reads its settings (WANDB_DIR) once per process: this test's, afresh
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(
        "MLFLOW_ALLOW_FILE_STORE", "true"
    )  # MLflow 3.18 keeps its file store behind this switch
    mlflow.set_tracking_uri(uri)
    out = tmp_path / stage
    code = main([*_stage_args(stage, tmp_path, tiny_sft), f"output_dir={out}",
                 "train.report_to=[wandb,mlflow,tensorboard]"])  # fmt: skip
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and code in (0, 1)
    name, verdicts = f"{stage}-{m['key']}", {g["gate"]: g["verdict"] for g in m["gates"]}

    client = MlflowClient(uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    run = next(r for r in runs if r.data.tags.get("align.key") == m["key"])
    assert run.info.run_name == name and run.data.tags["align.stage"] == stage
    assert run.data.metrics  # the training metrics went to the same run
    assert {f"align.gate.{g}": v for g, v in verdicts.items()}.items() <= run.data.tags.items()
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "align")}
    assert "align/config.json" in logged and (stage != "ppo" or "align/samples.json" in logged)
    assert run.info.status == "FINISHED"  # closed at the stage's end: the next stage opens its own

    (wandb_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(wandb_file)
    assert {r.run.display_name for r in records if r.WhichOneof("record_type") == "run"} == {name}
    config = {u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for u in r.config.update if u.key}  # fmt: skip
    assert config["align_key"] == m["key"] and config["align"]["output_dir"] == str(out)
    summary = {u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "summary"
               for u in r.summary.update if u.key}  # fmt: skip
    assert {f"align/gate/{g}": v for g, v in verdicts.items()}.items() <= summary.items()
    logged = {"/".join(i.nested_key) or i.key for r in records if r.WhichOneof("record_type") == "history"
              for i in r.history.item}  # fmt: skip
    assert any(k.endswith("loss") or k.startswith("ppo/") for k in logged)  # the training metrics
    assert stage != "ppo" or "align/samples/_type" in logged  # rollouts as a wandb.Table
    assert any((out / "logs").rglob("events.out.tfevents*"))  # TensorBoard beside them
