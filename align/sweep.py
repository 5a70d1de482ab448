"""`align sweep`: a hyper-parameter search over one Trainer stage's config, with Optuna.

    align sweep --config configs/sweep.yaml [key=value ...]

Algorithm. Optuna's TPE sampler (Bergstra et al. 2011: a density model of the good and the bad trials so far,
sampling where their ratio is highest) proposes values for the searched fields. Each trial runs the stage in this
process on the base config + the fixed overrides + its values, into `trials/<key>/`, where key is the trial
config's content key (the pipeline's `stage_key`): the same values give the same folder, so a trial that is
already complete is read rather than trained again, and an interrupted one resumes from its checkpoint.

Pruning. At every held-out evaluation the trial reports `prune_on` to Optuna; with `pruner: median` (Optuna's
MedianPruner) a trial whose value is worse than the median of the earlier trials at the same step is stopped
there. Its artifact stays unfinished (the manifest says 'failed' with the reason), never complete.

The objective is the manifest's `metric` once the stage completes. A missing or NaN metric fails the trial, so a
broken run can never become the best one.

Resuming. The study lives in output_dir/study.db (SQLite). Running the same command again continues: it counts
the trials that ended and runs only the missing ones. A trial left RUNNING by a kill is marked failed, and its
values are tried again first. sweep.json (every trial: number, state, values, metric, artifact, and the best) and
sweep.png (the metric per trial with the best so far, and the metric against each searched field) are rewritten
after every trial.
"""

from __future__ import annotations

import gc
import math
import time
from pathlib import Path
from typing import Any

from align.pipeline import stage_key
from core.config import UserError, printable, read_yaml, set_dotted, validate
from core.manifest import atomic_write_json, read_manifest
from core.stage import console
from data_schemas.config import SweepConfig, SweepParam
from stages.registry import STAGES


def trial_config(cfg: SweepConfig, values: dict[str, Any]) -> tuple[Any, str]:
    """(the stage config of a trial with these values, its content key); output_dir is trials/<key>."""
    data = read_yaml(cfg.config)
    for key, value in {**cfg.overrides, **values}.items():
        set_dotted(data, key, value)
    set_dotted(data, "output_dir", str(cfg.output_dir / "trials" / "pending"))
    source = f"{cfg.config} with the sweep's overrides and values {values}"
    stage_cfg = validate(STAGES[cfg.stage].config_model(), data, source)
    key = stage_key(stage_cfg, cfg.output_dir)
    return stage_cfg.model_copy(update={"output_dir": cfg.output_dir / "trials" / key[:16]}), key


def suggest(trial, name: str, p: SweepParam) -> Any:
    if p.type == "categorical":
        return trial.suggest_categorical(name, p.choices)
    if p.type == "int":
        return trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_float(name, p.low, p.high, step=p.step, log=p.log)


def pruning_callback(trial, key: str, warmup: int):
    """A Trainer callback: report `key` at every held-out evaluation; after `warmup` evaluations, stop the trial
    when Optuna says prune."""
    import optuna
    from transformers import TrainerCallback

    class ReportAndPrune(TrainerCallback):
        evaluations = 0

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            value = (metrics or {}).get(key)
            if value is None:
                return
            self.evaluations += 1
            trial.report(float(value), state.global_step)
            if self.evaluations > warmup and trial.should_prune():
                raise optuna.TrialPruned(
                    f"pruned at step {state.global_step}: {key} {float(value):.4g} is worse than the median of the "
                    "earlier trials there"
                )

    return ReportAndPrune()


def objective_value(out: Path, metric: str) -> float:
    """The trial's metric from its complete manifest; a missing or non-finite one fails the trial."""
    m = read_manifest(out)
    value = m.metrics.get(metric)
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{out}: the manifest's metric {metric} is {value!r}; the trial counts as failed")
    return float(value)


