"""Input readers: rows from instruction files in any accepted shape, each row validated, the good ones kept.

A bad row never stops the good rows from loading: it is reported as `file:line: field: what is wrong` and
counted by reason. Reading is streaming for JSONL and tolerant of a UTF-8 BOM, CRLF line ends and blank lines.
Used by every stage that reads instruction data (SFT, PPO prompts, `align data build`), by the gates (perplexity
data) and by the scoring API; it sits in align's core so that eval and stages read files the same way.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from core.config import UserError
from data_schemas.records import SHAPES, Conversation, PlainText, detect_shape

MAX_LINE_BYTES = 1 << 20  # a 1 MiB line is almost certainly not one instruction example


@dataclass
class LoadReport:
    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)  # "file:line: field: reason"
    examples_from_rows: int = 0

    def drop(self, where: str, reason_key: str, message: str) -> None:
        self.dropped[reason_key] += 1
        self.problems.append(f"{where}: {message}")

    def as_dict(self) -> dict:
        return {
            "rows_read": self.read,
            "rows_kept": self.kept,
            "examples": self.examples_from_rows,
            "dropped": dict(self.dropped),
        }


MAX_DEPTH = (
    64  # nesting deeper than any instruction or ranking row; deeper input is refused, not recursed into
)


def _json_problem(text: str) -> tuple[object, str | None, str]:
    """(value, reason key, message): json.loads with every way bad text can fail turned into a sentence."""
    try:
        return json.loads(text), None, ""
    except json.JSONDecodeError as e:
        return None, "invalid_json", f"not valid JSON ({e.msg} at column {e.colno})"
    except RecursionError:
        return None, "too_deep", f"JSON nested too deeply (limit {MAX_DEPTH} levels)"
    except ValueError as e:  # e.g. an integer of thousands of digits
        return None, "invalid_json", f"not usable JSON ({str(e).splitlines()[0][:120]})"


def _text_problem(value: object, depth: int = 0) -> str | None:
    """Why a parsed row cannot be used as text (nesting too deep, an unpaired surrogate), or None."""
    if depth > MAX_DEPTH:
        return f"nested too deeply (limit {MAX_DEPTH} levels)"
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "contains an unpaired surrogate (a lone \\ud800-\\udfff escape); it is not text"
        return None
    if isinstance(value, dict):
        items = [*value.keys(), *value.values()]
    elif isinstance(value, list):
        items = value
    else:
        return None
    for v in items:
        if (problem := _text_problem(v, depth + 1)) is not None:
            return problem
    return None


def _checked(report: LoadReport, where: str, row: object):
    """The row when it is a usable JSON object; otherwise None, with the reason in the report."""
    if not isinstance(row, dict):
        report.drop(where, "not_an_object", f"expected a JSON object, found {type(row).__name__}")
        return None
    if (problem := _text_problem(row)) is not None:
        report.drop(where, "invalid_text", problem)
        return None
    return row


def iter_rows(path: Path, report: LoadReport):
    """Yield (line_number, row_dict) from JSONL / JSON array / CSV / Parquet; bad lines go to the report.

    Whatever a line holds (broken JSON, a 5000-digit number, deep nesting, invalid UTF-8, lone surrogates, an
    over-long CSV field), it becomes one named problem and the next line is read: no input ends in a traceback."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                if not raw.strip():
                    continue
                report.read += 1
                where = f"{path}:{lineno}"
                if len(raw) > MAX_LINE_BYTES:
                    report.drop(
                        where, "line_too_long", f"line is {len(raw)} bytes (limit {MAX_LINE_BYTES}); skipped"
                    )
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    report.drop(
                        where, "invalid_utf8", f"not valid UTF-8 (byte {e.start}); re-save the file as UTF-8"
                    )
                    continue
                row, reason, message = _json_problem(text)
                if reason is not None:
                    report.drop(where, reason, message)
                    continue
                if (row := _checked(report, where, row)) is not None:
                    yield lineno, row
    elif suffix == ".json":
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not valid UTF-8 (byte {e.start}); re-save the file as UTF-8") from None
        data, reason, message = _json_problem(text)
        if reason is not None:
            raise UserError(f"{path}: {message}")
        if not isinstance(data, list):
            raise UserError(f"{path}: a .json file must hold an array of rows")
        for i, row in enumerate(data, start=1):
            report.read += 1
            if (row := _checked(report, f"{path}:item {i}", row)) is not None:
                yield i, row
    elif suffix == ".csv":
        yield from _csv_rows(path, report)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq  # lazy: pyarrow is heavy

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises its own error types for a corrupt or truncated file
            raise UserError(
                f"{path}: not a readable Parquet file ({type(e).__name__}: {str(e)[:200]})"
            ) from None
        for i, row in enumerate(table.to_pylist(), start=1):
            report.read += 1
            if (row := _checked(report, f"{path}:row {i}", row)) is not None:
                yield i, row
    else:
        raise UserError(f"{path}: unsupported file type '{suffix}' (use .jsonl, .json, .csv or .parquet)")


