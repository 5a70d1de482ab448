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
