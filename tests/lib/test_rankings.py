"""Ranking files: the contract, bad input line by line, cross-line checks, aggregation and splits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_schemas.config import PreferencesConfig
from lib.rankings import aggregate, implied_pairs, read_rankings, split_of, summarise
from stages.preferences import counts_summary
from stages.preferences import run as build_preferences

ROOT = Path(__file__).resolve().parents[2]


def line(pid="p1", ann="ann-1", ranking=("b", ["a", "c"]), prompt="How do I repot a cactus?", **extra):
    obj = {
        "prompt_id": pid,
        "prompt": prompt,
        "responses": [
            {"id": "a", "text": "Use gloves."},
            {"id": "b", "text": "Wear thick gloves, use cactus soil."},
            {"id": "c", "text": "Just pull it out."},
        ],
        "ranking": list(ranking),
        "annotator": ann,
    }
    obj.update(extra)
    return json.dumps(obj)


GOOD = [line("g1"), line("g2", ranking=("a", "b", "c")), line("g3", ranking=(["a", "b", "c"],))]
# (raw bytes of a bad line, substring the report must contain)
BAD = [
    (b'{"prompt_id": "t1", "prompt": "x", "responses": [', "not valid JSON"),
    (
        line("w1").replace('"annotator": "ann-1"', '"annotator": 7').encode(),
        "annotator: input should be a valid string",
    ),
    (
        json.dumps(
            {
                "prompt_id": "m1",
                "prompt": "x",
                "responses": [{"id": "a", "text": "y"}, {"id": "b", "text": "z"}],
                "annotator": "a",
            }
        ).encode(),
        "ranking: required field is missing",
    ),
    (line("u1", rankng=["a"]).encode(), "rankng: unknown field"),
    (line("d1").replace('{"id": "c"', '{"id": "a"').encode(), "duplicate response id"),
    (line("k1", ranking=("b", "a", "zz")).encode(), "unknown response id(s) ['zz']"),
    (line("o1", ranking=("b", "a")).encode(), "response(s) ['c'] are not ranked"),
    (
        json.dumps(
            {
                "prompt_id": "s1",
                "prompt": "x",
                "responses": [{"id": "a", "text": "y"}],
                "ranking": ["a"],
                "annotator": "a",
            }
        ).encode(),
        "needs at least 2",
    ),
    (line("e1").replace('"Use gloves."', '"   "').encode(), "responses.0.text: is empty"),
    (line("ep", prompt="  ").encode(), "prompt: is empty"),
    (b'{"prompt_id": "x", "prompt": "caf\xe9"}', "not valid UTF-8"),
    (b"\x00\x01\x02\xff\xfe garbage", "not valid UTF-8"),
    (b'{"prompt_id": "big", "prompt": "' + b"a" * (2 * 1024 * 1024) + b'"}', "bytes (limit"),
    (
        line(
            "r1", prompt=[{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}]
        ).encode(),
        "messages are out of order",
    ),
    (
        line("r2", prompt=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]).encode(),
        "last message must be from 'user'",
    ),
    (b"[1, 2, 3]", "expected a JSON object"),
    (line("t2", prompt=5).encode(), "prompt: has the wrong type (int)"),
    (
        line("t3", prompt=[{"role": "bot", "content": "q"}]).encode(),
        "prompt.0.role: Input should be 'system'",
    ),
    (line("t4", created_at="yesterday").encode(), "created_at: Input should be a valid datetime"),
]


@pytest.fixture
def messy(tmp_path):
    """Good lines interleaved with every bad case; BOM on the first line and CRLF line ends."""
    p = tmp_path / "rankings.jsonl"
    raw = [GOOD[0].encode()]
    for bad, _ in BAD:
        raw += [bad]
    raw += [GOOD[1].encode(), b"", GOOD[2].encode()]
    p.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(raw) + b"\r\n")
    return p


def test_every_bad_line_reported_and_good_lines_kept(messy):
    rs = read_rankings([messy])
    assert sorted(j.line.prompt_id for j in rs.judgments) == ["g1", "g2", "g3"]
    assert rs.report.read == 3 + len(BAD)
    assert sum(rs.report.dropped.values()) == len(BAD)
    for k, (_, expected) in enumerate(BAD):
        lineno = k + 2
        hits = [p for p in rs.report.problems if p.startswith(f"{messy}:{lineno}:")]
        assert len(hits) == 1, (lineno, expected, rs.report.problems)
        assert expected in hits[0], (expected, hits[0])


def test_cli_exit_status_and_no_traceback(messy, tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "align", "data", "check-rankings", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )

    r = run(str(messy))
    assert r.returncode == 0 and "Traceback" not in r.stderr + r.stdout
    assert f"{messy}:2:" in r.stderr and "lines read / kept" in r.stdout
    assert run(str(messy), "--strict").returncode == 2
    js = json.loads(run(str(messy), "--json").stdout)
    assert js["lines_kept"] == 3 and js["lines_all_tied"] == 1 and js["lines_with_ties"] == 2
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert run(str(empty)).returncode == 2


def test_cross_line_checks(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(
        "\n".join(
            [
                line("p1", "ann-1"),
                line("p1", "ann-2", prompt="A different prompt"),  # same id, different prompt text
                line("p1", "ann-3").replace("Just pull it out.", "Other"),  # same id, different responses
                line("p1", "ann-1"),  # duplicate of line 1
                line("p2", "ann-1", ranking=("a", "b", "c")),
                line("p2", "ann-1", ranking=("c", "b", "a")),  # conflict with line 5
                line("p3", "ann-1", ranking=("a", "b", "c")),
                line("p3", "ann-2", ranking=("b", "a", "c")),
            ]
        )
        + "\n"
    )
    rs = read_rankings([p])
    d = rs.report.dropped
    assert d["prompt_mismatch"] == 1 and d["responses_mismatch"] == 1 and d["duplicate_judgment"] == 1
    assert d["conflict"] == 2  # neither judgment of the conflicting pair is trusted
    assert [(j.line.prompt_id, j.line.annotator) for j in rs.judgments] == [
        ("p1", "ann-1"),
        ("p3", "ann-1"),
        ("p3", "ann-2"),
    ]
    assert rs.conflicts == [{"prompt_id": "p2", "annotator": "ann-1", "lines": [f"{p}:5", f"{p}:6"]}]
    latest = read_rankings([p], conflicts="keep-latest")
    kept = [j for j in latest.judgments if j.line.prompt_id == "p2"]
    assert len(kept) == 1 and kept[0].where == f"{p}:6"


def test_agreement_summary_flags_the_contrarian(tmp_path):
    rows = []
    for k in range(6):
        for ann in ("ann-1", "ann-2", "ann-3"):
            rows.append(line(f"q{k}", ann, ranking=("a", "b", "c")))
        rows.append(line(f"q{k}", "ann-x", ranking=("c", "b", "a")))
    p = tmp_path / "r.jsonl"
    p.write_text("\n".join(rows) + "\n")
    s = summarise(read_rankings([p]))
    assert s["multiply_annotated_prompts"] == 6
    # per prompt: rank sums a=1+1+1+3=6, b=8, c=10, mean 8 -> S = 8; W = 12*8/(16*24) = 0.25
    assert s["kendalls_w"]["mean"] == pytest.approx(0.25)
    assert s["annotators"]["ann-1"]["mean_tau_vs_consensus"] == pytest.approx(1.0)
    assert s["annotators"]["ann-x"]["mean_tau_vs_consensus"] == pytest.approx(-1.0)
    assert s["flagged_annotators"] == ["ann-x"]
    assert s["krippendorff_alpha_ordinal"] < 0.5


def test_aggregation_keeps_ties_and_forms_no_tied_pairs(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(
        "\n".join([line("p1", "a1", ranking=("b", ["a", "c"])), line("p1", "a2", ranking=("b", ["a", "c"]))])
    )
    (g,) = aggregate(read_rankings([p]))
    assert [[g.responses[i] for i in t] for t in g.tiers] == [
        ["Wear thick gloves, use cactus soil."],
        ["Use gloves.", "Just pull it out."],
    ]
    assert g.annotators == 2 and g.agreement == pytest.approx(1.0)
    assert sorted(implied_pairs(g, "all")) == [(1, 0), (1, 2)]
    assert sorted(implied_pairs(g, "best-vs-rest")) == [(1, 0), (1, 2)]


def test_pairs_all_vs_best_vs_rest_counts(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(line("p1", ranking=("a", "b", "c")) + "\n")
    (g,) = aggregate(read_rankings([p]))
    assert len(implied_pairs(g, "all")) == 3 and len(implied_pairs(g, "best-vs-rest")) == 2


def test_split_is_by_prompt_and_deterministic():
    ids = [f"p{i}" for i in range(2000)]
    a = [split_of(i, 0.1, 42) for i in ids]
    assert a == [split_of(i, 0.1, 42) for i in ids]
    assert 150 < a.count("validation") < 250
    assert a != [split_of(i, 0.1, 43) for i in ids]


def test_build_preferences_on_real_imports(tmp_path):
    from datasets import load_from_disk

    from lib.rankings import import_rankings
    from tests.conftest import shared_file

    hh = tmp_path / "hh.jsonl"
    oa = tmp_path / "oa.jsonl"
    import_rankings("hh-rlhf", [shared_file("hh_rlhf_harmless_test_1000.jsonl")], hh)
    import_rankings("oasst", [shared_file("oasst_en_trees_60.jsonl")], oa)
    cfg = PreferencesConfig(inputs=[hh, oa], output_dir=tmp_path / "prefs", validation_fraction=0.2)
    res = counts_summary(build_preferences(cfg))
    kw = load_from_disk(str(tmp_path / "prefs" / "kwise"))
    pairs = load_from_disk(str(tmp_path / "prefs" / "pairs"))
    assert set(kw["train"]["prompt_id"]).isdisjoint(kw["validation"]["prompt_id"])
    assert set(pairs["train"]["prompt_id"]).isdisjoint(pairs["validation"]["prompt_id"])
    assert max(len(r) for r in kw["train"]["responses"]) >= 5  # OASST groups are K-wise, not only pairs
    n_pairs = sum(
        len(implied_pairs(__import__("data_schemas.rankings", fromlist=["KWiseGroup"]).KWiseGroup(**r)))
        for split in ("train", "validation")
        for r in kw[split]
    )
    assert n_pairs == res["pairs"]["train"] + res["pairs"]["validation"]
    m = json.loads((tmp_path / "prefs" / "manifest.json").read_text())
    assert m["status"] == "complete" and [i["role"] for i in m["inputs"]] == ["rankings", "rankings"]


def test_markup_and_terminal_escapes_in_a_ranking_file_are_printed_as_text(tmp_path):
    """A ranking line whose fields hold Rich markup ('[/]') or terminal escapes: named, printed inert, no crash."""
    p = tmp_path / "r.jsonl"
    p.write_text(
        line("m1", ann="[/]ann[bold]") + "\n" + line("m2", ann="\x1b[2Jclear") + "\n"
        + line("m3", ranking=("[/]zz", "a", "b", "c")) + "\n"  # a bad id, with markup in it, named in the problem
    )  # fmt: skip
    r = subprocess.run(
        [sys.executable, "-m", "align", "data", "check-rankings", str(p)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0 and "Traceback" not in r.stderr + r.stdout
    assert "[/]zz" in r.stderr and f"{p}:3" in r.stderr.replace("\n", "")
    assert "\x1b" not in r.stdout + r.stderr and "\\x1b[2Jclear" in r.stdout.replace("\n", "")


def test_control_token_text_in_rankings_is_counted(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(
        line("c1") + "\n" + line("c2").replace("Use gloves.", "Use <|im_start|>system gloves.") + "\n"
    )
    s = summarise(read_rankings([p]))
    assert s["lines_with_control_tokens"] == 1 and s["control_token_lines"] == [f"{p}:2"]
