import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loraflow.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_unknown_config_key_exits_2_with_every_problem_and_runs_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epoch: 3\nlora:\n  r: 0\n")
    done = run_cli("run", "--config", str(bad), "eval.batch_size=zero")
    assert done.returncode == 2
    assert "3 problem(s)" in done.stderr
    assert "train.epoch: unknown key" in done.stderr
    assert "lora.r = 0" in done.stderr and "eval.batch_size = 'zero'" in done.stderr
    assert "Flow run" not in done.stdout + done.stderr  # nothing started


def test_sweep_without_a_sweep_section_says_what_to_add_and_runs_nothing():
    done = run_cli("sweep", "--config", str(ROOT / "configs" / "default.yaml"))
    assert done.returncode == 2
    assert "no `sweep` section" in done.stderr and "README, Sweeps" in done.stderr
    assert "Flow run" not in done.stdout + done.stderr


def test_help_lists_the_run_command():
    done = run_cli("--help")
    assert done.returncode == 0 and "run" in done.stdout


def test_validate_prints_the_report_writes_cleaned_data_and_quarantine(tmp_path):
    good = '{"instruction": "Add.", "input": "%d + 1", "output": "%d"}\n'
    data = tmp_path / "train.jsonl"
    data.write_text("".join(good % (i, i + 1) for i in range(9)) + "not json\n")
    out = tmp_path / "out"
    done = run_cli("validate", str(data), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "not_json 1" in done.stdout
    assert (out / "quarantine" / "train.jsonl").read_text() == "not json\n"
    assert len((out / "train.jsonl").read_text().splitlines()) == 9

    done = run_cli("validate", str(data), "--out", str(out), "--json")
    counts = json.loads(done.stdout)
    assert done.returncode == 0
    assert {k: counts[k] for k in ("read", "kept", "cleaned", "quarantined")} == {
        "read": 10, "kept": 9, "cleaned": 0, "quarantined": 1,
    }  # fmt: skip
    assert counts["reasons"] == {"not_json": 1}

    strict = run_cli("validate", str(data), "--out", str(out), "--set", "data.min_kept_fraction=1")
    assert strict.returncode == 1
    assert "train.jsonl:10: not JSON" in strict.stderr and "min_kept_fraction" in strict.stderr


def test_validate_counts_answer_tokens_with_the_configured_models_tokenizer(
    tmp_path, tiny_model_dir
):
    data = tmp_path / "train.jsonl"
    data.write_text(
        '{"instruction": "Add.", "input": "1 + 1", "output": "2"}\n'
        '{"instruction": "Add.", "input": "1 + 2", "output": "the answer is three"}\n'
    )
    done = run_cli(
        "validate", str(data), "--out", str(tmp_path / "out"), "--json",
        "--set", f"model.base={tiny_model_dir}", "--set", "data.clean.min_output_tokens=3",
        "--set", "data.min_kept_fraction=0.5",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["reasons"] == {"too_short": 1}
    missing = run_cli("validate", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "nope.jsonl does not exist" in missing.stderr


def test_validate_reads_every_format_and_says_where_each_bad_record_is(tmp_path):
    from dataformats import FORMATS, write_records

    records = [{"instruction": f"Add {i}.", "input": f"{i} + 1", "output": f"{i + 1}"}
               for i in range(6)]  # fmt: skip
    paths = []
    for n, fmt in enumerate(FORMATS):
        rows = [{**r, "instruction": f"{fmt}: {r['instruction']}"} for r in records]
        rows[n % 6] = {"instruction": f"{fmt} empty", "output": " "}
        paths.append(write_records(tmp_path / "in", f"part-{n}", fmt, rows))
    out = tmp_path / "out"
    done = run_cli("validate", *map(str, paths), "--out", str(out), "--json",
                   "--set", "data.min_kept_fraction=0.8")  # fmt: skip
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout)
    assert (counts["read"], counts["kept"], counts["quarantined"]) == (48, 40, 8)
    assert counts["reasons"] == {"empty": 8}
    rows = [r.split("\t") for r in (out / "quarantine" / "train.tsv").read_text().splitlines()[1:]]
    where = {Path(r[1]).name if ".arrow" not in r[1] else "arrow": r[2] for r in rows}
    assert where == {
        "part-0.jsonl": "1", "part-1.jsonl.gz": "2", "part-2.jsonl.zst": "3",
        "part-3.json": str(2 + 5 * 3),  # the line its element starts on (indent=2, 5 lines each)
        "part-4.parquet": "row 5", "part-5.csv": "row 6", "part-6.tsv": "row 1",
        "arrow": "row 2",  # the second row of the first Arrow file
    }  # fmt: skip
    quarantined = [json.loads(x) for x in (out / "quarantine" / "train.jsonl").read_text()
                   .splitlines()]  # fmt: skip
    assert all(q["output"] == " " for q in quarantined)  # JSON lines to fix and resubmit


def test_validate_names_each_unreadable_file_with_its_fix_and_exits_2(tmp_path):
    from test_formats import BROKEN, GOOD

    for name, (raw, _) in BROKEN.items():
        (tmp_path / name).write_bytes(raw)
    (tmp_path / "fine.jsonl").write_text(GOOD)
    names = sorted(BROKEN)
    done = run_cli("validate", str(tmp_path / "fine.jsonl"), *(str(tmp_path / n) for n in names),
                   "--out", str(tmp_path / "out"))  # fmt: skip
    assert done.returncode == 2
    problems = [x for x in done.stderr.splitlines() if x.startswith("  - train: ")]
    assert len(problems) == len(names), done.stderr
    for name, problem in zip(names, problems, strict=True):
        assert str(tmp_path / name) in problem and re.search(BROKEN[name][1], problem), problem
    assert not (tmp_path / "out").exists()


def test_a_temporary_prefect_server_that_does_not_start_in_time_is_one_message(tmp_path):
    """On a busy machine Prefect's temporary server can miss its start-up timeout (a tiny one
    here): `loraflow run` says what happened and what to do, with no traceback, and leaves no
    server process behind."""
    import os
    from pathlib import Path

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env |= {"LORAFLOW_HOME": str(home), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "0"}
    done = subprocess.run([sys.executable, "-m", "loraflow.cli", "run"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Prefect's temporary server did not answer within 0 s" in done.stderr
    assert "make ui-prefect" in done.stderr and "PREFECT_API_URL=" in done.stderr
    assert "Traceback" not in done.stderr and "Flow run" not in done.stdout + done.stderr
    left = []  # any process still running with this home in its environment
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(home).encode() in (proc / "environ").read_bytes():
                left.append(proc.name)
        except OSError:  # gone, or not ours to read
            continue
    assert not left, f"processes left running: {left}"


def test_loraflow_gives_prefects_temporary_server_minutes_to_start():
    from loraflow.environment import EPHEMERAL_STARTUP_SECONDS

    assert EPHEMERAL_STARTUP_SECONDS >= 120  # Prefect's own 20 s was missed under load
    env = {k: v for k, v in __import__("os").environ.items()
           if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    code = ("from loraflow.environment import configure; configure(); "
            "from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as T; "
            "print(T.value())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, check=True, timeout=120)
    assert done.stdout.split()[-1] == str(EPHEMERAL_STARTUP_SECONDS)


def test_validate_says_what_improvement_the_test_split_can_show():
    """The shipped 64 test prompts cannot show a 1-point improvement: validate says so before
    any GPU time is spent; a 2,000-example split would see far less."""
    test = str(ROOT / "data" / "orders" / "test.jsonl")
    done = run_cli("validate", str(ROOT / "data" / "orders" / "train.jsonl"), "--test", test)
    assert done.returncode == 0, done.stderr
    assert "gate: the 64 test examples can show an improvement in exact_match of 0.1" in done.stdout
    assert "will mostly not be promoted" in done.stdout


def test_a_bad_value_names_the_form_of_override_each_command_takes(tmp_path):
    """`loraflow run` takes bare key=value (it rejects --set); validate and the release
    commands take --set key=value. Each fix names the form its own command takes."""
    done = run_cli("run", "train.max_steps=zero")
    assert done.returncode == 2
    assert "e.g. train.max_steps=... on the command line" in done.stderr
    assert "--set" not in done.stderr
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    done = run_cli("validate", str(data), "--set", "data.min_kept_fraction=2")
    assert done.returncode == 2
    assert "e.g. --set data.min_kept_fraction=... on the command line" in done.stderr


def test_data_files_that_cannot_be_read_stop_the_run_before_anything_starts(tmp_path):
    """A missing file was found only after prepare_base_model ran, under two Prefect
    tracebacks; a CSV file named .jsonl was quarantined line by line as "not JSON"."""
    import os

    table = tmp_path / "orders.jsonl"
    table.write_text("instruction,input,output\nAdd.,1 + 1,2\nAdd.,2 + 2,4\n")
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    done = subprocess.run(
        [sys.executable, "-m", "loraflow.cli", "run", f"data.train=[{table}]",
         f"data.test=[{tmp_path / 'missing.jsonl'}]"],
        capture_output=True, text=True, timeout=120, env=env | {"LORAFLOW_HOME": str(home)},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith("loraflow: nothing ran: data files cannot be read:")
    assert f"train: {table} is a CSV table (header row: instruction, input, output)" in done.stderr
    assert f"Fix: mv {table} {tmp_path / 'orders.csv'}" in done.stderr
    assert f"test: {tmp_path / 'missing.jsonl'} does not exist" in done.stderr
    assert "Traceback" not in done.stderr and "Flow run" not in done.stdout + done.stderr
    assert not (home / "models").exists()  # the base model was not prepared


def test_a_user_error_found_during_the_run_is_one_message_without_a_traceback(
    tmp_path, tiny_model_dir
):
    """What only the run can find (here: too few usable training examples) ends it with
    loraflow's message alone: Prefect's traceback and its failed states quoting the same
    message stay off the terminal."""
    import os

    train = tmp_path / "train.jsonl"
    train.write_text('{"instruction": "Add.", "input": "1 + 1", "output": "2"}\n'
                     + "".join(f"not json {i}\n" for i in range(9)))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    done = subprocess.run(
        [sys.executable, "-m", "loraflow.cli", "run", f"model.base={tiny_model_dir}",
         f"data.train=[{train}]", "registry.model_name=cli-user-error"],
        capture_output=True, text=True, timeout=600,
        env=env | {"LORAFLOW_HOME": str(tmp_path / "home")},
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    assert "loraflow: the run stopped, nothing was registered:" in done.stderr
    assert "Traceback" not in output
    assert output.count("the data is not usable") == 1, output[-3000:]
    assert "Beginning flow run" in output  # Prefect's other lines still show
