"""Sweep tasks: a trial's MLflow child run, its training (train_adapter itself, so a training
with settings already trained is taken from the content cache), and its score on the
validation split. The test split is never read here."""

from __future__ import annotations

from typing import Any

import optuna
from mlflow import MlflowClient
from prefect import task

from loraflow.artifacts import Adapter, TokenizedData, ValidatedData
from loraflow.base_model import BaseModelRef
from loraflow.config import EvalConfig
from loraflow.evaluation import evaluate
from loraflow.search import TrialRef, report
from tasks.caching import CONTENT
from tasks.evaluation import training_curves
from tasks.model import base_on_this_machine, train_adapter
from tasks.tracking import fetch, fetch_verified, log_metrics, log_params

train_trial = train_adapter.with_options(name="train_trial")


def open_trial_run(sweep_run: str, number: int, values: dict[str, Any]) -> str:
    """The trial's MLflow run, a child of the sweep's, with the trial's settings as params."""
    client = MlflowClient()
    parent = client.get_run(sweep_run)
    run = client.create_run(parent.info.experiment_id, run_name=f"trial-{number}",
                            tags={"mlflow.parentRunId": sweep_run,
                                  "loraflow.trial": str(number)})
    log_params(run.info.run_id, values)
    return run.info.run_id


def close_trial_run(run_id: str, failure: str | None = None) -> None:
    """FINISHED, or FAILED with its reason as the tag loraflow.trial.failure."""
    client = MlflowClient()
    if failure is not None:
        client.set_tag(run_id, "loraflow.trial.failure", failure[:5000])
    client.set_terminated(run_id, "FAILED" if failure is not None else "FINISHED")


def tell_curve(trial: TrialRef, adapter: Adapter) -> None:
    """The adapter's validation curve to the trial, for the steps it was not told while
    training (a cached training, or one on the gpu pool): what later trials are pruned by."""
    study = optuna.load_study(study_name=trial.study, storage=trial.storage)
    running = optuna.Trial(study, trial.trial_id)
    for step, loss in training_curves(adapter)["train.val_loss"]:
        report(study, running, step, loss, trial.maximize)


@task(cache_policy=CONTENT)
def score_trial(
    adapter: Adapter, base: BaseModelRef, data: ValidatedData, tokens: TokenizedData,
    metric: str, cfg: EvalConfig, run_id: str,
) -> float:
    """The trial's objective on the validation split: the engine's validation loss, or a task
    metric of base + adapter answering the validation prompts (the test split stays unread)."""
    if metric == "val_loss":
        score = adapter.result["val_loss"]
    else:
        validation = fetch(data.uri) / "validation.jsonl"
        sets = [s for s in evaluate.load_sets(cfg, validation) if s.cfg.path is None]
        source = evaluate.ModelSource(path=base_on_this_machine(base).path,
                                      adapter=fetch_verified(adapter, "adapter"))
        result = evaluate.evaluate(source, sets, tokens.template, cfg, label="validation")
        score = result.metrics[metric]
    log_metrics(run_id, {f"sweep.validation.{metric}": score})
    return score
