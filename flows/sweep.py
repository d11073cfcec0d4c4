"""A hyperparameter sweep that feeds the promotion gate, one Prefect flow:

    validate_data -> tokenize -> trials (each: settings drawn from sweep.parameters -> train,
    an MLflow child run of the sweep's run -> its score on the validation split) -> the winner
    (best validation score) -> release_stage of flows/finetune.py, as any retraining: evaluate
    base -> merge (the winner answers the test split) -> champion -> gate -> report (with the
    sweep's trials) -> register -> push -> promote

The winner is chosen on the validation split only and the test split is read for the winner
alone, so its test score is not the best of N noisy scores. The study is stored beside the runs
(loraflow/search.py): a killed sweep started again resumes, a finished trial is never trained
again, and a trial whose settings were already trained takes the training from train_adapter's
content cache. A trial that fails (out of memory after its retries, a NaN loss) or is pruned
is recorded with its reason and the sweep goes on.

As a deployment (prefect.yaml `sweep`) each trial's training runs on the gpu pool through the
`train` deployment, sweep.parallel at once (the pool's concurrency limit caps them).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import mlflow
import optuna
from optuna.trial import TrialState
from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture
from prefect.runtime import deployment

from flows.finetune import release_stage
from loraflow.artifacts import Adapter, TokenizedData, TrainRequest, ValidatedData
from loraflow.base_model import BaseModelRef
from loraflow.config import PipelineConfig, SweepConfig
from loraflow.credentials import check_mlflow, safe_url
from loraflow.data.sources import check_splits
from loraflow.engine.launch import TrainingError
from loraflow.environment import configure
from loraflow.hashing import sha256_json
from loraflow.search import (
    ADAPTER,
    FAILURE,
    RUN_ID,
    NoTrialSucceeded,
    SweepOutcome,
    TrialRef,
    TrialSummary,
    draw,
    finished,
    importances,
    maximizes,
    open_study,
    requeue_interrupted,
    study_storage,
    trial_config,
    trials_to_run,
)
from loraflow.summary import render, write_summary
from tasks.data import tokenize_data, validate_data
from tasks.deployments import RemoteStepError, Where, record_trained_data
from tasks.model import prepare_base_model
from tasks.release import open_configured_store
from tasks.steps import StepLog
from tasks.sweep import close_trial_run, open_trial_run, score_trial, tell_curve, train_trial
from tasks.tracking import log_metrics, log_params, pipeline_run

# What ends one trial and not the sweep: the engine's failures after their retries (OOM,
# NaN/divergence, crash), a gpu-pool run that did not complete, the pruner.
TRIAL_FAILURES = (TrainingError, RemoteStepError, optuna.TrialPruned)
DEFAULT_CONFIG = PipelineConfig()


class SweepError(ValueError):
    """The sweep cannot start: the message says what to set."""


@flow(name="sweep", log_prints=True)
def sweep(config: PipelineConfig = DEFAULT_CONFIG) -> dict[str, Any]:
    """Search sweep.parameters on the validation split; release the winner through the gate."""
    cfg, step, start, space = config, StepLog(), time.perf_counter(), config.sweep
    if space is None:
        raise SweepError("a sweep needs the `sweep` section of the config (parameters, "
                         "n_trials, objective); see README, Sweeps")
    home = configure()
    check_mlflow()
    open_configured_store(cfg.storage).check()
    check_splits(cfg.data)
    where: Where = "gpu_pool" if deployment.id else "here"
    with pipeline_run(cfg, name="sweep") as run_id:
        base = step(prepare_base_model, source=cfg.model.base)
        data = step(validate_data, data=cfg.data, base=base, run_id=run_id)
        record_trained_data(data, cfg.registry.model_name, run_id=run_id)
        tokens = step(tokenize_data, data=data, base=base, cfg=cfg.data, run_id=run_id)
        outcome, adapter = search(cfg, space, base, data, tokens, run_id, where,
                                  storage=study_storage(home))
        release = release_stage(cfg, step, run_id, base, data, tokens, adapter, where,
                                sweep=outcome)
    summary = {
        "run_id": run_id, "tracking_uri": mlflow.get_tracking_uri(),
        "model_name": cfg.registry.model_name, **release, "sweep": outcome.model_dump(),
        "tasks": step.steps, "seconds": round(time.perf_counter() - start, 3),
    }
    write_summary(summary, home)
    get_run_logger().info("%s", render(summary))
    return summary


def search(
    cfg: PipelineConfig, space: SweepConfig, base: BaseModelRef, data: ValidatedData,
    tokens: TokenizedData, run_id: str, where: Where, storage: str,
) -> tuple[SweepOutcome, Adapter]:
    """Run trials until sweep.n_trials have finished (those of an earlier, killed run of the
    same search, in the study at `storage`, count); the outcome and the winner's adapter."""
    name = f"{cfg.registry.model_name}-" + study_key(cfg, space, base, tokens)
    study = open_study(space, name, storage)
    for stale in requeue_interrupted(study):
        print(f"loraflow: sweep {name}: trial {stale.number} stopped with the killed sweep; "
              "its settings are tried again (resuming from its checkpoint)")
        if RUN_ID in stale.user_attrs:
            close_trial_run(stale.user_attrs[RUN_ID], "interrupted: the sweep was killed; "
                            "a later trial trains these settings")
    log_params(run_id, {"sweep.study": name, "sweep.storage": safe_url(storage)})
    while (left := trials_to_run(space) - len(finished(study))) > 0:
        batch = [start_trial(cfg, space, study, storage, study.ask(), base, tokens,
                             run_id, where)
                 for _ in range(min(space.parallel, left))]
        for trial in batch:
            finish_trial(cfg, space, study, trial, base, data, tokens)
    return outcome(study, space, run_id)