def run_trial(cfg: SweepConfig, trial) -> float:
    values = {name: suggest(trial, name, p) for name, p in cfg.params.items()}
    stage_cfg, key = trial_config(cfg, values)
    out = Path(stage_cfg.output_dir)
    trial.set_user_attr("artifact", str(out))
    trial.set_user_attr("key", key)
    console.print(f"trial {trial.number}: {values} -> {printable(str(out))}", highlight=False)
    if (out / "manifest.json").exists() and read_manifest(out).status == "complete":
        console.print(f"trial {trial.number}: the same config is already complete; read, not trained again")
        return objective_value(out, cfg.metric)
    callback = pruning_callback(trial, cfg.prune_on, cfg.pruner_warmup_evaluations)
    try:
        result = STAGES[cfg.stage].run(stage_cfg, resume=out.exists(), callbacks=[callback])
    finally:
        gc.collect()
    if result.status != "complete":
        raise UserError(f"trial {trial.number}: the stage paused (train.stop_after_steps is not for sweeps)")
    return objective_value(out, cfg.metric)


def open_study(cfg: SweepConfig, pruner=None):
    """The study in output_dir/study.db, created or continued; trials a kill left RUNNING are failed and their
    values queued again. `pruner` replaces the configured one (applications that embed align)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    if pruner is None:
        pruner = (
            optuna.pruners.MedianPruner(
                n_startup_trials=cfg.pruner_startup_trials, n_warmup_steps=0, n_min_trials=1
            )
            if cfg.pruner == "median"
            else optuna.pruners.NopPruner()
        )
    storage = f"sqlite:///{(cfg.output_dir / 'study.db').resolve()}"
    study = optuna.create_study(
        study_name="align-sweep", storage=storage, load_if_exists=True, direction=cfg.direction
    )
    # the sampler's seed moves on with the trials already in the study: re-seeded as at the start, a continued
    # study would draw the first trials' values again
    study.sampler = optuna.samplers.TPESampler(
        seed=cfg.seed + len(study.trials), n_startup_trials=min(cfg.n_trials, 5)
    )
    study.pruner = pruner
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(t.params, skip_if_exists=True)
        console.print(f"trial {t.number} was interrupted: marked failed, its values queued again")
    return study


def with_stage_metric(cfg: SweepConfig) -> SweepConfig:
    """The sweep with its metric, pruning metric and direction filled in from its stage's row (its sweep metric)."""
    row = STAGES.get(cfg.stage)
    if row is None or row.sweep is None:
        sweepable = [s.name for s in STAGES.values() if s.sweep is not None]
        raise UserError(f"stage: {cfg.stage!r} cannot be swept; choose one of {', '.join(sweepable)}")
    metric, prune_on, direction = row.sweep
    update: dict[str, Any] = {"metric": cfg.metric or metric}
    if cfg.prune_on is None:
        m = update["metric"]
        update["prune_on"] = prune_on if m == metric else "eval_" + m.removeprefix("eval_")
    if cfg.direction is None:
        if update["metric"] != metric:
            raise UserError(f"direction: say whether {update['metric']} should be minimize(d) or maximize(d)")
        update["direction"] = direction
    return cfg.model_copy(update=update)