CSV_FIELD_LIMIT = MAX_LINE_BYTES


def _csv_rows(path: Path, report: LoadReport):
    """CSV rows with the line each record starts on (a quoted field may span lines). Bytes that are not UTF-8
    and fields over CSV_FIELD_LIMIT make that record a named problem, not the end of the file."""
    text = path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except (StopIteration, csv.Error):
        return
    while True:
        start = reader.line_num + 1
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            report.read += 1
            report.drop(f"{path}:{start}", "invalid_csv", f"not a valid CSV record ({e})")
            continue
        if not values:
            continue
        report.read += 1
        where = f"{path}:{start}"
        bad = next((v for v in values if _text_problem(v) is not None), None)
        if bad is not None:
            report.drop(where, "invalid_utf8", "not valid UTF-8; re-save the file as UTF-8")
            continue
        if any(len(v) > CSV_FIELD_LIMIT for v in values):
            report.drop(where, "field_too_long", f"a field is over {CSV_FIELD_LIMIT} characters; skipped")
            continue
        row = {k: v for k, v in zip(header, values, strict=False) if k and v != ""}
        yield start, row


_BRANCH = re.compile(r"^(str|int|float|bool|none|constrained-str|function-.*|.*\[.*\])$")


def _clean_loc(loc) -> list[str]:
    return [str(p) for p in loc if not (isinstance(p, str) and _BRANCH.match(p))]


def describe_row_error(err: ValidationError, allowed: str | None = None) -> tuple[str, str]:
    """The first problem of a row in words: (reason key for the counts, 'field: what is wrong').

    Shared by instruction rows and ranking lines, so the same mistake reads the same way everywhere.
    """
    errors = err.errors()
    # For union fields (a prompt that is text or messages) pydantic reports one error per branch: the deepest
    # location is the one that says what is really wrong; its branch tags ('str', 'list[...]') are noise.
    e = max(errors, key=lambda x: len(_clean_loc(x["loc"])))
    parts = _clean_loc(e["loc"])
    loc = ".".join(parts) or "row"
    msg = e["msg"].replace("Value error, ", "")
    kind = e["type"]
    same_field = [x for x in errors if _clean_loc(x["loc"]) == parts]
    if len(same_field) > 1 and all(x["type"].endswith("_type") for x in same_field):
        return (
            "wrong_type",
            f"{loc}: has the wrong type ({type(e.get('input')).__name__}); see docs/formats.md",
        )
    if kind == "missing":
        msg = "required field is missing"
    elif kind == "extra_forbidden":
        msg = "unknown field (a typo?" + (f" allowed: {allowed})" if allowed else ")")
    elif kind in ("string_type", "list_type", "model_type", "dict_type", "int_type"):
        msg = f"{msg.lower()}, got {type(e.get('input')).__name__}"
    if kind == "value_error" and ":" in msg.split(" ")[0]:
        loc, msg = msg.split(":", 1)
        msg = msg.strip()
    if kind == "value_error":
        kind = "invalid_" + re.split(r"[.\[]", loc)[0]
    return kind, f"{loc}: {msg}"


def iter_conversations(path: Path, shape: str, system_prompt: str | None, report: LoadReport):
    """Yield (where, row, conversation) for every valid example of a file; bad rows go to the report."""
    for lineno, row in iter_rows(path, report):
        yield from row_conversations(f"{path}:{lineno}", row, shape, system_prompt, report)


def row_conversations(
    where: str, row: dict, shape: str, system_prompt: str | None, report: LoadReport, text_rows: bool = False
):
    """Yield (where, row, conversation) for the examples of one row in `shape` (auto: detected), or report it.
    `text_rows`: a plain `text` row is an example too (a `PlainText`, for SFT and the perplexity gate); otherwise it
    is refused in a sentence saying why."""
    row_shape = detect_shape(row) if shape == "auto" else shape
    if row_shape in (None, "text") and "text" in row:
        if not text_rows:
            report.drop(
                where,
                "text_row",
                "a plain 'text' row has no user and assistant turns: SFT and the perplexity gate learn and score it "
                "whole, but this command needs a prompt and an answer: give it as prompt + completion",
            )
            return

        def examples():
            return [PlainText.model_validate(row)]
    elif row_shape is None or row_shape == "text":
        report.drop(
            where,
            "unknown_shape",
            f"row has keys {sorted(row)[:6]} but no 'messages', 'prompt' + 'completion', 'conversations', "
            "'instruction', 'instances'" + (" or 'text'" if text_rows else "")
            + "; see docs/formats.md for the accepted shapes",
        )  # fmt: skip
        return
    else:

        def examples():
            return SHAPES[row_shape].model_validate(row).conversations(system_prompt)

    try:
        got = examples()
    except ValidationError as e:
        kind, msg = describe_row_error(e)
        report.drop(where, kind, msg)
        return
    report.kept += 1
    report.examples_from_rows += len(got)
    for conv in got:
        yield where, row, conv


