"""Input readers on hostile files: every bad row is named with its real line and a reason, every good row is kept,
and whole-file problems are one sentence (UserError), never a traceback."""

import json
import os

import pytest

from core.config import UserError
from core.manifest import atomic_write_text
from core.readers import LoadReport, iter_rows

GOOD = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]


def _read(path):
    report = LoadReport()
    rows = list(iter_rows(path, report))
    return rows, report


@pytest.mark.parametrize(
    "bad,reason",
    [
        ('{"x": ' + "1" * 5000 + "}", "Exceeds the limit"),
        ("[" * 5000 + "]" * 5000, "nested too deeply"),
        ('{"a":' * 100 + "1" + "}" * 100, "nested too deeply"),
        ('{"instruction": "\\ud800", "output": "b"}', "unpaired surrogate"),
        ("[1, 2]", "expected a JSON object"),
        ("{oops", "not valid JSON"),
    ],
)
def test_jsonl_bad_line_is_named_and_good_lines_kept(tmp_path, bad, reason):
    p = tmp_path / "in.jsonl"
    p.write_text(json.dumps(GOOD[0]) + "\n" + bad + "\n" + json.dumps(GOOD[1]) + "\n")
    rows, report = _read(p)
    assert [r for _, r in rows] == GOOD and [n for n, _ in rows] == [1, 3]
    assert (
        len(report.problems) == 1
        and report.problems[0].startswith(f"{p}:2: ")
        and reason in report.problems[0]
    )


def test_csv_records_keep_their_real_line_numbers_and_bad_bytes_are_named(tmp_path):
    p = tmp_path / "in.csv"
    big = "x" * (2 << 20)
    p.write_bytes(b'instruction,output\n"two\nlines",ok\nbad\xff,zz\n"' + big.encode() + b'",y\nfine,good\n')
    rows, report = _read(p)
    assert rows == [
        (2, {"instruction": "two\nlines", "output": "ok"}),
        (6, {"instruction": "fine", "output": "good"}),
    ]
    assert report.problems[0].startswith(f"{p}:4: not valid UTF-8")
    assert report.problems[1].startswith(f"{p}:5: ") and "field" in report.problems[1]


def test_whole_file_problems_are_sentences(tmp_path):
    (tmp_path / "c.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match="not a readable Parquet file"):
        _read(tmp_path / "c.parquet")
    with pytest.raises(UserError, match="file not found"):
        _read(tmp_path / "missing.jsonl")
    (tmp_path / "d.json").write_text("[" * 100000)
    with pytest.raises(UserError, match=r"d\.json: "):
        _read(tmp_path / "d.json")


def test_written_files_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644


# ---- the datasets TRL users hold: prompt/completion, ShareGPT, Hub-style folders, saved DatasetDicts ----------
TRL_ROWS = [
    {"prompt": "Say hi", "completion": "Hi!"},
    {
        "prompt": [{"role": "user", "content": "Say hi"}],
        "completion": [{"role": "assistant", "content": "Hi!"}],
    },
    {"conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "Hi!"}]},
    {
        "conversations": [
            {"from": "system", "value": "Be kind."},
            {"from": "human", "value": "Say hi"},
            {"from": "gpt", "value": "Hi!"},
        ]
    },  # fmt: skip
    {"prompt": "Say hi", "completion": [{"role": "assistant", "content": "Hi!"}]},  # text with messages
    {"conversations": [{"from": "robot", "value": "Say hi"}, {"from": "gpt", "value": "Hi!"}]},
    {"text": "Once upon a time"},
]


def _jsonl(path, rows):
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_completion_and_sharegpt_rows_load_as_conversations_and_bad_ones_are_named(tmp_path):
    from core.readers import load_instructions

    convs, report = load_instructions(_jsonl(tmp_path / "rows.jsonl", TRL_ROWS))
    hi = [("user", "Say hi"), ("assistant", "Hi!")]
    assert [[(m.role, m.content) for m in c.messages] for c in convs] == [
        hi,
        hi,
        hi,
        [("system", "Be kind."), *hi],
    ]
    problems = "\n".join(report.problems)
    assert (
        f"{tmp_path / 'rows.jsonl'}:5: completion: the prompt is text and the completion messages" in problems
    )
    assert ":6: " in problems and "is 'robot'" in problems
    assert ":7: " in problems and "a plain 'text' row has no user and assistant turns" in problems
    assert report.kept == 4 and report.read == 7


@pytest.mark.parametrize("held", ["test", "validation", "dev"])
def test_a_hub_style_folder_reads_its_split_files_and_held_out_data_by_any_of_its_names(tmp_path, held):
    from core.readers import has_split, load_instructions

    _jsonl(tmp_path / "data" / "train-00000-of-00002.jsonl", TRL_ROWS[:2])
    _jsonl(tmp_path / "data" / "train-00001-of-00002.jsonl", TRL_ROWS[2:4])
    _jsonl(tmp_path / "data" / f"{held}-00000-of-00001.jsonl", TRL_ROWS[:1])
    train, _ = load_instructions(tmp_path)
    assert len(train) == 4 and has_split(tmp_path, "validation")
    val, report = load_instructions(tmp_path, split="validation")
    assert len(val) == 1 and report.read == 1


def test_a_saved_datasetdict_in_any_shape_gives_its_test_split_as_held_out_data(tmp_path):
    from datasets import Dataset, DatasetDict

    from core.readers import has_split, load_instructions

    DatasetDict({"train": Dataset.from_list([{"prompt": "a", "completion": "b"}] * 3),
                 "test": Dataset.from_list([{"prompt": "c", "completion": "d"}])}).save_to_disk(tmp_path / "saved")  # fmt: skip
    assert has_split(tmp_path / "saved", "validation")
    val, _ = load_instructions(tmp_path / "saved", split="validation")
    assert [(m.role, m.content) for m in val[0].messages] == [("user", "c"), ("assistant", "d")]
    train, _ = load_instructions(tmp_path / "saved")
    assert len(train) == 3


def test_plain_text_rows_are_examples_where_asked_and_refused_in_a_sentence_elsewhere(tmp_path):
    from core.readers import load_instructions
    from data_schemas.records import PlainText

    f = _jsonl(
        tmp_path / "lm.jsonl", [{"text": "Once upon a time"}, {"text": " "}, {"txt": "typo"}, *TRL_ROWS[:1]]
    )
    got, report = load_instructions(f, text_rows=True)
    assert isinstance(got[0], PlainText) and got[0].text == "Once upon a time" and len(got) == 2
    problems = "\n".join(report.problems)
    assert f"{f}:2: text: is empty" in problems and f"{f}:3: row has keys ['txt']" in problems
    assert "or 'text'" in problems and report.kept == 2
    only_text = _jsonl(tmp_path / "only.jsonl", [{"text": "Once upon a time"}])
    with pytest.raises(UserError, match="this command needs a prompt and an answer"):
        load_instructions(only_text)  # a command that needs turns (PPO prompts, eval generate)
    docs, _ = load_instructions(only_text, shape="text", text_rows=True)
    assert [d.text for d in docs] == ["Once upon a time"]
