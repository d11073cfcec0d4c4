"""The base or champion evaluation as its own flow, for the `evaluate` deployment on the `gpu`
work pool: the pipeline's evaluate_base and evaluate_champion tasks start it with their
EvaluateRequest (tasks/deployments.py); it runs the same evaluation here, in the pipeline's
MLflow run, and hands the result back through the run's tag loraflow.step.evaluate_<label>."""

from __future__ import annotations

from prefect import flow

from loraflow.artifacts import EvaluateRequest, Evaluation
from loraflow.environment import configure
from tasks.deployments import hand_back
from tasks.model import evaluate_model


@flow(name="evaluate", log_prints=True)
def evaluate(request: EvaluateRequest, run_id: str) -> Evaluation:
    """The base model or the registered champion's files answer the held-out test sets on this
    machine, logged into MLflow run `run_id`."""
    configure()
    # the task of the pipeline's step name (evaluate_base or evaluate_champion)
    evaluation = evaluate_model.with_options(name=request.step)(request=request, run_id=run_id)
    hand_back(run_id, request, evaluation)
    return evaluation
