"""`align annotate serve | add-annotator | export`: opening a session folder, serving it, exporting its
judgments."""

import contextlib
import json
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from align.annotate.desk import Desk
from align.annotate.folder import ANNOTATIONS, read_jsonl
from align.annotate.sampler import Prompt, Sampler, read_prompts
from align.annotate.tokens import add_annotator
from align.annotate.web import make_app
from core.config import UserError
from core.manifest import (
    atomic_write_json,
    atomic_write_text,
    read_manifest,
    refuse_overwriting_input,
    sha256_path,
)
from core.readers import LoadReport, describe_row_error
from data_schemas.config import SessionSettings
from lib.rankings import read_rankings, summarise


def open_session(
    d: Path,
    policy: str | None,
    prompts: Path | None,
    overrides: dict[str, Any],
    superseded: Path | None = None,
) -> tuple[SessionSettings, list[Prompt], LoadReport]:
    """The folder's settings: new ones from the arguments, or the stored ones (a returning session). A folder
    sampled from another policy or prompts file is refused, since its rankings would mix two policies; or, given
    `superseded`, moved there, and a new round starts in `d` (the pipeline, when SFT was redone)."""
    d = Path(d)
    path = d / "session.json"
    stored = SessionSettings.model_validate_json(path.read_text()) if path.exists() else None
    if stored is None and (policy is None or prompts is None):
        raise UserError(f"{d}: a new annotation folder needs --policy and --prompts")
    policy = policy or stored.policy
    prompts = Path(prompts or stored.prompts)
    if not prompts.is_file():
        raise UserError(f"{prompts}: prompts file not found")
    # read before anything is written: a file with no usable prompt changes nothing
    rows, report = read_prompts(prompts)
    ref = Path(policy)
    key = read_manifest(ref).key if (ref / "manifest.json").exists() else None
    fields = {
        "policy": str(policy),
        "policy_key": key,
        "prompts": str(prompts),
        "prompts_sha256": sha256_path(prompts),
    }
    stale = stored is not None and (stored.policy_key, stored.prompts_sha256) != (
        key,
        fields["prompts_sha256"],
    )
    if stale and superseded is not None:
        superseded.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(d), str(superseded))
        stored = None
    if stored is not None:
        base = stored.model_dump()
        for name in ("policy_key", "prompts_sha256"):
            if base[name] != fields[name]:
                what = "policy" if name == "policy_key" else "prompts file"
                raise UserError(
                    f"{d} was sampled from another {what} ({base['policy'] if name == 'policy_key' else base['prompts']}); "
                    "use a new --dir for a new policy or prompts"
                )
        changed = {
            k: v for k, v in overrides.items() if v is not None and base.get(k) != v and k != "overlap"
        }
        if changed:
            raise UserError(
                f"{d}: sampled with other settings ({', '.join(sorted(changed))}); use a new --dir"
            )
        settings = stored.model_copy(update={k: v for k, v in overrides.items() if k == "overlap" and v})
    else:
        try:
            settings = SessionSettings(**fields, **{k: v for k, v in overrides.items() if v is not None})
        except ValidationError as e:
            raise UserError(f"annotate: {describe_row_error(e)[1]}") from None
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, json.loads(settings.model_dump_json()))
    if settings.max_prompts:
        rows = rows[: settings.max_prompts]
    return settings, rows, report


