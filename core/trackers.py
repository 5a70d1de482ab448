"""align's record in the team's experiment trackers (W&B, MLflow, TensorBoard, ...), beside the training metrics.

The Trainer stages (SFT, reward, DPO) log their metrics through transformers' own integrations (`train.report_to`
becomes TrainingArguments.report_to), PPO through accelerate's trackers. Neither knows what align knows: the stage's
config as align validated it, the artifact key, the gates' verdicts and sample completions. `Tracking` adds them to
the run the integration opened, through each tracker's own API (a row of WRITERS per tracker), and closes that run
when the stage ends, so that the next stage of `align run` opens a run of its own. A tracker without a row gets
the metrics only (docs/trackers.md). Every run is named `<stage>-<artifact key>`.

Only the main process writes; a tracker that is not installed is refused before any model loads
(`require_trackers`), with its pip line.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from core.config import UserError
from data_schemas.config import TRACKERS

SAMPLE_COLUMNS = ("source", "prompt", "completion", "reference", "reward")
MAX_SAMPLES = 64  # rows per table: enough to read, small enough for any tracker


def require_trackers(names: list[str]) -> None:
    """Every tracker in train.report_to is installed, or one sentence with its pip line (before any model loads)."""
    for name in names:
        module, package = TRACKERS.get(name, (None, None))
        if module is not None and importlib.util.find_spec(module.split(".")[0]) is None:
            raise UserError(
                f"train.report_to: {name} is not installed; pip install {package} (or leave {name} out of "
                "train.report_to)"
            )


@dataclass
class RunInfo:
    stage: str
    key: str
    out: Path
    config: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.stage}-{self.key}"

    def flat_config(self) -> dict[str, str]:
        """The config as dotted keys with printable values (trackers' parameter tables are flat)."""
        flat: dict[str, str] = {}

        def walk(prefix: str, v: Any) -> None:
            if isinstance(v, dict):
                for k, x in v.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), x)
            else:
                flat[prefix] = json.dumps(v, default=str) if not isinstance(v, str) else v

        walk("", self.config)
        return flat


class Writer(Protocol):
    """One tracker's way of taking align's record: `begin` once its run is open, `end` after the gates."""

    def begin(self, info: RunInfo) -> None: ...

    def end(self, info: RunInfo, gates: list[dict[str, Any]], samples: list[dict[str, Any]]) -> None: ...


class WandbWriter:
    """The run WandbCallback (or accelerate's W&B tracker) opened: config under `align`, the key as a tag, gate
    verdicts in the summary, samples as a `wandb.Table`; finished at the stage's end."""

    def __init__(self) -> None:
        self.run = None

    def begin(self, info: RunInfo) -> None:
        import wandb

        self.run = wandb.run or wandb.init(
            project=os.environ.get("WANDB_PROJECT", "align"), name=info.name, reinit="finish_previous"
        )
        self.run.config.update(
            {"align": info.config, "align_stage": info.stage, "align_key": info.key}, allow_val_change=True
        )
        self.run.tags = tuple(sorted({*(self.run.tags or ()), "align", info.stage, f"key:{info.key}"}))

    def end(self, info: RunInfo, gates: list[dict[str, Any]], samples: list[dict[str, Any]]) -> None:
        import wandb

        run = self.run or wandb.run
        if run is None:
            return
        for g in gates:
            run.summary[f"align/gate/{g['gate']}"] = g["verdict"]
        run.summary["align/key"] = info.key
        if samples:
            table = wandb.Table(
                columns=list(SAMPLE_COLUMNS), data=[[s.get(c) for c in SAMPLE_COLUMNS] for s in samples]
            )
            run.log({"align/samples": table})
        run.finish()
        self.run = None


class MLflowWriter:
    """The run MLflowCallback (or accelerate's MLflow tracker) opened: the key and stage as tags, the config as an
    artifact (align/config.json) and as parameters, gate verdicts as tags, samples as a table (align/samples.json);
    reopened by id after the Trainer has ended it, ended at the stage's end."""

    def __init__(self) -> None:
        self.run_id: str | None = None

    def begin(self, info: RunInfo) -> None:
        import mlflow

        active = mlflow.active_run() or mlflow.start_run(run_name=info.name)
        self.run_id = active.info.run_id
        mlflow.set_tags({"align.stage": info.stage, "align.key": info.key, "mlflow.runName": info.name})
        mlflow.log_dict(info.config, "align/config.json")
        logged = set(
            mlflow.get_run(self.run_id).data.params
        )  # the Trainer's own parameters are not re-logged
        params = {f"align.{k}": v[:6000] for k, v in info.flat_config().items() if f"align.{k}" not in logged}
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per call
            mlflow.log_params(dict(items[i : i + 100]))

    def end(self, info: RunInfo, gates: list[dict[str, Any]], samples: list[dict[str, Any]]) -> None:
        import mlflow

        if self.run_id is None:
            return
        if mlflow.active_run() is None or mlflow.active_run().info.run_id != self.run_id:
            mlflow.start_run(run_id=self.run_id)
        mlflow.set_tags({f"align.gate.{g['gate']}": g["verdict"] for g in gates})
        if samples:
            mlflow.log_table({c: [s.get(c) for s in samples] for c in SAMPLE_COLUMNS}, "align/samples.json")
        mlflow.end_run()
        self.run_id = None


