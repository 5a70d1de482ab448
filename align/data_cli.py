"""`align data ...` commands: printing and exit statuses around the data and preferences stages
(stages/data.py, stages/preferences.py) and the ranking-file library (lib/rankings.py).

Exit status (docs/formats.md): 0 when the good lines loaded (problems are reported), 2 when anything was
dropped under --strict or when nothing usable was found.
"""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from core.config import UserError, apply_overrides, override_keys, printable, read_yaml, validate
from core.manifest import atomic_write_text
from core.stage import figures
from data_schemas.config import DataBuildConfig, PreferencesConfig
from lib import arithmetic
from lib.rankings import import_rankings, read_rankings, summarise
from stages.preferences import counts_summary, run

out = Console()
err = Console(stderr=True, soft_wrap=True)  # no line breaks inside paths and commands people copy


def _config(model, a):
    """The command's config: its YAML (--config), the inputs, --out and --strict it was given, then overrides
    (--set KEY=VALUE; a KEY=VALUE word among the inputs is one too: align.cli.overrides_as_options)."""
    data = read_yaml(a.config) if a.config else {}
    data.update({k: v for k, v in _io(a).items() if v not in (None, [], False)})
    data = apply_overrides(data, a.overrides, model)
    return validate(model, data, str(a.config or "command line"), override_keys(a.overrides, model))


def _io(a) -> dict:
    """What `align data build` and `build-preferences` take from their command line into the config."""
    return {"inputs": [str(p) for p in a.inputs], "output_dir": a.out, "strict": a.strict}


def _print_problems(problems: list[str], show: int) -> None:
    for p in problems[:show]:
        err.print(f"[yellow]rejected[/] {printable(p)}", highlight=False, soft_wrap=True)
    if len(problems) > show:
        err.print(f"... and {len(problems) - show} more (use --show N or --json for all)")


def _check(a) -> int:

    rs = read_rankings(a.files, conflicts=a.conflicts)
    s = summarise(rs)
    if a.json:
        print(json.dumps(s, indent=2, default=str))
    else:
        _print_problems(s["problems"], a.show)
        t = Table(title="Ranking files", show_header=False)
        t.add_row("lines read / kept", f"{s['lines_read']} / {s['lines_kept']}")
        t.add_row(
            "dropped by reason", ", ".join(f"{k}: {v}" for k, v in s["lines_dropped"].items()) or "none"
        )
        t.add_row("prompts", str(s["prompts"]))
        t.add_row(
            "responses per prompt (K: prompts)",
            ", ".join(f"{k}: {v}" for k, v in s["responses_per_prompt"].items()),
        )
        t.add_row("lines with ties / all tied", f"{s['lines_with_ties']} / {s['lines_all_tied']}")
        t.add_row(
            "lines with control-token text",
            f"{s['lines_with_control_tokens']} (neutralised when trained on)"
            + (f"; first: {printable(s['control_token_lines'][0])}" if s["control_token_lines"] else ""),
        )
        t.add_row("conflicts", str(len(s["conflicts"])))
        t.add_row("multiply annotated prompts", str(s["multiply_annotated_prompts"]))
        w = s["kendalls_w"]["mean"]
        t.add_row(
            "Kendall's W (mean over prompts)",
            "n/a (no prompt has 2+ annotators)" if w is None else f"{w:.3f}",
        )
        al = s["krippendorff_alpha_ordinal"]
        t.add_row("Krippendorff's alpha (ordinal)", "n/a" if al is None else f"{al:.3f}")
        out.print(t)
        at = Table(title="Annotators")
        for col in ("annotator", "judgments", "shared prompts", "mean tau vs others' consensus"):
            at.add_column(col)
        for name, v in s["annotators"].items():
            tau = v["mean_tau_vs_consensus"]
            flag = " [red](low agreement)[/]" if name in s["flagged_annotators"] else ""
            at.add_row(
                printable(name),  # an annotator's name is text, never markup
                str(v["judgments"]),
                str(v["shared_prompts"]),
                ("n/a" if tau is None else f"{tau:+.3f}") + flag,
            )
        if len(s["annotators"]) <= 50:
            out.print(at)
    if s["lines_kept"] == 0:
        err.print("[red]error:[/] no usable ranking lines")
        return 2
    if a.strict and s["lines_dropped"]:
        err.print(f"[red]--strict:[/] {sum(s['lines_dropped'].values())} line(s) dropped")
        return 2
    return 0


def _import(a) -> int:

    r = import_rankings(a.fmt, a.inputs, a.out, a.annotator)
    _print_problems(r.problems, 20)
    out.print(
        f"import-rankings ({a.fmt}): {r.read} rows read, {r.examples_from_rows} ranking lines written to {printable(str(a.out))}, "
        f"{sum(r.dropped.values())} rows skipped {dict(r.dropped) or ''}"
    )
    if r.examples_from_rows == 0:
        err.print(
            f"[red]error:[/] nothing could be converted; {printable(str(a.out))} is left as it was",
            highlight=False,
        )
        return 2
    return 2 if a.strict and r.dropped else 0


def _preferences(a) -> int:

    cfg = _config(PreferencesConfig, a)
    res = counts_summary(run(cfg, resume=a.resume))
    out.print(
        f"[green]preferences written[/]: {printable(str(cfg.output_dir))} {printable(json.dumps(res))}",
        highlight=False,
    )
    return 0


def _build(a) -> int:
    from stages.data import run

    cfg = _config(DataBuildConfig, a)
    path = run(cfg, resume=a.resume).artifact
    c = json.loads((path / "manifest.json").read_text())["counts"]
    _print_problems(c["problems"], 20)  # every one of them is in the manifest's counts and report.md
    out.print(
        f"[green]dataset written[/]: {printable(str(path))}/dataset  train {c['train']}, validation {c['validation']} "
        f"({c['rows_read']} rows read, {sum(c['dropped'].values())} dropped{': ' if c['dropped'] else ''}"
        f"{figures(c['dropped'])}); "
        f"report: {printable(str(path))}/report.md",
        highlight=False,
    )
    return 0


def _arithmetic(a) -> int:
    """`align data arithmetic --out FOLDER`: the verifiable task (lib/arithmetic.py) as a Hub-style folder of
    train.jsonl and test.jsonl."""
    try:
        got = arithmetic.splits(a.train, a.test, a.seed, a.max_operand, a.max_steps)
    except ValueError as e:
        raise UserError(f"align data arithmetic: {e}") from None
    a.out.mkdir(parents=True, exist_ok=True)
    for split, rows in got.items():
        atomic_write_text(a.out / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    out.print(
        f"[green]arithmetic written[/]: {printable(str(a.out))} (train {len(got['train'])}, test {len(got['test'])}, "
        f"seed {a.seed}); GRPO with its verifier: align ppo --config configs/ppo_arithmetic.yaml",
        highlight=False,
    )
    return 0


COMMANDS = {
    "arithmetic": _arithmetic,
    "check-rankings": _check,
    "import-rankings": _import,
    "build-preferences": _preferences,
    "build": _build,
}


def run_data_command(a) -> int:
    if a.data_command not in COMMANDS:
        raise UserError(f"align data {a.data_command}: unknown")
    return COMMANDS[a.data_command](a)
