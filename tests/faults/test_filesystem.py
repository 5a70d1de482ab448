"""Faults from the file system and hostile configs (issue 34 B11, B16), each one sentence and exit 2, never an
"internal error": a full disk (a real 256 KiB tmpfs where root can mount one), a read-only file system, an alias
bomb, duplicate keys, deep YAML, a deep override, a negative seed, an output path that is a folder, and model
folders whose files are broken."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from align.cli import main
from tests.conftest import EXAMPLES


def _mount(path: Path, *options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {r.stderr.decode()[:120]}")


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    _mount(disk, "size=256k")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


@pytest.fixture
def read_only(tmp_path):
    disk = tmp_path / "ro"
    _mount(disk, "size=64k", "ro")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


def _say(capsys, argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err.replace("\n", " ")


def test_a_full_disk_is_a_sentence_and_the_input_is_untouched(small_disk, tmp_path, capsys):
    src = tmp_path / "big.jsonl"
    rows = [{"instruction": f"Say {i} " + "word " * 60, "output": "ok " * 60} for i in range(600)]  # ~500 KiB
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = src.read_bytes()
    code, err = _say(capsys, ["data", "build", str(src), "--out", str(small_disk / "data")])
    assert code == 2 and "No space left on device" in err and "the disk is full" in err, err
    assert "internal error" not in err and src.read_bytes() == before
    code, err = _say(
        capsys, ["data", "import-rankings", "--from", "hh-rlhf", str(src), "--out", str(small_disk / "x")]
    )
    assert code == 2 and "internal error" not in err


def test_a_read_only_file_system_is_a_sentence_with_the_path(read_only, capsys):
    code, err = _say(
        capsys, ["data", "build", str(EXAMPLES / "instructions_train.jsonl"), "--out", str(read_only / "d")]
    )
    assert code == 2 and "read-only" in err and str(read_only) in err and "internal error" not in err, err


def _sft(tmp_path, *extra):
    return ["sft", "--config", str(tmp_path / "c.yaml"), f"output_dir={tmp_path / 'o'}", *extra]


@pytest.mark.parametrize(
    ("yaml_text", "words"),
    [
        ("\n".join(["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
                   + [f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9) + "]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]),
         "through its aliases"),
        ("model:\n  name_or_path: tiny-random-llama\nmodel:\n  name_or_path: other\n", "duplicate key 'model'"),
        ("x: " + "[" * 400 + "]" * 400 + "\n", "nested deeper than"),
    ],
    ids=["alias-bomb", "duplicate-key", "deep"],
)  # fmt: skip
def test_hostile_yaml_is_refused_at_once(tmp_path, capsys, yaml_text, words):
    (tmp_path / "c.yaml").write_text(yaml_text)
    t0 = time.perf_counter()
    code, err = _say(capsys, _sft(tmp_path))
    assert code == 2 and words in err and "internal error" not in err, err
    assert time.perf_counter() - t0 < 10  # the bomb took 84 s and 3.4 GB before


@pytest.mark.parametrize(
    ("override", "words"),
    [("train.seed=-1", "train.seed"), ("a" + ".b" * 40 + "=1", "more than 16 parts"),
     ("train.learning_rate=" + "[" * 400 + "]" * 400, "train.learning_rate")],
    ids=["negative-seed", "deep-key", "deep-value"],
)  # fmt: skip
def test_hostile_overrides_are_refused_at_once(tmp_path, capsys, override, words):
    (tmp_path / "c.yaml").write_text(Path("configs/sft.yaml").read_text())
    code, err = _say(capsys, _sft(tmp_path, override))
    assert code == 2 and words in err and "internal error" not in err, err


def test_an_output_that_is_a_folder_or_the_input_is_refused(tmp_path, capsys):
    code, err = _say(capsys, ["data", "import-rankings", "--from", "hh-rlhf", str(EXAMPLES / "instructions_train.jsonl"),
                              "--out", str(tmp_path)])  # fmt: skip
    assert code == 2 and "is a folder" in err
    src = tmp_path / "in.jsonl"
    src.write_text((EXAMPLES / "instructions_train.jsonl").read_text())
    before = src.read_bytes()
    for argv in (
        ["data", "build", str(src), "--out", str(src)],
        ["data", "build-preferences", str(src), "--out", str(src)],
    ):
        code, err = _say(capsys, argv)
        assert code == 2 and "is a file, not a folder" in err and "internal error" not in err, err
    assert src.read_bytes() == before


@pytest.mark.parametrize("damage", ["empty", "truncated", "huge-header", "config-types"])
def test_a_broken_model_folder_is_one_sentence(tmp_path, tiny_model_path, capsys, damage):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_path, model)
    weights = model / "model.safetensors"
    if damage == "empty":
        weights.write_bytes(b"")
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "huge-header":
        weights.write_bytes((10**15).to_bytes(8, "little") + b"{}")
    else:
        cfg = json.loads((model / "config.json").read_text())
        cfg["num_hidden_layers"] = "two"
        (model / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "c.yaml").write_text(Path("configs/sft.yaml").read_text())
    args = _sft(tmp_path, f"model.name_or_path={model}", f"data.train_file={EXAMPLES / 'instructions_train.jsonl'}",
                "train.max_steps=1", "train.early_stopping_patience=null", "train.report_to=[none]")  # fmt: skip
    code, err = _say(capsys, args)
    assert code == 2 and "could not be loaded" in err and "internal error" not in err, err
