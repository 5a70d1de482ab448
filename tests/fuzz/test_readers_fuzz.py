"""Fuzzing every reader with generated and mutated rows. The invariants, for any file:
- no exception but UserError (a whole-file problem, one sentence): never a traceback;
- every good row is kept (at its line number);
- every other non-blank line is named once, as `file:line: reason`.
Good rows are generated valid by construction; bad rows are good rows broken by one mutation, or raw junk.
The CLI invariants (exit 0 or 2, no traceback, no 'internal error') are checked on a few generated files too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from core.config import UserError, load_config
from core.readers import LoadReport, iter_conversations
from data_schemas.config import DPOConfig, PPOConfig, RewardConfig, SFTConfig
from lib.rankings import import_rankings, read_rankings
from lib.reward_model import read_score_rows

ROOT = Path(__file__).resolve().parents[2]

# text that survives trimming; any Unicode but surrogates (JSON writers cannot encode them)
TEXT = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40).filter(lambda s: s.strip())
JUNK_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(TEXT, kids, max_size=3),
    max_leaves=8,
)

# ---- instruction rows ------------------------------------------------------------------------------------
ALPACA = st.fixed_dictionaries({"instruction": TEXT, "output": TEXT}, optional={"input": TEXT})
CHAT = st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=3).map(
    lambda turns: {"messages": [m for u, a in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]}
)  # fmt: skip
SELF_INSTRUCT = st.fixed_dictionaries(
    {
        "instruction": TEXT,
        "instances": st.lists(st.fixed_dictionaries({"output": TEXT}), min_size=1, max_size=3),
    }
)
GOOD_INSTRUCTION = st.one_of(ALPACA, CHAT, SELF_INSTRUCT)


@st.composite
def broken_instruction(draw) -> str:
    """A good row broken by one mutation (a required field removed, emptied or given a wrong type), or junk."""
    row = draw(GOOD_INSTRUCTION)
    kind = draw(st.sampled_from(["drop", "empty", "type", "role", "junk_json", "junk_bytes", "array"]))
    if kind == "junk_json":
        return json.dumps(
            draw(st.dictionaries(st.sampled_from(["foo", "bar", "Instruction"]), JUNK_JSON, max_size=3))
        )
    if kind == "junk_bytes":
        return draw(
            st.sampled_from(
                ["{oops", '{"instruction": ', "\x00\x01", '{"a": ' + "9" * 5000 + "}", "[" * 3000]
            )
        )
    if kind == "array":
        return json.dumps([row])
    if "messages" in row:
        m = row["messages"]
        if kind == "drop":
            m[-1].pop("content")
        elif kind == "empty":
            m[-1]["content"] = "   "
        elif kind == "type":
            m[-1]["content"] = draw(st.integers() | st.lists(TEXT, max_size=2))
        else:
            m[0]["role"] = draw(st.sampled_from(["user<|im_end|>", "root", "", "USER"]))
    else:
        key = "output" if "output" in row else "instruction"
        if kind == "drop" and key == "instruction":
            row = {"output": row.get("output") or "x"}  # no instruction, no messages: no shape at all
        elif kind == "drop":
            row.pop("output")
        elif kind in ("empty", "role"):
            row[key] = " \t "
        else:
            row[key] = draw(
                st.integers() | st.lists(TEXT, max_size=2) | st.dictionaries(TEXT, TEXT, max_size=1)
            )
    return json.dumps(row)


def _mixed_file(
    tmp: Path, name: str, good: list[str], bad: list[str], order: list[bool]
) -> tuple[Path, list[int], list[int]]:
    """Lines interleaved as `order` says (True = next good row); returns (path, good line numbers, bad ones)."""
    lines, good_at, bad_at = [], [], []
    gi = bi = 0
    for is_good in order:
        if is_good and gi < len(good):
            lines.append(good[gi])
            gi += 1
            good_at.append(len(lines))
        elif bi < len(bad):
            lines.append(bad[bi])
            bi += 1
            bad_at.append(len(lines))
    for g in good[gi:]:
        lines.append(g)
        good_at.append(len(lines))
    for b in bad[bi:]:
        lines.append(b)
        bad_at.append(len(lines))
    path = tmp / name
    path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return path, good_at, bad_at


def _named_lines(path: Path, problems: list[str]) -> list[int]:
    out = []
    for p in problems:
        assert p.startswith(f"{path}:"), p
        out.append(int(p[len(str(path)) + 1 :].split(":", 1)[0]))
    return out


@given(
    good=st.lists(GOOD_INSTRUCTION.map(json.dumps), max_size=6),
    bad=st.lists(broken_instruction(), max_size=6),
    order=st.lists(st.booleans(), max_size=12),
)
def test_instruction_reader_keeps_every_good_row_and_names_every_bad_one(tmp_path_factory, good, bad, order):
    path, good_at, bad_at = _mixed_file(tmp_path_factory.mktemp("f"), "in.jsonl", good, bad, order)
    report = LoadReport()
    kept = sorted(
        {int(where.rsplit(":", 1)[1]) for where, _, _ in iter_conversations(path, "auto", None, report)}
    )
    assert kept == good_at
    assert sorted(_named_lines(path, report.problems)) == bad_at
    assert report.read == len(good_at) + len(bad_at) and sum(report.dropped.values()) == len(bad_at)


# ---- ranking lines -------------------------------------------------------------------------------------
@st.composite
def good_ranking(draw, pid: str) -> dict:
    k = draw(st.integers(2, 5))
    ids = [f"r{i}" for i in range(k)]
    texts = draw(st.lists(TEXT, min_size=k, max_size=k, unique_by=str.strip))
    order = draw(st.permutations(ids))
    ranking, i = [], 0
    while i < k:  # cut the order into tiers
        size = draw(st.integers(1, k - i))
        tier = order[i : i + size]
        ranking.append(tier[0] if size == 1 else tier)
        i += size
    return {
        "prompt_id": pid,
        "prompt": draw(TEXT),
        "responses": [{"id": a, "text": t} for a, t in zip(ids, texts, strict=True)],
        "ranking": ranking,
        "annotator": draw(TEXT),
    }


@st.composite
def broken_ranking(draw, pid: str) -> str:
    line = draw(good_ranking(pid))
    kind = draw(
        st.sampled_from(["drop", "dup", "unknown_id", "one_response", "typo_field", "empty_text", "junk"])
    )
    if kind == "drop":
        line.pop(draw(st.sampled_from(["prompt_id", "prompt", "responses", "ranking", "annotator"])))
    elif kind == "dup":
        line["ranking"] = line["ranking"] + [line["responses"][0]["id"]]
    elif kind == "unknown_id":
        line["ranking"] = [*line["ranking"], "not-a-response"]
    elif kind == "one_response":
        line["responses"] = line["responses"][:1]
        line["ranking"] = [line["responses"][0]["id"]]
    elif kind == "typo_field":
        line["rankng"] = line.pop("ranking")
    elif kind == "empty_text":
        line["responses"][0]["text"] = "  "
    else:
        return draw(st.sampled_from(["{", "[]", "null", '"text"', '{"prompt_id": 5}']))
    return json.dumps(line)


@given(
    data=st.data(),
    n_good=st.integers(0, 5),
    n_bad=st.integers(0, 5),
    order=st.lists(st.booleans(), max_size=10),
)
def test_ranking_reader_keeps_every_good_line_and_names_every_bad_one(
    tmp_path_factory, data, n_good, n_bad, order
):
    good = [
        json.dumps(data.draw(good_ranking(f"g{i}"))) for i in range(n_good)
    ]  # distinct prompts: no conflicts
    bad = [data.draw(broken_ranking(f"b{i}")) for i in range(n_bad)]
    path, good_at, bad_at = _mixed_file(tmp_path_factory.mktemp("r"), "r.jsonl", good, bad, order)
    rs = read_rankings([path])
    assert sorted(int(j.where.rsplit(":", 1)[1]) for j in rs.judgments) == good_at
    assert sorted(_named_lines(path, rs.report.problems)) == bad_at


# ---- importers and score inputs: arbitrary JSON objects ---------------------------------------------------
ANY_ROW = st.dictionaries(
    st.sampled_from(["prompt", "chosen", "rejected", "scores", "responses", "prompt_id", "message_id", "replies", "role", "text", "rank"]),
    JUNK_JSON | st.lists(st.dictionaries(st.sampled_from(["role", "content", "id", "text", "message_id", "rank", "replies"]), JUNK_JSON, max_size=4), max_size=3),
    max_size=6,
)  # fmt: skip


@settings(max_examples=25)
@given(
    rows=st.lists(ANY_ROW, min_size=1, max_size=6),
    fmt=st.sampled_from(["pairwise", "hh-rlhf", "oasst", "scores"]),
)
def test_importers_convert_or_name_every_row(tmp_path_factory, rows, fmt):
    tmp = tmp_path_factory.mktemp("i")
    src = tmp / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = import_rankings(fmt, [src], tmp / "out.jsonl")
    named = set(_named_lines(src, report.problems))
    assert report.kept + len(named) == len(rows) and report.read == len(rows)


@given(
    rows=st.lists(ANY_ROW | st.fixed_dictionaries({"prompt": TEXT, "response": TEXT}), min_size=1, max_size=8)
)
def test_score_inputs_keep_or_name_every_row(tmp_path_factory, rows):
    src = tmp_path_factory.mktemp("s") / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept, report = read_score_rows(src)
    good = [r for r in rows if isinstance(r.get("response"), str) and isinstance(r.get("prompt"), str)]
    assert all(r in kept for r in good)
    assert len(kept) + len(report.problems) == len(rows)


# ---- configs: any override is accepted or refused in one sentence --------------------------------------
KEYS = st.sampled_from(
    ["train.learning_rate", "train.max_steps", "lora.r", "lora.target_modules", "data.max_length", "precision",
     "train", "model", "output_dir", "stage", "nonsense.key", "train.stop_after_steps", "data", "gate.min_pairs"]
)  # fmt: skip
VALUES = st.sampled_from(
    ["1e-4", "-1", "0", "abc", "[1, 2]", "{a: 1}", "null", "true", "''", "3.5", "[", "{x"]
)


@given(
    model=st.sampled_from([SFTConfig, RewardConfig, DPOConfig, PPOConfig]),
    items=st.lists(st.tuples(KEYS, VALUES), max_size=4),
)
def test_config_overrides_validate_or_fail_in_words(model, items):
    overrides = [f"{k}={v}" for k, v in items]
    try:
        load_config(model, ROOT / "configs" / f"{model.model_fields['stage'].default}.yaml", overrides)
    except UserError as e:
        assert str(e).strip() and "Traceback" not in str(e)


# ---- through the real CLI: exit 0 or 2, never a traceback ----------------------------------------------
@settings(max_examples=4)
@given(
    good=st.lists(GOOD_INSTRUCTION.map(json.dumps), min_size=1, max_size=3),
    bad=st.lists(broken_instruction(), min_size=1, max_size=3),
    strict=st.booleans(),
)
def test_cli_data_build_exits_0_or_2_without_traceback(tmp_path_factory, good, bad, strict):
    tmp = tmp_path_factory.mktemp("c")
    path, _, bad_at = _mixed_file(tmp, "in.jsonl", good, bad, [])
    args = [
        sys.executable,
        "-m",
        "align",
        "data",
        "build",
        str(path),
        "--out",
        str(tmp / "o"),
        "--set",
        "tokenizer=null",
    ]
    r = subprocess.run(
        args + (["--strict"] if strict else []), capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert r.returncode == (2 if strict else 0), r.stderr
    assert "Traceback" not in r.stderr + r.stdout and "internal error" not in r.stderr
    for n in bad_at[:20]:
        assert f"{path}:{n}" in r.stderr.replace("\n", "")