def load_examples(
    path: Path,
    shape: str = "auto",
    system_prompt: str | None = None,
    split: str = "train",
    text_rows: bool = False,
) -> tuple[list[tuple[str, dict, Conversation | PlainText]], LoadReport]:
    """(where, row, example) of every example of an instruction file or of a split of a folder (see
    load_instructions): the row kept beside its example for what needs its other columns (a reward's reference
    answer, a code reward's tests)."""
    path = Path(path)
    report = LoadReport()
    if not path.exists():
        raise UserError(f"{path}: instruction data not found")
    saved = path.is_dir() and (_saved_dataset(path) or not split_files(path, split))
    if saved:  # a saved dataset's rows as they were written: shapes detected, no system prompt added
        shape, system_prompt = "auto", None
    got = [
        found
        for where, row in iter_dataset_rows(path, report, split)
        for found in row_conversations(where, row, shape, system_prompt, report, text_rows)
    ]
    if not got and not saved:
        detail = "; ".join(report.problems[:3])
        raise UserError(f"{path}: no usable instruction rows ({report.read} read). {detail}".strip())
    return got, report


def load_instructions(
    path: Path,
    shape: str = "auto",
    system_prompt: str | None = None,
    split: str = "train",
    text_rows: bool = False,
) -> tuple[list[Conversation | PlainText], LoadReport]:
    """Normalised conversations from an instruction file, or from a split of a folder: one written by
    `align data build` or `datasets`' save_to_disk, or a Hub-style folder of split files (`train.jsonl`,
    `data/train-00000-of-00001.parquet`, ...). `split`: train, or validation (also named valid, val, dev or
    test: SPLIT_NAMES). `text_rows`: plain `text` rows are examples too (`PlainText`: SFT, the perplexity gate)."""
    got, report = load_examples(path, shape, system_prompt, split, text_rows)
    return [conv for _, _, conv in got], report


# A split's names in the folders users hold (Hub repositories and save_to_disk datasets name held-out data freely)
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev", "test")}
DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")


def _saved_dataset(path: Path) -> bool:
    """Whether `path` is a `datasets` save_to_disk folder (an `align data build` artifact holds one in dataset/)."""
    folder = path / "dataset" if (path / "dataset").is_dir() else path
    return any((folder / f).exists() for f in ("dataset_dict.json", "state.json", "dataset_info.json"))


def split_files(path: Path, split: str) -> list[Path]:
    """The data files of `split` in a Hub-style folder (at its top or in data/): `train.jsonl`, `train-*.parquet`,
    `test_0.csv`, ... under the first of the split's names (SPLIT_NAMES) that has any, in name order."""
    files = [f for d in (path, path / "data") if d.is_dir() for f in sorted(d.iterdir())
             if f.is_file() and f.suffix.lower() in DATA_SUFFIXES]  # fmt: skip
    for name in SPLIT_NAMES.get(split, (split,)):
        found = [f for f in files if re.fullmatch(rf"{re.escape(name)}([-_.].*)?", f.stem.lower())]
        if found:
            return found
    return []


def has_split(path: Path, split: str) -> bool:
    """Whether a dataset folder (built, saved or Hub-style) has a non-empty split under one of its names."""
    path = Path(path)
    if split_files(path, split) and not _saved_dataset(path):
        return True
    folder = path / "dataset" if (path / "dataset").exists() else path
    return any((folder / name).exists() for name in SPLIT_NAMES.get(split, (split,)))


def iter_dataset_rows(path: Path, report: LoadReport, split: str = "train"):
    """Yield (where, row) from a data file, or from `split` of a folder (save_to_disk, or Hub-style split files:
    split_files), each row named by its file and line (or row); bad lines go to the report."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: not found")
    if not path.is_dir():
        for lineno, row in iter_rows(path, report):
            yield f"{path}:{lineno}", row
        return
    files = [] if _saved_dataset(path) else split_files(path, split)
    if files:
        for f in files:
            for lineno, row in iter_rows(f, report):
                yield f"{f}:{lineno}", row
        return
    from datasets import load_from_disk

    folder = path / "dataset" if (path / "dataset").exists() else path
    try:
        ds = load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as e:
        raise UserError(
            f"{path}: neither a dataset folder (`align data build`, save_to_disk) nor one of split files "
            f"(train.jsonl, data/train-*.parquet, ...) ({e})"
        ) from None
    if hasattr(ds, "keys"):
        names = [n for n in SPLIT_NAMES.get(split, (split,)) if n in ds]
        if not names:
            raise UserError(f"{path}: has no '{split}' split (it has {sorted(ds.keys())})")
        ds = ds[names[0]]
    for i, row in enumerate(ds, start=1):
        report.read += 1
        yield f"{path}:row {i}", row
