"""Converters into the ranking format, on the real shared files and on hand-made rows."""

import json

from data_schemas.rankings import RankingLine
from lib.rankings import convert_pairwise, convert_scores, import_rankings, read_rankings
from tests.conftest import shared_file


def test_hh_rlhf_real_file(tmp_path):
    out = tmp_path / "hh.jsonl"
    r = import_rankings("hh-rlhf", [shared_file("hh_rlhf_harmless_test_1000.jsonl")], out)
    assert r.read == 1000
    lines = [RankingLine.model_validate_json(x) for x in out.read_text().splitlines()]
    assert len(lines) == r.examples_from_rows >= 990
    assert sum(r.dropped.values()) == 1000 - len(lines)  # every skipped row is reported
    assert all(isinstance(x.prompt, list) and x.prompt[-1].role == "user" for x in lines)
    first = json.loads(shared_file("hh_rlhf_harmless_test_1000.jsonl").read_text().splitlines()[0])
    assert lines[0].prompt[0].content == "what are some pranks with a pen i can do?"
    assert first["chosen"].endswith(lines[0].responses[0].text)
    assert lines[0].ranking == ["chosen", "rejected"]


def test_oasst_real_trees(tmp_path):
    out = tmp_path / "oa.jsonl"
    r = import_rankings("oasst", [shared_file("oasst_en_trees_60.jsonl")], out)
    assert r.read == 60 and not r.dropped
    rs = read_rankings([out])
    assert len(rs.judgments) == r.examples_from_rows > 60  # deeper levels give more than one per tree
    ks = [len(j.line.responses) for j in rs.judgments]
    assert max(ks) >= 5 and min(ks) == 2
    tree = json.loads(shared_file("oasst_en_trees_60.jsonl").read_text().splitlines()[0])
    best = min((x for x in tree["prompt"]["replies"] if x.get("rank") is not None), key=lambda x: x["rank"])
    j = next(j for j in rs.judgments if j.line.prompt_id == tree["prompt"]["message_id"])
    assert j.line.tiers()[0] == [best["message_id"]]


def test_pairwise_explicit_and_implicit():
    explicit = convert_pairwise({"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}, "imp")[0]
    assert explicit["prompt"] == "Hi?" and explicit["ranking"] == ["chosen", "rejected"]
    conv = [{"role": "user", "content": "Hi?"}]
    implicit = convert_pairwise(
        {
            "chosen": [*conv, {"role": "assistant", "content": "Hello!"}],
            "rejected": [*conv, {"role": "assistant", "content": "Go away."}],
        },
        "imp",
    )[0]
    assert implicit["prompt_id"] == explicit["prompt_id"]
    RankingLine.model_validate(implicit)


def test_scores_become_tiers():
    row = {
        "prompt_id": "p",
        "prompt": "q",
        "annotator": "ann",
        "responses": [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}, {"id": "c", "text": "z"}],
        "scores": {"a": 2, "b": 4, "c": 2},
    }
    (out,) = convert_scores(row, "default")
    assert out["ranking"] == ["b", ["a", "c"]] and "scores" not in out
    RankingLine.model_validate(out)


def test_unconvertible_rows_are_reported(tmp_path):
    src = tmp_path / "pw.jsonl"
    src.write_text(
        json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
        + "\n"
        + json.dumps({"prompt": "q", "chosen": "a"})
        + "\n"
        + json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"})
        + "\n"
    )
    r = import_rankings("pairwise", [src], tmp_path / "out.jsonl")
    assert r.examples_from_rows == 1
    assert any(p.startswith(f"{src}:2: chosen/rejected") for p in r.problems)
    assert any(p.startswith(f"{src}:3: responses") and "identical text" in p for p in r.problems)


def test_converter_surprises_are_named_rows_and_good_rows_kept(tmp_path):
    """Shapes a converter did not foresee end as named rows (exit 0), never as an internal error."""
    from align.cli import main

    pw = tmp_path / "pw.jsonl"
    pw.write_text(
        json.dumps({"prompt": [], "chosen": "a", "rejected": "b"})
        + "\n"
        + json.dumps({"prompt": "ok", "chosen": "a", "rejected": "b"})
        + "\n"
    )
    r = import_rankings("pairwise", [pw], tmp_path / "pw_out.jsonl")
    assert r.examples_from_rows == 1 and r.problems[0].startswith(f"{pw}:1: prompt")

    oa = tmp_path / "oa.jsonl"
    reply = {"role": "assistant", "text": "x", "rank": 0}  # no message_id
    tree = {
        "prompt": {
            "message_id": "p",
            "role": "prompter",
            "text": "q",
            "replies": [reply, {**reply, "rank": 1}],
        }
    }
    good = {"prompt": {"message_id": "p2", "role": "prompter", "text": "q2", "replies": [
        {"message_id": "r1", "role": "assistant", "text": "a", "rank": 0},
        {"message_id": "r2", "role": "assistant", "text": "b", "rank": 1}]}}  # fmt: skip
    oa.write_text(json.dumps(tree) + "\n" + json.dumps(good) + "\n")
    r = import_rankings("oasst", [oa], tmp_path / "oa_out.jsonl")
    assert (
        r.examples_from_rows == 1 and "message_id" in r.problems[0] and r.problems[0].startswith(f"{oa}:1:")
    )

    sc = tmp_path / "sc.jsonl"
    base = {
        "prompt_id": "p",
        "prompt": "q",
        "responses": [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}],
    }
    sc.write_text(
        '{"prompt_id": "p", "prompt": "q", "responses": [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}], '
        '"scores": {"a": NaN, "b": 2}}\n' + json.dumps({**base, "scores": {"a": 1, "b": 2}}) + "\n"
    )
    r = import_rankings("scores", [sc], tmp_path / "sc_out.jsonl")
    assert r.examples_from_rows == 1 and "scores.a: must be a finite number" in r.problems[0]

    assert (
        main(["data", "import-rankings", "--from", "pairwise", str(pw), "--out", str(pw)]) == 2
    )  # own input


def test_one_prompt_never_lands_in_both_splits(tmp_path):
    """HH-RLHF and pairwise imports give every (prompt, responses) its own id; the split is by prompt content."""
    from data_schemas.config import PreferencesConfig
    from stages.preferences import run

    pw = tmp_path / "pw.jsonl"
    rows = [{"prompt": f"prompt {i % 5}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(60)]
    pw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    import_rankings("pairwise", [pw], tmp_path / "r.jsonl")
    run(
        PreferencesConfig(
            inputs=[tmp_path / "r.jsonl"], output_dir=tmp_path / "prefs", validation_fraction=0.4
        )
    )
    from datasets import load_from_disk

    kw = load_from_disk(str(tmp_path / "prefs" / "kwise"))
    texts = {s: {json.dumps(p) for p in kw[s]["prompt"]} for s in kw}
    assert texts.get("validation") and texts["train"].isdisjoint(texts["validation"])


def test_a_failed_import_leaves_an_existing_out_file_as_it_was(tmp_path, capsys):
    """Nothing convertible: exit 2 with the reason, and the --out file the user already had is not truncated."""
    from align.cli import main

    out = tmp_path / "rankings.jsonl"
    out.write_text('{"kept": "from an earlier import"}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"not": "a pair"}\n')
    assert main(["data", "import-rankings", "--from", "pairwise", str(bad), "--out", str(out)]) == 2
    assert "nothing could be converted" in capsys.readouterr().err
    assert out.read_text() == '{"kept": "from an earlier import"}\n'
