"""A sweep's search: its Optuna study, stored where a killed sweep finds it again, the settings
each trial draws from sweep.parameters, and the config a trial trains with. No Prefect, no
MLflow: flows/sweep.py runs the trials.

The study lives in its own database: $LORAFLOW_SWEEP_STORAGE (an SQLAlchemy URL, e.g. a
`loraflow_sweeps` database on the tracking database's PostgreSQL server) or
<LORAFLOW_HOME>/sweeps.db. Not in MLflow's own database: both keep their schema version in an
`alembic_version` table, and one would take the other's for its own.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel

from loraflow.config import LOWER_IS_BETTER, PipelineConfig, SearchRange, SweepConfig

optuna.logging.set_verbosity(logging.WARNING)  # the sweep reports its trials itself

FAILURE = "failure"  # a failed trial's user attribute: why it failed
INTERRUPTED = "interrupted"  # a trial whose sweep was killed: its settings are tried again
RUN_ID = "mlflow_run_id"  # the trial's MLflow child run
ADAPTER = "adapter"  # the trained adapter's reference (JSON): what the winner is released from


class NoTrialSucceeded(RuntimeError):
    """Every trial of the sweep failed or was pruned: there is no winner to release."""


class TrialRef(BaseModel):
    """A running trial, as the training task reports its validation losses to it."""

    storage: str
    study: str
    trial_id: int
    maximize: bool  # the objective's direction: losses are reported negated when maximizing


class TrialSummary(BaseModel):
    """One trial as the sweep's report, summary and MLflow show it."""

    number: int
    state: str  # COMPLETE, PRUNED, FAIL
    params: dict[str, Any]
    value: float | None  # the objective on the validation split (completed trials)
    reason: str | None = None  # why it failed or was pruned
    run_id: str | None = None  # its MLflow child run


class SweepOutcome(BaseModel):
    """The finished search: every counted trial, the winner's number, what mattered."""

    study: str
    objective: str
    trials: list[TrialSummary]
    winner: int
    importances: dict[str, float]


def study_storage(home: Path) -> str:
    return os.environ.get("LORAFLOW_SWEEP_STORAGE") or f"sqlite:///{home / 'sweeps.db'}"


class AskedGrid(optuna.samplers.GridSampler):
    """GridSampler for ask-and-tell: its after_trial stops an `optimize()` loop when the grid is
    used up, which raises outside one; the sweep stops at the grid's size itself (n_trials)."""

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Any) -> None:
        return None


def trials_to_run(sweep: SweepConfig) -> int:
    """n_trials, or the grid's size when that is smaller (a grid tries each point once)."""
    if sweep.sampler != "grid":
        return sweep.n_trials
    return min(sweep.n_trials, math.prod(len(space) for space in sweep.parameters.values()
                                         if isinstance(space, list)))


def open_study(sweep: SweepConfig, name: str, storage: str) -> optuna.Study:
    """Create the study, or load the one a killed or finished sweep of the same search left."""
    sampler: optuna.samplers.BaseSampler = (
        AskedGrid(
            {key: [choice_name(c) for c in space] for key, space in sweep.parameters.items()
             if isinstance(space, list)}, seed=sweep.seed)
        if sweep.sampler == "grid" else optuna.samplers.TPESampler(seed=sweep.seed))
    # the first two trials always run to the end: they are what the median is taken over
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=2) if sweep.pruner
              else optuna.pruners.NopPruner())
    return optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner,
                               direction="maximize" if maximizes(sweep) else "minimize",
                               load_if_exists=True)


def maximizes(sweep: SweepConfig) -> bool:
    return sweep.objective != "val_loss" and sweep.objective not in LOWER_IS_BETTER


def finished(study: optuna.Study) -> list[FrozenTrial]:
    """The trials that count towards n_trials: completed, pruned, or failed for a reason of
    their own (not the ones a killed sweep left running, which are tried again)."""
    return [t for t in study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and INTERRUPTED not in t.user_attrs)]


def requeue_interrupted(study: optuna.Study) -> list[FrozenTrial]:
    """Trials a killed sweep left RUNNING: marked failed (interrupted) and their settings queued
    again, so the next trial trains them (resuming from the engine's checkpoint, or taken
    from the cache if the training had finished). Those trials."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, skip_if_exists=False)
    return stale


def choice_name(value: Any) -> Any:
    """Optuna takes str, int, float, bool or None choices: a list (target modules) as JSON."""
    return json.dumps(value) if isinstance(value, list | dict) else value


def draw(trial: optuna.Trial, sweep: SweepConfig, cfg: PipelineConfig) -> dict[str, Any]:
    """The trial's values of sweep.parameters, as the config's fields take them."""
    values: dict[str, Any] = {}
    for key, space in sweep.parameters.items():
        section, _, name = key.partition(".")
        if isinstance(space, SearchRange):
            field = type(getattr(cfg, section)).model_fields[name]
            values[key] = (trial.suggest_int(key, int(space.low), int(space.high), log=space.log)
                           if field.annotation is int else
                           trial.suggest_float(key, space.low, space.high, log=space.log))
        else:
            chosen = trial.suggest_categorical(key, [choice_name(c) for c in space])
            values[key] = json.loads(chosen) if any(isinstance(c, list) for c in space) \
                else chosen
    return values


def trial_config(cfg: PipelineConfig, values: dict[str, Any]) -> PipelineConfig:
    """The pipeline config with a trial's values in place (validated like any config)."""
    raw = cfg.model_dump()
    for key, value in values.items():
        section, _, name = key.partition(".")
        raw[section][name] = value
    return PipelineConfig.model_validate(raw)


def report_progress(ref: TrialRef, records: list[dict[str, Any]]) -> None:
    """Report the engine's validation losses to the trial; raise optuna.TrialPruned when the
    pruner stops it. The engine reports val_loss every train.eval_every steps: a trial can stop
    no sooner than its next validation."""
    losses = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not losses:
        return
    study = optuna.load_study(study_name=ref.study, storage=ref.storage)
    trial = optuna.Trial(study, ref.trial_id)
    for step, loss in losses:
        report(study, trial, step, loss, ref.maximize)
    if trial.should_prune():
        raise optuna.TrialPruned(f"validation loss {losses[-1][1]:.4f} at step "
                                 f"{losses[-1][0]} is worse than the median of earlier trials")


def report(study: optuna.Study, trial: optuna.Trial, step: int, loss: float,
           maximize: bool) -> None:
    """One validation loss, once per step, signed as the study's direction compares (the
    pruner compares intermediate values in the objective's direction)."""
    known = study._storage.get_trial(trial._trial_id).intermediate_values
    if step not in known:
        trial.report(-loss if maximize else loss, step)


def importances(study: optuna.Study) -> dict[str, float]:
    """Each parameter's share of the objective's variance over the completed trials (fANOVA);
    empty with fewer than two completed trials or a single parameter value."""
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(completed) < 2 or len({json.dumps(t.params, sort_keys=True) for t in completed}) < 2:
        return {}
    return dict(optuna.importance.get_param_importances(study))
