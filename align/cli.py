"""The `align` command line.

    align sft  --config configs/sft.yaml [key=value ...] [--resume]   (also: reward, dpo, ppo)
    align eval perplexity --model REF --data FILE
    align eval generate --model REF --data FILE [--out DIR]
    align eval gate perplexity --candidate REF --parent REF --data FILE --out DIR [--config configs/gates.yaml]
    align gate override|sign|verify ...
    align model prepare [NAME]
    align export ARTIFACT --to DIR [--adapter [--base NAME]] [--push-to-hub OWNER/NAME] [--gguf]
    align sweep --config configs/sweep.yaml [key=value ...]

REF is a model alias, a checkpoint folder, a hub id, or an align artifact directory (its adapter is applied).
Exit status: 0 success / gate passed, 1 gate failed or internal error, 2 bad config or input, 3 paused at
train.stop_after_steps (continue with --resume), 130 interrupted.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from rich.console import Console

from align import __version__, annotate
from align.data_cli import run_data_command
from align.launch import relaunch, strip_launch_flags
from align.pipeline import run_pipeline, write_run_report
from align.sweep import run_sweep
from core.config import UserError, apply_overrides, config_help, load_config, printable, read_yaml
from core.dist import capacity as dist_capacity
from core.manifest import atomic_write_json, atomic_write_text
from core.plan import (
    GIB,
    OFFLOADS,
    SHARDINGS,
    cluster_lines,
    estimate,
    layout_data,
    layouts,
    plan_data,
    smallest_fit,
)
from core.readers import load_instructions
from core.stage import print_gate, print_skipped
from data_schemas.config import DataBuildConfig, PipelineConfig, PreferencesConfig, SweepConfig
from eval import signoff
from eval.registry import GATES, gate_settings
from eval.task_metrics import prompts_and_references, task_metrics
from lib.rankings import CONVERTERS
from stages.registry import STAGES

err = Console(stderr=True, soft_wrap=True)  # no line breaks inside paths and commands people copy
out = Console()


def _add_config_args(
    p: argparse.ArgumentParser, model=None, example: str = "train.learning_rate=1e-4"
) -> None:
    """--config and the overrides; with `model`, --help lists every key of it (core.config.config_help)."""
    p.add_argument("--config", type=Path, help="YAML config (see configs/)")
    p.add_argument(
        "overrides",
        nargs="*",
        help=f"dotted overrides, e.g. {example} (or --{example.replace('=', ' ')}; TRL's names work too)",
    )
    if model is not None:
        p.epilog = config_help(model)
        p.formatter_class = argparse.RawDescriptionHelpFormatter


def _add_launch_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several processes (align/launch.py, docs/distributed.md)")
    g.add_argument(
        "--num-processes",
        type=int,
        default=1,
        metavar="N",
        help="run in N processes on this machine (one per GPU), through torchrun's launcher",
    )
    g.add_argument("--nnodes", default="1", help="machines taking part (with --rdzv-endpoint), as torchrun")
    g.add_argument("--node-rank", type=int, default=None, help="this machine's rank among --nnodes")
    g.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT every machine can reach (rendezvous)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="align", description="Alignment toolkit: data, SFT, reward, PPO/DPO, gates."
    )
    ap.add_argument("--version", action="version", version=f"align {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    for stage in STAGES.values():
        if stage.command:
            p = sub.add_parser(stage.name, help=stage.help)
            _add_config_args(p, stage.config_model())
            p.add_argument(
                "--resume", action="store_true", help="continue from the latest checkpoint in output_dir"
            )
            p.add_argument(
                "--force",
                action="store_true",
                help="with --resume: continue even though the config or inputs changed since the run started",
            )
            if stage.trains:
                _add_launch_args(p)
    pl = sub.add_parser("plan", help="estimate a training stage's peak memory and whether it fits here")
    _add_config_args(pl)
    pl.add_argument(
        "--stage",
        choices=[s.name for s in STAGES.values() if s.trains],
        help="default: the config file's name",
    )
    pl.add_argument("--device", help="cpu or cuda (default: this machine's)")
    pl.add_argument(
        "--gpus",
        type=int,
        help="plan for up to this many processes (one per GPU): every sharding and offload, per process, and the "
        "smallest layout that fits",
    )
    pl.add_argument(
        "--gpu-memory", type=float, help="GiB per GPU with --gpus (default: this machine's free memory)"
    )
    pl.add_argument(
        "--sharding", nargs="+", choices=list(SHARDINGS), help="with --gpus: only these shardings"
    )
    pl.add_argument("--offload", nargs="+", choices=list(OFFLOADS), help="with --gpus: only these offloads")
    pl.add_argument(
        "--host-memory",
        type=float,
        help="GiB of host memory per machine with --gpus, shared by its processes (up to 8): what an offloading "
        "layout moves there must fit it (default: this machine's available memory)",
    )
    pl.add_argument("--json", action="store_true", help="print JSON only")
    sw = sub.add_parser("sweep", help="hyper-parameter search over a stage's config (Optuna, with pruning)")
    _add_config_args(sw, SweepConfig, "n_trials=20")
    sc = sub.add_parser("score", help="score (prompt, response) rows with a reward artifact")
    sc.add_argument("--reward", required=True, type=Path, help="an `align reward` artifact directory")
    sc.add_argument("--input", required=True, type=Path, help="JSONL rows with 'prompt' and 'response'")
    sc.add_argument("--out", required=True, type=Path, help="JSONL to write (input rows + 'reward')")

    ev = sub.add_parser("eval", help="evaluation and gates").add_subparsers(
        dest="eval_command", metavar="WHAT"
    )
    pp = ev.add_parser("perplexity", help="token-weighted perplexity of a model or artifact on a dataset")
    pp.add_argument("--model", required=True, help="alias, checkpoint folder, hub id or align artifact dir")
    pp.add_argument("--data", required=True, type=Path, help="instruction data file or built dataset folder")
    pp.add_argument("--scope", choices=["assistant", "all"], default="assistant")
    pp.add_argument("--max-length", type=int, default=512)
    pp.add_argument("--batch-size", type=int, default=8)
    pp.add_argument("--max-examples", type=int, default=None)
    pp.add_argument("--json", action="store_true", help="print JSON only")
    gen = ev.add_parser("generate", help="answer held-out instructions and score them against the references")
    gen.add_argument("--model", required=True, help="alias, checkpoint folder, hub id or align artifact dir")
    gen.add_argument(
        "--data", required=True, type=Path, help="instruction data (the last answer is the reference)"
    )
    gen.add_argument("--out", type=Path, help="folder for predictions.jsonl and metrics.json")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--batch-size", type=int, default=16)
    gen.add_argument("--max-examples", type=int, default=None)
    gen.add_argument("--json", action="store_true", help="print JSON only")
    gate = ev.add_parser("gate", help="compare a candidate with its parent and decide")
    gsub = gate.add_subparsers(dest="gate_kind", metavar="KIND")
    for g in GATES.values():
        gp = gsub.add_parser(g.name, help=g.help)
        gp.add_argument("--candidate", required=True)
        gp.add_argument("--parent", required=True, help="usually the base model, or the parent artifact")
        if g.needs_data:
            gp.add_argument("--data", required=True, type=Path)
        gp.add_argument("--out", required=True, type=Path, help="folder for gate.json, gate.md and gate.html")
        _add_config_args(gp)

    rp = sub.add_parser(
        "run", help="the whole pipeline in one run directory, stopping at the first failed gate"
    )
    _add_config_args(rp, PipelineConfig, "run_dir=runs/mine")
    rp.add_argument("--from", dest="from_stage", help="redo this stage and every later one")
    _add_launch_args(rp)
    ex = sub.add_parser(
        "export",
        help="write an artifact's model as a standard folder (transformers, PEFT, vLLM, a model hub, GGUF)",
        description="Rebuilds the model as align computes with it (every adapter of its stack folded in), writes "
        "safetensors, config, tokenizer with chat template, generation config and model card, loads the folder back "
        "with plain transformers/PEFT and checks it computes align's outputs, then moves it into place.",
    )
    ex.add_argument("artifact", type=Path, help="an sft, reward, dpo or ppo artifact folder")
    ex.add_argument("--to", type=Path, required=True, help="the folder to write (new or empty; see --force)")
    ex.add_argument(
        "--adapter",
        action="store_true",
        help="write one PEFT LoRA relative to the base model instead of whole weights (LoRA stacks only)",
    )
    ex.add_argument(
        "--base",
        default=None,
        help="with --adapter: the base the adapter names (a hub id or a path); default: the model as configured",
    )
    ex.add_argument(
        "--dtype",
        default="auto",
        help="weights' dtype: auto (the base checkpoint's), float32, bfloat16 or float16",
    )
    ex.add_argument("--force", action="store_true", help="replace a non-empty --to folder")
    ex.add_argument("--push-to-hub", metavar="OWNER/NAME", default=None, help="upload the checked folder")
    ex.add_argument(
        "--public", action="store_true", help="with --push-to-hub: a public repository (default private)"
    )
    ex.add_argument("--gguf", action="store_true", help="also write a GGUF file with llama.cpp's converter")
    ex.add_argument(
        "--gguf-converter", default=None, metavar="PATH", help="llama.cpp's convert_hf_to_gguf.py"
    )
    ex.add_argument("--gguf-type", default="f16", help="the converter's --outtype (f32, f16, bf16, q8_0)")
    rep = sub.add_parser("report", help="render a run directory's report (report.html, report.md)")
    rep.add_argument("run_dir", type=Path)
    go = sub.add_parser("gate", help="gate records").add_subparsers(dest="gate_command", metavar="WHAT")
    ov = go.add_parser("override", help="a named reviewer overrides a failed gate, with a reason (recorded)")
    ov.add_argument("gate_dir", type=Path, help="the folder holding the gate's gate.json")
    ov.add_argument("--reviewer", required=True)
    ov.add_argument("--reason", required=True)
    sg = go.add_parser(
        "sign", help="record a reviewer's decision on a run or a gate, bound to the hashes of its evidence"
    )
    sg.add_argument("target", type=Path, help="a run folder (pipeline.json) or a gate folder (gate.json)")
    sg.add_argument("--reviewer", required=True, help="who signs")
    sg.add_argument("--decision", required=True, choices=["approve", "reject", "conditions"])
    sg.add_argument("--note", default="", help="conditions or remarks (required with --decision conditions)")
    sg.add_argument(
        "--key", type=Path, default=None, help="sign with this SSH private key (ssh-keygen -Y sign)"
    )
    vf = go.add_parser(
        "verify", help="check every sign-off of a run or gate against its evidence as it is now"
    )
    vf.add_argument("target", type=Path)
    vf.add_argument(
        "--allowed-signers",
        type=Path,
        default=None,
        help="OpenSSH allowed_signers naming each reviewer's key",
    )

    annotate.add_arguments(sub)

    mp = sub.add_parser("model", help="model utilities").add_subparsers(dest="model_command", metavar="WHAT")
    prep = mp.add_parser("prepare", help="convert/cache a built-in model and print its folder")
    prep.add_argument("name", nargs="?", default="smollm2-135m-instruct")

    dp = sub.add_parser("data", help="datasets and ranking files").add_subparsers(
        dest="data_command", metavar="WHAT"
    )
    b = dp.add_parser("build", help="instruction files -> cleaned, deduplicated, split dataset folder")
    b.add_argument(
        "inputs",
        nargs="*",
        help="instruction files (or set inputs in --config), and KEY=VALUE overrides (e.g. dedup.threshold=0.9)",
    )
    b.add_argument("--out", type=Path, help="artifact directory (output_dir)")
    b.add_argument("--strict", action="store_true", help="exit 2 and write nothing if any row is dropped")
    b.add_argument(
        "--resume", action="store_true", help="finish an interrupted build in --out (it is rebuilt)"
    )
    b.add_argument("--config", type=Path, help="YAML config (configs/data.yaml)")
    b.epilog, b.formatter_class = config_help(DataBuildConfig), argparse.RawDescriptionHelpFormatter
    b.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, repeatable (the same as KEY=VALUE after the inputs)",
    )
    c = dp.add_parser("check-rankings", help="validate ranking files; summary and annotator agreement")
    c.add_argument("files", nargs="+", type=Path)
    c.add_argument("--json", action="store_true", help="machine-readable summary on stdout")
    c.add_argument("--strict", action="store_true", help="exit 2 if any line is dropped")
    c.add_argument("--conflicts", choices=["drop", "keep-latest"], default="drop")
    c.add_argument("--show", type=int, default=20, help="how many rejected lines to print (default 20)")
    i = dp.add_parser("import-rankings", help="convert other preference formats into ranking files")
    i.add_argument("--from", dest="fmt", required=True, choices=list(CONVERTERS))
    i.add_argument("inputs", nargs="+", type=Path)
    i.add_argument("--out", required=True, type=Path, help="ranking JSONL to write")
    i.add_argument("--annotator", help="annotator name for imported judgments (default: import:FORMAT:FILE)")
    i.add_argument("--strict", action="store_true", help="exit 2 if any input row could not be converted")
    bp = dp.add_parser("build-preferences", help="ranking files -> K-wise groups and pairs for reward/DPO")
    bp.add_argument(
        "inputs",
        nargs="*",
        help="ranking files (or set inputs in --config), and KEY=VALUE overrides (e.g. validation_fraction=0.2)",
    )
    bp.add_argument("--out", type=Path, help="artifact directory (output_dir)")
    bp.add_argument("--strict", action="store_true")
    bp.add_argument(
        "--resume", action="store_true", help="finish an interrupted build in --out (it is rebuilt)"
    )
    bp.add_argument("--config", type=Path, help="YAML config (configs/preferences.yaml)")
    bp.epilog, bp.formatter_class = config_help(PreferencesConfig), argparse.RawDescriptionHelpFormatter
    bp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ar = dp.add_parser(
        "arithmetic", help="a verifiable task: arithmetic word problems with exact answers (GRPO)"
    )
    ar.add_argument("--out", required=True, type=Path, help="folder for train.jsonl and test.jsonl")
    ar.add_argument("--train", type=int, default=1000, help="training problems (default 1000)")
    ar.add_argument(
        "--test", type=int, default=200, help="held-out problems, none shared with train (default 200)"
    )
    ar.add_argument("--seed", type=int, default=0, help="the same seed gives the same files (default 0)")
    ar.add_argument("--max-operand", type=int, default=20, help="largest number in a problem (default 20)")
    ar.add_argument("--max-steps", type=int, default=1, help="operations per problem, 1 or more (default 1)")
    return ap


def _cmd_stage(a) -> int:
    """`align sft|reward|dpo|ppo --config X [overrides] [--resume]`: any stage of the table, one way."""

    stage = STAGES[a.command]
    result = stage.run(
        load_config(stage.config_model(), a.config, a.overrides), resume=a.resume, force=a.force
    )
    return result.exit_code


def _cmd_plan(a) -> int:
    """`align plan --config X [KEY=VALUE ...] [--stage S]`: that stage's config, estimated (core/plan.py)."""
    stages = [s.name for s in STAGES.values() if s.trains]
    a.stage = a.stage or next((s for s in stages if a.config and a.config.stem.startswith(s)), None)
    if a.stage is None:
        raise UserError(f"align plan: say which stage the config is for: --stage {'|'.join(stages)}")
    cfg = load_config(STAGES[a.stage].config_model(), a.config, a.overrides)
    gpu = (
        a.gpus is not None and cfg.precision == "auto"
    )  # planned for GPUs from anywhere: bf16, as they choose
    device = a.device or ("cuda" if a.gpus is not None else None)
    plan = estimate(cfg, STAGES[a.stage].plan, device=device, precision="bf16" if gpu else None)
    if a.gpus is not None:
        if a.gpus < 1:
            raise UserError("align plan: --gpus must be at least 1")
        capacity = a.gpu_memory * GIB if a.gpu_memory is not None else plan.capacity
        shape = STAGES[a.stage].plan  # what align offers this stage, narrowed by --sharding / --offload
        shardings = [x for x in shape.shardings if not a.sharding or x in a.sharding]
        offloads = [x for x in shape.offloads if not a.offload or x in a.offload]
        if not shardings or not offloads:
            raise UserError(
                f"align plan: {a.stage} runs under {', '.join(shape.shardings)} with offload "
                f"{', '.join(shape.offloads)}; --sharding/--offload asked for none of them"
            )
        host = a.host_memory * GIB if a.host_memory is not None else dist_capacity("cpu")
        rows = layouts(plan, a.gpus, capacity, shardings, offloads, shape.offload_shardings, host)
        if a.json:
            best = smallest_fit(rows)
            print(json.dumps({**plan_data(plan), "layouts": [layout_data(r) for r in rows],
                              "smallest_fit": None if best is None else layout_data(best)}))  # fmt: skip
        else:
            out.print("\n".join(cluster_lines(plan, rows, a.gpus)), highlight=False)
        return 0
    if a.json:
        print(json.dumps(plan_data(plan)))
    else:
        out.print("\n".join(plan.lines()), highlight=False)
    return 0


