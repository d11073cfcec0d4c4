import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loraflow.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_unknown_config_key_exits_2_with_every_problem_and_runs_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 3\nlora:\n  r: 0\n")
    done = run_cli("run", "--config", str(bad), "eval.batch_size=zero")
    assert done.returncode == 2
    assert "3 problem(s)" in done.stderr
    assert "train.epochs: unknown key" in done.stderr
    assert "lora.r = 0" in done.stderr and "eval.batch_size = 'zero'" in done.stderr
    assert "Flow run" not in done.stdout + done.stderr  # nothing started


def test_help_lists_the_run_command():
    done = run_cli("--help")
    assert done.returncode == 0 and "run" in done.stdout
