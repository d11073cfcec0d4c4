"""The merge as its own flow, for the `merge` deployment on the `gpu` work pool: base + adapter
answer the test sets, the adapter is folded in, the merged model answers them in its serving
dtype (the tuned score), the answers are compared and the merged model is logged. Started by
the pipeline's merge_adapter task with its MergeRequest (tasks/deployments.py); the result
(the merged model and its evaluation) goes back through the pipeline's MLflow run (tag
loraflow.step.merge_adapter)."""

from __future__ import annotations

from prefect import flow

from loraflow.artifacts import MergeRequest, MergeResult
from loraflow.environment import configure
from tasks.deployments import hand_back
from tasks.model import merge_adapter


@flow(name="merge", log_prints=True)
def merge(request: MergeRequest, run_id: str) -> MergeResult:
    """Merge the adapter (fetched from the MLflow run) into the base on this machine."""
    configure()
    merged = merge_adapter(request=request, run_id=run_id)
    hand_back(run_id, request, merged)
    return merged