def _say(a, res: dict, text: str) -> int:
    """A command's result: JSON only with --json, else the sentence for people."""
    if a.json:
        print(json.dumps(res))
    else:
        out.print(text)
    return 0


def _cmd_eval_generate(a) -> int:
    """Greedy answers to each conversation's last user turn (transformers generate, batched), scored against the
    conversation's own last answer with eval/task_metrics.py."""
    from core.models import load_for_eval
    from lib.generation import greedy_answers

    convs, report = load_instructions(a.data)
    print_skipped(report.problems)  # the bad rows, named; the good ones are all kept
    convs = convs[: a.max_examples] if a.max_examples else convs
    model, tok, desc = load_for_eval(a.model)
    prompts, refs = prompts_and_references(convs)
    preds = greedy_answers(model, tok, prompts, a.max_new_tokens, a.batch_size)
    res = {"model": desc, "data": str(a.data), "examples": len(preds), "max_new_tokens": a.max_new_tokens,
           "skipped_rows": report.problems, **task_metrics(preds, refs)}  # fmt: skip
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        rows = [
            {"prompt": p, "reference": r, "prediction": x}
            for p, r, x in zip(prompts, refs, preds, strict=True)
        ]
        atomic_write_text(a.out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_json(a.out / "metrics.json", res)
    return _say(a, res, f"{printable(desc)} on {len(preds)} examples: exact match {res['exact_match']:.3f}, token F1 "
                f"{res['token_f1']:.3f}, BLEU {res['bleu']:.2f}, ROUGE-L {res['rouge_l']:.3f}")  # fmt: skip


def _cmd_eval(a) -> int:
    if a.eval_command == "perplexity":
        from core.models import load_for_eval
        from eval.perplexity import perplexity

        convs, report = load_instructions(a.data, text_rows=True)  # plain text rows are scored whole
        print_skipped(report.problems)
        if a.max_examples:
            convs = convs[: a.max_examples]
        model, tok, desc = load_for_eval(a.model)
        r = perplexity(model, tok, convs, a.scope, a.max_length, a.batch_size)
        res = {"model": desc, "data": str(a.data), "scope": a.scope, **r.as_dict()}
        return _say(a, res, f"{printable(desc)}\nperplexity ({a.scope} tokens): [bold]{r.perplexity:.3f}[/] over "
                    f"{r.tokens} tokens in {r.examples} examples ({r.truncated} truncated to {a.max_length})")  # fmt: skip
    if a.eval_command == "generate":
        return _cmd_eval_generate(a)
    if a.eval_command == "gate" and a.gate_kind in GATES:
        gate = GATES[a.gate_kind]
        policy = apply_overrides(read_yaml(a.config) if a.config is not None else {}, a.overrides)
        settings = gate_settings(gate.name, policy, str(a.config) if a.config is not None else "command line")
        r = gate.run(a.candidate, a.parent, settings, a.out, getattr(a, "data", None))
        print_gate(r, a.out / "gate.html", checks=True, con=out)
        return 0 if r.verdict == "pass" else 1
    raise UserError("align eval: say what to evaluate: perplexity | gate perplexity | gate bias (see --help)")


# Warnings align silences by name: library deprecation chatter users cannot act on. Everything else (a GPU or
# precision warning, a bad checkpoint) still shows.
QUIET_WARNINGS = (
    (DeprecationWarning, ""),
    (FutureWarning, ""),
    (UserWarning, r".*(TypedStorage is deprecated|torch_dtype.*deprecated|use_cache=True.*incompatible).*"),
)


def _quiet_libraries() -> None:
    """Library chatter (deprecation warnings, per-load progress bars) buries what users need to read."""

    for category, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("transformers", "datasets", "peft", "trl", "accelerate", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


def _check_config(a) -> None:
    if a.command == "run":
        load_config(PipelineConfig, a.config, a.overrides)
    else:
        load_config(STAGES[a.command].config_model(), a.config, a.overrides)


def _wants_launch(a) -> bool:
    """Several processes asked for, and this is not already one of them."""
    from core.dist import launched

    n = getattr(a, "num_processes", 1)
    if n < 1:
        raise UserError("--num-processes must be at least 1")
    return (n > 1 or str(getattr(a, "nnodes", "1")) not in ("1", "1:1")) and not launched()


def _cmd_score(a) -> int:
    from lib.reward_model import score_file

    n = score_file(a.reward, a.input, a.out)
    out.print(f"scored {n} rows -> {printable(str(a.out))}", highlight=False)
    return 0


def _cmd_sweep(a) -> int:
    if a.config is None:
        raise UserError("align sweep: give the sweep with --config (e.g. configs/sweep.yaml)")
    return run_sweep(load_config(SweepConfig, a.config, a.overrides))


def _cmd_run(a) -> int:
    if a.config is None:
        raise UserError("align run: give the pipeline with --config (e.g. configs/quickstart.yaml)")
    return run_pipeline(load_config(PipelineConfig, a.config, a.overrides), a.from_stage)


def _cmd_report(a) -> int:
    if not a.run_dir.is_dir():
        raise UserError(f"{a.run_dir}: not a run directory")
    out.print(f"report: {write_run_report(a.run_dir)}")
    return 0


def _cmd_gate(a) -> int:
    from eval.gates import override_gate

    if a.gate_command == "sign":
        rec = signoff.sign(a.target, a.reviewer, a.decision, a.note, a.key)
        out.print(
            f"sign-off recorded in {printable(str(a.target / signoff.SIGNOFFS))}: {printable(rec['reviewer'])} "
            f"{rec['decision']}, {len(rec['evidence'])} files of evidence"
            + (" (signed with " + printable(str(a.key)) + ")" if a.key else ""),
            highlight=False,
        )
        return 0
    if a.gate_command == "verify":
        verdicts = signoff.verify(a.target, a.allowed_signers)
        if not verdicts:
            raise UserError(f"{a.target}: no sign-off recorded ({signoff.SIGNOFFS})")
        for v in verdicts:
            r = v.record
            mark = "[green]intact[/]" if v.intact else "[bold red]CHANGED[/]"
            out.print(
                f"{mark} {printable(r.get('reviewer'))} {printable(r.get('decision'))} at {printable(r.get('at'))}"
                f" (signature: {printable(v.signature)}): {printable(v.summary())}",
                highlight=False,
            )
        return 0 if all(v.intact for v in verdicts) else 1
    if a.gate_command != "override":
        raise UserError("align gate: say what to do: override, sign or verify")
    r = override_gate(a.gate_dir, a.reviewer, a.reason)
    out.print(
        f"override recorded: {r.gate} gate in {printable(str(a.gate_dir))} by {printable(r.override.reviewer)}",
        highlight=False,
    )
    return 0


def _cmd_export(a) -> int:
    from lib import export

    if a.base is not None and not a.adapter:
        raise UserError("--base names the base of an adapter export: add --adapter, or leave --base out")
    if a.gguf and a.adapter:
        raise UserError("--gguf converts whole weights: leave out --adapter")
    # what can be refused is refused before the model is rebuilt
    api = export.hub_api(a.push_to_hub) if a.push_to_hub else None
    converter = export.gguf_converter(a.gguf_converter) if a.gguf else None
    r = export.export_artifact(a.artifact, a.to, adapter=a.adapter, base=a.base, dtype=a.dtype, force=a.force)
    out.print(
        f"exported {printable(str(a.artifact))} -> {printable(str(r.folder))} ({r.kind}"
        + (f" on {printable(r.base)}" if r.kind == "peft-adapter" else "")
        + f"; loaded back and checked: max difference {r.max_difference:.2g})",
        highlight=False,
    )
    if converter is not None:
        out.print(
            f"gguf: {printable(str(export.to_gguf(converter, r.folder, a.gguf_type)))}", highlight=False
        )
    if api is not None:
        url = export.push_to_hub(api, r.folder, a.push_to_hub, private=not a.public)
        out.print(f"pushed to {printable(url)}", highlight=False)
    return 0


def _cmd_model(a) -> int:
    from core.models import resolve_model_path

    print(resolve_model_path(a.name))
    return 0


def _cmd_annotate(a) -> int:
    return annotate.run_command(a, lambda line: out.print(printable(line), highlight=False, soft_wrap=True))


def _cmd_data(a) -> int:
    if a.data_command is None:
        raise UserError(
            "align data: say what to do: build | check-rankings | import-rankings | build-preferences | arithmetic"
        )
    return run_data_command(a)


# `align <command>` for everything that is not a stage (the stages come from stages/registry.py)
COMMANDS = {
    "eval": _cmd_eval,
    "plan": _cmd_plan,
    "score": _cmd_score,
    "sweep": _cmd_sweep,
    "run": _cmd_run,
    "report": _cmd_report,
    "gate": _cmd_gate,
    "model": _cmd_model,
    "export": _cmd_export,
    "annotate": _cmd_annotate,
    "data": _cmd_data,
}


def _a_path(token: str) -> bool:
    """Whether a command-line word names an existing file (a file name may hold '='); an impossible name is none."""
    try:
        return Path(token).exists()
    except (OSError, ValueError):
        return False


def overrides_as_options(ap: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`argv` with every override of a command written where its parser takes it: the TRL/transformers habit of
    overrides as options (`--learning_rate 1e-4`, `--train.learning_rate=1e-4`, a bare `--gradient_checkpointing`
    for true) and `KEY=VALUE` words anywhere among the options become the command's overrides (its positional
    list, at the end so that they are one group; or `--set KEY=VALUE` for the data commands, whose positional
    words are files). The command's own options (--config, --resume, ...) and their values are left as they are."""
    sub, start = ap, len(argv)
    for i, token in enumerate(argv):  # the (sub)command the options belong to: the deepest parser named
        actions = getattr(sub, "_subparsers", None)
        choices = actions._group_actions[0].choices if actions is not None else {}
        if token in choices:
            sub, start = choices[token], i + 1
        elif not token.startswith("-"):
            break
    dests = {a.dest for a in sub._actions}
    if sub is ap or "overrides" not in dests:
        return argv
    positional = not any("--set" in a.option_strings for a in sub._actions)
    known = sub._option_string_actions
    out, overrides, rest, i = argv[:start], [], argv[start:], 0
    while i < len(rest):
        token, name = rest[i], rest[i].split("=", 1)[0]
        if name in known:  # the command's own option, with its value when it takes one
            takes_value = known[name].nargs != 0 and "=" not in token
            out += rest[i : i + 1 + takes_value]
            i += 1 + takes_value
            continue
        if token.startswith("--") and token != "--":
            if "=" in token:
                overrides.append(token[2:])
            elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                overrides.append(f"{token[2:]}={rest[i + 1]}")
                i += 1
            else:
                overrides.append(f"{token[2:]}=true")
        elif "=" in token and not token.startswith("-") and not _a_path(token):
            overrides.append(token)
        else:
            out.append(token)
        i += 1
    return out + (overrides if positional else [x for o in overrides for x in ("--set", o)])


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    argv = overrides_as_options(ap, list(sys.argv[1:] if argv is None else argv))
    a = ap.parse_args(argv)
    if a.command is None:
        ap.print_help()
        return 2
    if not os.environ.get("ALIGN_DEBUG"):
        _quiet_libraries()
    try:
        if _wants_launch(a):
            _check_config(a)  # a bad config is said once, here, before any process starts
            where = {"nnodes": a.nnodes, "node_rank": a.node_rank, "rdzv_endpoint": a.rdzv_endpoint}
            return relaunch(strip_launch_flags(argv), a.num_processes, **where)
        if a.command in STAGES and STAGES[a.command].command:
            return _cmd_stage(a)
        return COMMANDS[a.command](a)
    except UserError as e:
        if os.environ.get("RANK", "0") != "0":
            return e.exit_code  # every process meets the same bad input: the main one says it
        for line in str(e).splitlines():
            err.print(f"[red]error:[/] {printable(line)}", highlight=False, soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]; rerun with --resume to continue from the last checkpoint")
        return 130
    except OSError as e:
        if e.errno not in FILESYSTEM_HINTS:
            return _internal_error(e)
        where = f"{printable(str(e.filename))}: " if e.filename else ""
        err.print(
            f"[red]error:[/] {where}{printable(e.strerror or str(e))}; {FILESYSTEM_HINTS[e.errno]}",
            highlight=False,
        )
        return 2
    except Exception as e:  # an align bug, not a user error: say so plainly
        return _internal_error(e)
    return 0


# What the machine says when a write cannot happen, and what the user can do (issue 34 B16: these were "internal
# error", without the path). A stage interrupted by one resumes with --resume once it is fixed.
FILESYSTEM_HINTS = {
    errno.ENOSPC: "the disk is full: free space (or write elsewhere), then rerun; a stage continues with --resume",
    errno.EDQUOT: "the disk quota is spent: free space (or write elsewhere), then rerun",
    errno.EROFS: "that file system is read-only: choose an output folder you can write to",
    errno.EACCES: "permission denied: choose a path you can read or write",
    errno.EPERM: "operation not permitted: choose a path you can read or write",
    errno.EISDIR: "that is a folder: give a file path",
    errno.ENOTDIR: "a part of that path is a file, not a folder",
    errno.ENAMETOOLONG: "the path is too long: choose a shorter one",
}


def _internal_error(e: Exception) -> int:
    if os.environ.get("ALIGN_DEBUG"):
        raise e
    if os.environ.get("RANK", "0") != "0" and "closed by peer" in str(e):
        return 1  # the main process stopped (and said why); this one lost its connection to it
    err.print(
        f"[red]internal error:[/] {type(e).__name__}: {printable(str(e))}\n(set ALIGN_DEBUG=1 for the traceback)"
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
