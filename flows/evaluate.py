"""The base or champion evaluation as its own flow, for the `evaluate` deployment on the `gpu`
work pool: the pipeline starts it with run_deployment (tasks/deployments.py); the result's
reference goes back through the pipeline's MLflow run (tag loraflow.step.evaluate_<label>)."""

from __future__ import annotations

from typing import Literal

from prefect import flow

from loraflow.artifacts import Champion, Evaluation, HeldoutSplit
from loraflow.base_model import BaseModelRef
from loraflow.config import EvalConfig
from loraflow.data.prompts import PromptTemplate
from loraflow.environment import configure
from tasks.deployments import base_on_this_machine, hand_back
from tasks.model import evaluate_base, evaluate_model

evaluate_champion_model = evaluate_model.with_options(name="evaluate_champion")


@flow(name="evaluate", log_prints=True)
def evaluate(
    label: Literal["base", "champion"],
    test: HeldoutSplit,
    template: PromptTemplate,
    cfg: EvalConfig,
    run_id: str,
    base: BaseModelRef | None = None,
    champion: Champion | None = None,
) -> Evaluation:
    """The base model (label base) or the registered champion's files (label champion)
    answer the held-out test sets on this machine, logged into MLflow run `run_id`."""
    configure()
    if label == "base":
        if base is None:
            raise ValueError("evaluate deployment: label=base needs the `base` parameter")
        result = evaluate_base(model=base_on_this_machine(base), adapter=None, test=test,
                               template=template, cfg=cfg, run_id=run_id)
    else:
        if champion is None:
            raise ValueError("evaluate deployment: label=champion needs `champion`")
        result = evaluate_champion_model(model=champion, adapter=None, test=test,
                                         template=template, cfg=cfg, run_id=run_id,
                                         label="champion")
    hand_back(run_id, f"evaluate_{label}", result)
    return result