def run_sweep(cfg: SweepConfig, pruner=None) -> int:
    import optuna

    cfg = with_stage_metric(cfg)
    # every searched field's every end (and choice) and the fixed overrides are checked against the stage's
    # config before anything runs: a typo is one sentence now, not a failed trial an hour later
    first = {n: _ends(q)[0] for n, q in cfg.params.items()}
    for name, p in cfg.params.items():
        for value in _ends(p):
            trial_config(cfg, {**first, name: value})
    study = open_study(cfg, pruner)
    done = [t for t in study.trials if t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL]
    todo = cfg.n_trials - len(done)
    if todo <= 0:
        console.print(f"sweep: {len(done)} trials already ended (n_trials {cfg.n_trials}); nothing to run")
    start = time.monotonic()
    for _ in range(max(todo, 0)):
        if cfg.timeout_minutes is not None and time.monotonic() - start > cfg.timeout_minutes * 60:
            console.print(f"sweep: timeout_minutes {cfg.timeout_minutes} reached; no new trial started")
            break
        trial = study.ask()
        try:
            value = run_trial(cfg, trial)
        except optuna.TrialPruned as e:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            console.print(f"trial {trial.number}: {e}", highlight=False)
        # a value the stage refuses, or a failed objective: this trial fails, not the sweep
        except UserError as e:
            trial.set_user_attr("error", str(e))
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
                write_summary(cfg, study)
                raise UserError(
                    f"trial {trial.number} failed before any trial completed, so the sweep stops here rather than "
                    f"fail every trial the same way: {e}"
                ) from None
            console.print(f"[red]trial {trial.number} failed[/]: {printable(str(e))}", highlight=False)
        else:
            study.tell(trial, value)
            console.print(f"trial {trial.number}: {cfg.metric} = {value:.6g}", highlight=False)
        write_summary(cfg, study)
    summary = write_summary(cfg, study)
    best = summary["best"]
    if best is None:
        raise UserError(
            f"sweep {cfg.output_dir}: no trial completed ({len(summary['trials'])} tried)", exit_code=1
        )
    console.print(
        f"[green]sweep best[/]: trial {best['number']}, {cfg.metric} = {best['value']:.6g}, {best['params']} -> "
        f"{printable(best['artifact'])}; {printable(str(cfg.output_dir / 'sweep.json'))}, sweep.png",
        highlight=False,
    )
    return 0


def _ends(p: SweepParam) -> list[Any]:
    if p.type == "categorical":
        return list(p.choices)
    return [int(p.low), int(p.high)] if p.type == "int" else [p.low, p.high]


def write_summary(cfg: SweepConfig, study) -> dict[str, Any]:
    import optuna

    trials = [
        {
            "number": t.number,
            "state": t.state.name,
            "params": t.params,
            "value": t.value,
            "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
            "artifact": t.user_attrs.get("artifact"),
            "key": t.user_attrs.get("key"),
            "error": t.user_attrs.get("error"),
        }
        for t in study.get_trials(deepcopy=False)
    ]
    complete = [t for t in trials if t["state"] == optuna.trial.TrialState.COMPLETE.name]
    pick = min if cfg.direction == "minimize" else max
    best = pick(complete, key=lambda t: t["value"]) if complete else None
    summary = {"stage": cfg.stage, "metric": cfg.metric, "direction": cfg.direction, "prune_on": cfg.prune_on,
               "pruner": cfg.pruner, "n_trials": cfg.n_trials, "best": best, "trials": trials}  # fmt: skip
    atomic_write_json(cfg.output_dir / "sweep.json", summary)
    if trials:
        plot(summary, cfg.output_dir / "sweep.png")
    return summary


def plot(summary: dict[str, Any], path: Path) -> None:
    """The metric of every trial with the best so far, then the metric against each searched field (up to 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = summary["trials"]
    done = [t for t in trials if t["state"] == "COMPLETE"]
    names = sorted({k for t in trials for k in t["params"]})[:3]
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(4.2 * (1 + len(names)), 3.6), squeeze=False)
    ax = axes[0][0]
    ax.plot([t["number"] for t in done], [t["value"] for t in done], "o", label="complete")
    pruned = [t for t in trials if t["state"] == "PRUNED" and t["intermediate"]]
    ax.plot(
        [t["number"] for t in pruned], [list(t["intermediate"].values())[-1] for t in pruned], "x",
        color="grey", label="pruned (last evaluation)",
    )  # fmt: skip
    best, run = [], math.inf if summary["direction"] == "minimize" else -math.inf
    for t in done:
        run = min(run, t["value"]) if summary["direction"] == "minimize" else max(run, t["value"])
        best.append(run)
    ax.step([t["number"] for t in done], best, where="post", color="C1", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(summary["metric"])
    ax.legend(fontsize=7)
    for ax, name in zip(axes[0][1:], names, strict=True):
        xs = [t["params"][name] for t in done if name in t["params"]]
        ax.plot(xs, [t["value"] for t in done if name in t["params"]], "o")
        if xs and all(isinstance(x, int | float) for x in xs) and min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(name)
    fig.suptitle(f"align sweep: {summary['stage']}, {summary['direction']} {summary['metric']}", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)  # atomic: a reader never sees half a plot
    plt.close(fig)