class TensorBoardWriter:
    """Text panels beside the scalars in the artifact's logs/: the config, the key, the gates and the samples."""

    def begin(self, info: RunInfo) -> None:
        text = "```yaml\n" + yaml.safe_dump(info.config, sort_keys=False) + "```"
        self._write(info, lambda w: (w.add_text("align/config", text), w.add_text("align/key", info.key)))

    def end(self, info: RunInfo, gates: list[dict[str, Any]], samples: list[dict[str, Any]]) -> None:
        rows = ["| gate | verdict |", "|---|---|", *(f"| {g['gate']} | {g['verdict']} |" for g in gates)]
        table = ["| " + " | ".join(SAMPLE_COLUMNS) + " |", "|" + "---|" * len(SAMPLE_COLUMNS)]
        table += ["| " + " | ".join(_cell(s.get(c)) for c in SAMPLE_COLUMNS) + " |" for s in samples]

        def write(w) -> None:
            w.add_text("align/gates", "\n".join(rows))
            if samples:
                w.add_text("align/samples", "\n".join(table))

        self._write(info, write)

    @staticmethod
    def _write(info: RunInfo, fn) -> None:
        from torch.utils.tensorboard import SummaryWriter

        w = SummaryWriter(log_dir=str(info.out / "logs"))
        try:
            fn(w)
        finally:
            w.close()


def _text(x: Any) -> str | None:
    """A prompt as one string (chat messages as their JSON)."""
    return x if x is None or isinstance(x, str) else json.dumps(x, ensure_ascii=False)


def _cell(x: Any) -> str:
    return str("" if x is None else x).replace("|", "/").replace("\n", " ")[:500]


WRITERS: dict[str, type] = {"wandb": WandbWriter, "mlflow": MLflowWriter, "tensorboard": TensorBoardWriter}


@dataclass
class Tracking:
    """The trackers of one stage run (main process only): `begin` once the integrations' runs are open, `end`
    with the gates and samples when the stage completes."""

    names: list[str]
    info: RunInfo | None = None
    writers: dict[str, Any] = field(default_factory=dict)
    begun: bool = False

    def begin(self, info: RunInfo) -> None:
        if self.begun:
            return
        self.info, self.begun = info, True
        self.writers = {n: WRITERS[n]() for n in self.names if n in WRITERS}
        for w in self.writers.values():
            w.begin(info)

    def end(self, gates: list[dict[str, Any]], samples: list[dict[str, Any]]) -> None:
        if not self.begun or self.info is None:
            return
        for w in self.writers.values():
            w.end(self.info, gates, samples[:MAX_SAMPLES])
        self.begun = False


def artifact_samples(out: Path) -> list[dict[str, Any]]:
    """Sample completions a stage left in its artifact: the policy gate's answers (policy and parent, with their
    rewards) and PPO's rollouts (samples.jsonl, the last iterations first)."""
    rows: list[dict[str, Any]] = []
    gate = Path(out) / "gates" / "policy" / "samples.json"
    if gate.exists():
        try:
            for s in json.loads(gate.read_text(encoding="utf-8")):
                rows.append({"source": "policy gate: policy", "prompt": _text(s.get("prompt")),
                             "completion": s.get("policy"), "reference": s.get("parent"),
                             "reward": s.get("policy_reward")})  # fmt: skip
        except (ValueError, AttributeError):
            pass
    rollouts = Path(out) / "samples.jsonl"
    if rollouts.exists():
        lines = rollouts.read_text(encoding="utf-8").splitlines()
        for line in reversed(lines[-MAX_SAMPLES:]):
            try:
                s = json.loads(line)
            except ValueError:
                continue
            rows.append({"source": f"rollout, iteration {s.get('step')}", "prompt": _text(s.get("prompt")),
                         "completion": s.get("response"), "reference": None, "reward": s.get("score")})  # fmt: skip
    return rows
