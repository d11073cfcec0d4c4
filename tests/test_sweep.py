"""The sweep on the tiny model: real Prefect (test server), real MLflow, a real Optuna study in
SQLite, real engine processes (one of them with a NaN installed, one sweep killed)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from loraflow.config import PipelineConfig
from loraflow.engine import launch as engine_launch
from loraflow.evaluation import evaluate

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
RATES = [0.01, 0.02, 0.005]  # three trials, one each (grid)


def sweep_raw(splits: dict[str, Path], model_dir: Path, name: str) -> dict:
    return {
        "data": {k: str(v) for k, v in splits.items()},
        "model": {"base": str(model_dir)},
        "train": {"max_steps": 3, "micro_batch_size": 8, "eval_every": 1},
        "eval": {"max_new_tokens": 8, "batch_size": 4},
        "merge": {"dtype": "fp32"},
        "registry": {"model_name": name},
        "sweep": {"n_trials": 3, "sampler": "grid", "pruner": False,
                  "parameters": {"train.learning_rate": RATES}},
    }


def study_of(home: Path, name: str) -> optuna.Study:
    storage = f"sqlite:///{home / 'sweeps.db'}"
    names = [s for s in optuna.get_all_study_names(storage) if s.startswith(f"{name}-")]
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=storage)


def count_trainings(monkeypatch) -> list[float]:
    """The learning rate of every engine started from here on."""
    rates: list[float] = []
    real = engine_launch.launch

    def counting(engine, *args, **kwargs):
        rates.append(engine.train.learning_rate)
        return real(engine, *args, **kwargs)

    monkeypatch.setattr("tasks.model.engine_launch.launch", counting)
    return rates


def test_a_sweep_records_a_failing_trial_reads_the_test_split_once_and_gates_its_winner(
    prefect_server, home, small_data, tiny_model_dir, monkeypatch
):
    from flows.sweep import sweep

    # the trial with learning rate 0.02 gets a NaN loss at step 2 (tests/faulty_engine.py)
    real_command = engine_launch.launch_command

    def nan_for_one_rate(engine_args, *args, **kwargs):
        command = real_command(engine_args, *args, **kwargs)
        engine = json.loads(Path(engine_args[1]).read_text())
        if engine["train"]["learning_rate"] == 0.02:
            at = command.index("loraflow.engine")
            command[at:at + 1] = ["faulty_engine", "--nan-at-step", "2"]
        return command

    monkeypatch.setattr(engine_launch, "launch_command", nan_for_one_rate)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    reads: list[tuple[str, float]] = []  # every held-out file evaluation reads, and when
    real_read = evaluate.read_test_set
    monkeypatch.setattr(evaluate, "read_test_set", lambda path: reads.append(
        (Path(path).name, time.time())) or real_read(path))

    summary = sweep(config=PipelineConfig.model_validate(
        sweep_raw(small_data, tiny_model_dir, "tiny-sweep")))

    trials = {t["params"]["train.learning_rate"]: t for t in summary["sweep"]["trials"]}
    assert set(trials) == set(RATES)
    failed = trials[0.02]
    assert failed["state"] == "FAIL" and "TrainingStopped" in failed["reason"]
    assert "non-finite" in failed["reason"] or "nan" in failed["reason"].lower()
    completed = [t for t in trials.values() if t["state"] == "COMPLETE"]
    assert len(completed) == 2
    winner = min(completed, key=lambda t: t["value"])  # val_loss: lower wins
    assert summary["sweep"]["winner"] == winner["number"]

    # each trial is an MLflow child run of the sweep's run, with its settings and its curve
    client = MlflowClient()
    for trial in trials.values():
        run = client.get_run(trial["run_id"])
        assert run.data.tags["mlflow.parentRunId"] == summary["run_id"]
        assert float(run.data.params["train.learning_rate"]) == trial["params"][
            "train.learning_rate"]
        if trial["state"] == "COMPLETE":
            assert run.info.status == "FINISHED"
            assert run.data.metrics["sweep.validation.val_loss"] == pytest.approx(
                trial["value"])
            curve = client.get_metric_history(run.info.run_id, "train.val_loss")
            assert sorted(m.step for m in curve if m.step) == [1, 2, 3]  # step 0: the summary
        else:
            assert run.info.status == "FAILED"
            assert "loraflow.trial.failure" in run.data.tags

    # the winner went through the gate and was registered; the test split was read for it
    # alone, after every trial had ended: by the base model's evaluation, the merged winner's
    # and its export check (each at most once; a step cached by an earlier test reads nothing)
    assert summary["model_version"] == "1" and "challenger" in summary["aliases"]
    version = client.get_model_version_by_alias("tiny-sweep", "challenger")
    assert version.run_id == summary["run_id"]
    last_trial_ended = max(client.get_run(t["run_id"]).info.end_time for t in trials.values())
    test_reads = [when for name, when in reads if name == "test.jsonl"]
    assert 1 <= len(test_reads) <= 3, reads
    assert min(test_reads) * 1000 >= last_trial_ended, (reads, last_trial_ended)
    assert summary["metrics"]["tuned"]["exact_match"] >= 0
    report = client.download_artifacts(summary["run_id"], "report/report.html")
    page = Path(report).read_text()
    assert "Sweep: 3 trials" in page and "validation split only" in page
    logged = {f.path for f in client.list_artifacts(summary["run_id"], "report")}
    assert "report/sweep.png" in logged
    from loraflow.summary import render

    text = render(summary)
    assert "read once, for the winner" in text and "validation" in text


def test_a_killed_sweep_resumes_and_trains_no_finished_trial_twice(
    prefect_server, home, small_data, tiny_model_dir, monkeypatch, tmp_path
):
    from prefect.settings import PREFECT_API_URL

    from flows.sweep import sweep

    name = "tiny-sweep-killed"
    raw = sweep_raw(small_data, tiny_model_dir, name)
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "LORAFLOW_HOME": str(home), "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "sweep.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "loraflow.cli", "sweep", "--config",
                                    str(config)], cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    storage = f"sqlite:///{home / 'sweeps.db'}"
    deadline = time.monotonic() + 240
    done: list[float] = []
    try:
        while not done and time.monotonic() < deadline and process.poll() is None:
            time.sleep(1.0)
            if any(s.startswith(f"{name}-") for s in optuna.get_all_study_names(storage)):
                done = [t.params["train.learning_rate"] for t in study_of(home, name).get_trials(
                    states=(TrialState.COMPLETE,))]
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the sweep and the engine it started
        process.wait()
    assert done, (tmp_path / "sweep.log").read_text()[-3000:]

    rates = count_trainings(monkeypatch)
    summary = sweep(config=PipelineConfig.model_validate(raw))

    assert not set(rates) & set(done), (rates, done)  # no finished trial trained again
    study = study_of(home, name)
    completed = study.get_trials(states=(TrialState.COMPLETE,))
    assert sorted(t.params["train.learning_rate"] for t in completed) == sorted(RATES)
    assert len(summary["sweep"]["trials"]) == 3  # the killed one's stale record left out
    assert summary["model_version"] == "1"
