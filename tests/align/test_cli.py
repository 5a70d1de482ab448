import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "align", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_bad_config_exits_2_without_traceback(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("output_dir: out\ndata:\n  train_file: x.jsonl\nlora:\n  rank: 8\n")
    r = run_cli("sft", "--config", str(cfg))
    assert r.returncode == 2
    assert "lora.rank: unknown key" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_missing_data_file_is_a_clear_error(tmp_path):
    r = run_cli(
        "sft",
        "--config",
        "configs/sft.yaml",
        f"output_dir={tmp_path / 'o'}",
        "data.train_file=nope.jsonl",
        "model.name_or_path=tiny-random-llama",
    )
    assert r.returncode == 2
    assert "nope.jsonl: instruction data not found" in r.stderr
    assert "Traceback" not in r.stderr


def test_run_and_report_usage_errors_exit_2():
    for cmd, msg in (
        (["run"], "give the pipeline with --config"),
        (["report", "runs/nope"], "not a run directory"),
    ):
        r = run_cli(*cmd)
        assert r.returncode == 2, cmd
        assert msg in r.stderr and "Traceback" not in r.stderr, cmd


def test_help_lists_the_config_keys_and_overrides_come_as_trl_users_type_them(tmp_path):
    """`align sft --help` lists every config key with its default; `--learning_rate 1e-4`, `--train.x=v`, TRL's
    names (`--lora_r 4`) and KEY=VALUE words between options all reach the config (checked through `align plan`,
    which validates the stage's config and counts its trainable parameters)."""
    import json

    from align.cli import build_parser, overrides_as_options

    r = run_cli("sft", "--help")
    assert (
        r.returncode == 0 and "\n  train.learning_rate (0.0002)" in r.stdout and "\n  lora.r (16)" in r.stdout
    )
    ap = build_parser()
    assert overrides_as_options(ap, ["dpo", "--config", "c.yaml", "--beta", "0.2", "--resume", "lora_r=4",
                                     "--train.max_steps=3", "--gradient_checkpointing", "--num-processes", "2"]) == [
        "dpo", "--config", "c.yaml", "--resume", "--num-processes", "2", "beta=0.2", "lora_r=4", "train.max_steps=3",
        "gradient_checkpointing=true"]  # fmt: skip
    assert overrides_as_options(ap, ["data", "build", "a.jsonl", "--out", "o", "dedup.threshold=0.9"]) == [
        "data", "build", "a.jsonl", "--out", "o", "--set", "dedup.threshold=0.9"]  # fmt: skip

    def trainable(*overrides):
        r = run_cli("plan", "--config", "configs/sft.yaml", "model.name_or_path=tiny-random-llama", "--device", "cpu",
                    "--json", *overrides)  # fmt: skip
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["trainable"]

    assert (
        trainable("--lora_r", "4", "--learning_rate", "1e-4")
        == trainable("lora.r=4")
        != trainable("lora.r=8")
    )
    bad = run_cli("sft", "--config", "configs/sft.yaml", "--train.learnig_rate", "1e-4")
    assert bad.returncode == 2 and "command line: train.learnig_rate: unknown key; did you mean train.learning_rate?" in (
        bad.stderr)  # fmt: skip


def test_data_build_takes_overrides_after_its_inputs(tmp_path):
    out = tmp_path / "d"
    r = run_cli(
        "data", "build", "examples/data/instructions_train.jsonl", "--out", str(out), "dedup.threshold=0.5"
    )
    assert r.returncode == 0, r.stderr
    assert "threshold: 0.5" in (out / "config.yaml").read_text()
