"""The merge as its own flow, for the `merge` deployment on the `gpu` work pool: base + adapter
answer the test sets, the adapter is folded in, the merged model answers them in its serving
dtype (the tuned score), the answers are compared and the merged model is logged. Started by the
pipeline with run_deployment (tasks/deployments.py); both references go back through the
pipeline's MLflow run (tags loraflow.step.merge_adapter and loraflow.step.evaluate_tuned)."""

from __future__ import annotations

from prefect import flow

from loraflow.artifacts import Adapter, HeldoutSplit, MergedModel
from loraflow.base_model import BaseModelRef
from loraflow.config import EvalConfig, MergeConfig
from loraflow.data.prompts import PromptTemplate
from loraflow.environment import configure
from tasks.deployments import base_on_this_machine, hand_back
from tasks.model import merge_adapter


@flow(name="merge", log_prints=True)
def merge(
    base: BaseModelRef,
    adapter: Adapter,
    test: HeldoutSplit,
    template: PromptTemplate,
    eval_cfg: EvalConfig,
    cfg: MergeConfig,
    run_id: str,
) -> MergedModel:
    """Merge the adapter (fetched from the MLflow run) into the base on this machine."""
    configure()
    model, tuned = merge_adapter(base=base_on_this_machine(base), adapter=adapter, test=test,
                                 template=template, eval_cfg=eval_cfg, cfg=cfg, run_id=run_id)
    hand_back(run_id, "merge_adapter", model)
    hand_back(run_id, "evaluate_tuned", tuned)
    return model