def study_key(
    cfg: PipelineConfig, space: SweepConfig, base: BaseModelRef, tokens: TokenizedData
) -> str:
    """The search's identity: data, base, every fixed setting and the search space; not
    n_trials or parallel, so a sweep can be resumed with more trials."""
    return sha256_json([tokens.sha256, base.sha256, cfg.lora.model_dump(mode="json"),
                        cfg.train.model_dump(mode="json"), cfg.eval.model_dump(mode="json"),
                        space.model_dump(mode="json", exclude={"n_trials", "parallel"})])[:12]


def start_trial(
    cfg: PipelineConfig, space: SweepConfig, study: optuna.Study, storage: str,
    trial: optuna.Trial, base: BaseModelRef, tokens: TokenizedData, run_id: str, where: Where,
) -> Trial:
    """Draw the trial's settings, open its child run and submit its training."""
    values = draw(trial, space, cfg)
    settings = trial_config(cfg, values)
    child = open_trial_run(run_id, trial.number, values)
    trial.set_user_attr(RUN_ID, child)
    print(f"loraflow: trial {trial.number}: {values}")
    ref = TrialRef(storage=storage, study=study.study_name, trial_id=trial._trial_id,
                   maximize=maximizes(space))
    request = TrainRequest(tokens=tokens, base=base, lora=settings.lora, train=settings.train,
                           launch=settings.launch)
    future = train_trial.submit(request=request, run_id=child, where=where, trial=ref)
    return Trial(optuna=trial, run_id=child, ref=ref, training=future)


@dataclass
class Trial:
    """A trial while it trains: its Optuna trial, MLflow child run and training future."""

    optuna: optuna.Trial
    run_id: str
    ref: TrialRef
    training: PrefectFuture


def finish_trial(
    cfg: PipelineConfig, space: SweepConfig, study: optuna.Study, trial: Trial,
    base: BaseModelRef, data: ValidatedData, tokens: TokenizedData,
) -> None:
    """Wait for the training, score it on the validation split and tell the study. A trial
    that fails (or is pruned) is recorded so, with its reason, and the sweep goes on."""
    number = trial.optuna.number
    try:
        adapter = trial.training.result(raise_on_failure=True)
        tell_curve(trial.ref, adapter)
        score = score_trial(adapter=adapter, base=base, data=data, tokens=tokens,
                            metric=space.objective, cfg=cfg.eval, run_id=trial.run_id)
        failure = None if math.isfinite(score) else (
            f"{space.objective} on the validation split is {score}")
    except TRIAL_FAILURES as exc:
        failure = (f"pruned: {exc}" if isinstance(exc, optuna.TrialPruned)
                   else f"{type(exc).__name__}: {exc}")
    if failure is not None:
        pruned = failure.startswith("pruned")
        trial.optuna.set_user_attr(FAILURE, failure)
        study.tell(trial.optuna, state=TrialState.PRUNED if pruned else TrialState.FAIL)
        close_trial_run(trial.run_id, failure)
        print(f"loraflow: trial {number} {'pruned' if pruned else 'FAILED'}: {failure}")
        return
    trial.optuna.set_user_attr(ADAPTER, adapter.model_dump_json())
    study.tell(trial.optuna, score)
    close_trial_run(trial.run_id)
    print(f"loraflow: trial {number}: {space.objective} {score:.4f} (validation)")


def outcome(study: optuna.Study, space: SweepConfig, run_id: str
            ) -> tuple[SweepOutcome, Adapter]:
    """The trials that count, the winner (best validation score) and its adapter; raise
    NoTrialSucceeded when none completed."""
    trials = [TrialSummary(number=t.number, state=t.state.name, params=t.params, value=t.value,
                           reason=t.user_attrs.get(FAILURE), run_id=t.user_attrs.get(RUN_ID))
              for t in finished(study)]
    completed = [t for t in finished(study) if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        reasons = "; ".join(f"trial {t.number}: {t.reason}" for t in trials)
        raise NoTrialSucceeded(
            f"no trial of sweep {study.study_name} completed ({len(trials)} failed or pruned), "
            f"so nothing was registered: {reasons}. Fix: the reasons above (a narrower "
            "learning-rate range, a smaller train.micro_batch_size), or sweep.pruner=false")
    best = study.best_trial
    result = SweepOutcome(study=study.study_name, objective=space.objective, trials=trials,
                          winner=best.number, importances=importances(study))
    log_params(run_id, {"sweep.winner": best.number, "sweep.winner_run_id":
                        best.user_attrs.get(RUN_ID), **{f"sweep.winner.{k}": v
                                                        for k, v in best.params.items()}})
    log_metrics(run_id, {f"sweep.validation.{space.objective}": best.value,
                         "sweep.trials.completed": len(completed),
                         "sweep.trials.failed": len(trials) - len(completed)})
    return result, Adapter.model_validate_json(best.user_attrs[ADAPTER])