def serve(d: Path, settings: SessionSettings, prompts: list[Prompt], host: str, port: int, log=print) -> None:
    """Sample in a background thread and serve the page until interrupted."""
    import uvicorn

    desk = Desk(Path(d), settings)
    if desk.log.torn_bytes:
        log(
            f"rankings.jsonl: cut a torn last line ({desk.log.torn_bytes} bytes, a judgment being written at a crash)"
        )
    for problem in desk.problems:
        log(f"warning: {problem} (every whole judgment is kept)")
    desk.sampler = Sampler(d, settings, prompts, on_sample=desk.add_sample)
    if desk.sampler.todo:
        threading.Thread(target=_quietly(desk.sampler.run), name="align-sampler", daemon=True).start()
    else:
        desk.sampler.finished = True
        desk.sampler.log.close()
    hosts = ["127.0.0.1", "localhost"] if host in ("127.0.0.1", "localhost") else ["*"]
    if hosts == ["*"]:
        log(f"--host {host}: the page is reachable from other machines (every request still needs a token)")
    config = uvicorn.Config(
        make_app(desk, hosts), host=host, port=port, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    log(f"annotation page: http://{host}:{port}/   organiser: http://{host}:{port}/organiser")
    log(f"{len(desk.samples)} of {len(prompts)} prompts sampled; the rest are sampled in the background")
    server.run()


def _quietly(fn):
    def run():
        with contextlib.suppress(Exception):  # recorded in the sampler's status; the organiser page shows it
            fn()

    return run


def count_judgments(d: Path) -> int:
    """Complete lines in a folder's judgments (a torn last line does not count)."""
    p = Path(d) / ANNOTATIONS
    return p.read_bytes().count(b"\n") if p.exists() else 0


def export(d: Path, to: Path) -> dict[str, Any]:
    """The folder's judgments as one validated ranking file (the lines exactly as written)."""
    src = Path(d) / "rankings.jsonl"
    if not src.exists() or not src.stat().st_size:
        raise UserError(f"{src}: no judgments yet")
    refuse_overwriting_input(Path(to), [src])
    # a snapshot under the log's shared lock: a live server's append is whole in it or absent, never cut (B4)
    problems: list[str] = []
    rows = read_jsonl(src, problems)
    for p in problems:
        print(
            f"warning: {p}", file=sys.stderr
        )  # a damaged line is named and left out; every whole one exported
    if not rows:
        raise UserError(f"{src}: no whole judgment to export")
    atomic_write_text(Path(to), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    rs = read_rankings([Path(to)])
    if rs.report.problems:
        raise UserError(
            f"{src}: {len(rs.report.problems)} line(s) fail the ranking contract: {rs.report.problems[0]}"
        )
    return summarise(rs)


def add_arguments(sub) -> None:
    """`align annotate ...` subcommands (called by align.cli)."""
    an = sub.add_parser(
        "annotate", help="a local web page where annotators rank the policy's samples"
    ).add_subparsers(dest="annotate_command", metavar="WHAT")
    for name, text in (
        ("serve", "sample K responses per prompt in the background and serve the ranking page"),
        ("sample", "sample K responses per prompt into the folder, without serving"),
    ):
        p = an.add_parser(name, help=text)
        p.add_argument(
            "--dir", required=True, type=Path, help="annotation folder (samples, tokens, rankings)"
        )
        p.add_argument("--policy", help="the policy: align artifact, checkpoint folder or alias (new folder)")
        p.add_argument("--prompts", type=Path, help="prompts file: rows with 'prompt', or instruction rows")
        p.add_argument("--k", type=int, help="responses per prompt (default 4)")
        p.add_argument("--overlap", type=int, help="annotators per prompt (default 1; 2+ measures agreement)")
        p.add_argument("--max-prompts", type=int)
        p.add_argument("--temperature", type=float)
        p.add_argument("--top-p", type=float)
        p.add_argument("--max-new-tokens", type=int)
        p.add_argument("--seed", type=int)
        p.add_argument(
            "--engine",
            help="auto (default: vLLM where installed), or a row of the engine table (lib/rollout.py)",
        )
        if name == "serve":
            p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
            p.add_argument("--port", type=int, default=8765)
    add = an.add_parser("add-annotator", help="issue a token for an annotator (printed once, stored hashed)")
    add.add_argument("name")
    add.add_argument("--dir", required=True, type=Path)
    add.add_argument("--organiser", action="store_true", help="may open the organiser page (agreement)")
    add.add_argument("--replace", action="store_true", help="issue a new token for an existing name")
    add.add_argument(
        "--url", default="http://127.0.0.1:8765", help="the page's address, for the printed link"
    )
    ex = an.add_parser("export", help="the folder's judgments as one validated ranking file")
    ex.add_argument("--dir", required=True, type=Path)
    ex.add_argument("--to", required=True, type=Path, help="ranking JSONL to write")


def run_command(a, say) -> int:
    """`align annotate serve|sample|add-annotator|export`; `say` prints one line for the user."""
    if a.annotate_command == "add-annotator":
        token = add_annotator(a.dir, a.name, a.organiser, a.replace)
        page = "organiser" if a.organiser else ""
        say(f"token for {a.name} (shown once; stored hashed in {a.dir / 'annotators.json'}):")
        say(token)
        say(f"their link: {a.url.rstrip('/')}/{page}#token={token}")
        return 0
    if a.annotate_command == "export":
        s = export(a.dir, a.to)
        say(
            f"{s['lines_kept']} judgments of {s['prompts']} prompts by {len(s['judgments_per_annotator'])} "
            f"annotator(s) -> {a.to}; next: align data build-preferences {a.to} --out DIR"
        )
        return 0
    if a.annotate_command in ("serve", "sample"):
        overrides = {
            "k": a.k, "overlap": a.overlap, "max_prompts": a.max_prompts, "temperature": a.temperature,
            "top_p": a.top_p, "max_new_tokens": a.max_new_tokens, "seed": a.seed, "engine": a.engine,
        }  # fmt: skip
        settings, prompts, report = open_session(a.dir, a.policy, a.prompts, overrides)
        for problem in report.problems[:20]:
            say(f"skipped {problem}")
        if a.annotate_command == "serve":
            serve(a.dir, settings, prompts, a.host, a.port, log=say)
            return 0
        sampler = Sampler(a.dir, settings, prompts)
        sampler.run()
        for problem in sampler.skipped:
            say(f"skipped {problem}")
        st = sampler.status()
        say(
            f"{st['ready']} of {st['total']} prompts sampled in {a.dir / 'samples.jsonl'} ({st['engine'] or 'nothing to do'})"
        )
        return 0 if st["ready"] else 2
    raise UserError("align annotate: say what to do: serve | sample | add-annotator | export")
