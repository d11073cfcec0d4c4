"""Tasks for the pipeline as a deployment: remember which data a model was trained on (and skip
data already trained on), and run training on the `gpu` work pool with the adapter handed back
through MLflow, not through Prefect results."""

from __future__ import annotations

import time
from typing import Any

from mlflow import MlflowClient
from prefect import task

from loraflow.artifacts import Adapter, TokenizedData, ValidatedData
from loraflow.base_model import BaseModelRef
from loraflow.config import LoraSettings, TrainConfig
from tasks.caching import CONTENT

DATA_TAG = "loraflow.data_sha256"  # the validated data a pipeline run trained on
MODEL_TAG = "loraflow.model_name"  # the registered model it was for
SKIPPED_TAG = "loraflow.skipped"  # why a run stopped early
ADAPTER_TAG = "loraflow.adapter"  # the Adapter reference (JSON), set by the train flow
TRAIN_DEPLOYMENT = "train/train"
CRASH_ATTEMPTS = 3  # training runs started when the previous one crashed (a worker died)


class RemoteTrainingError(RuntimeError):
    """The train deployment's run did not complete; the message names the flow run."""


def record_trained_data(data: ValidatedData, model_name: str, run_id: str) -> str | None:
    """Tag this MLflow run with the data's hash; return the id of an earlier finished run that
    trained `model_name` on the same data (None if there is none). Not a task: it must run
    in every pipeline run, and a fully cached re-run reports only cached tasks."""
    client = MlflowClient()
    client.set_tag(run_id, DATA_TAG, data.sha256)
    client.set_tag(run_id, MODEL_TAG, model_name)
    experiment_id = client.get_run(run_id).info.experiment_id
    runs = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{DATA_TAG}` = '{data.sha256}' and tags.`{MODEL_TAG}` = '{model_name}' "
            "and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time ASC"],
    )
    earlier = [r for r in runs if r.info.run_id != run_id and SKIPPED_TAG not in r.data.tags]
    return earlier[0].info.run_id if earlier else None


def skip_run(run_id: str, name: str, data: ValidatedData, earlier: str) -> dict[str, Any]:
    """End early: tag the MLflow run with the reason, say it, return the (short) summary."""
    reason = f"skipped: data already trained on (sha256 {data.sha256[:12]}, run {earlier})"
    MlflowClient().set_tag(run_id, SKIPPED_TAG, reason)
    print(f"loraflow: {reason}")
    return {"run_id": run_id, "model_name": name, "skipped": reason, "data_sha256": data.sha256}


@task(cache_policy=CONTENT)
def train_on_gpu_pool(
    tokens: TokenizedData,
    base: BaseModelRef,
    lora: LoraSettings,
    train: TrainConfig,
    base_source: str,
    run_id: str,
) -> Adapter:
    """Run the `train` deployment (gpu pool) and wait; read its adapter from the MLflow run.

    A run_deployment child returns no result the parent can read unless results are persisted
    where both sides can reach them; the MLflow run is that shared place already."""
    from prefect.deployments import run_deployment

    parameters = {
        "tokens": tokens.model_dump(mode="json"),
        "base": base.model_dump(mode="json"),
        "base_source": base_source,
        "lora": lora.model_dump(mode="json"),
        "train": train.model_dump(mode="json"),
        "run_id": run_id,
        "gpus_per_node": train.gpus_per_node,
        "nodes": train.nodes,
    }
    for attempt in range(1, CRASH_ATTEMPTS + 1):
        # One run a machine; they meet at train.rdzv_endpoint, so all must start before any
        # can finish: start them all (timeout=0), then wait for each.
        started = [run_deployment(TRAIN_DEPLOYMENT, parameters=parameters, as_subflow=True,
                                  timeout=0) for _ in range(train.nodes)]
        runs = [wait_until_final(flow_run.id) for flow_run in started]
        crashed = [r for r in runs if r.state is not None and r.state.is_crashed()]
        if not crashed or attempt == CRASH_ATTEMPTS:
            break
        # A machine died (its runs stopped sending heartbeats; infra/automations.yaml marks
        # them Crashed): start again; a worker that takes it resumes from the checkpoint the
        # dead one shared through the MLflow run (tasks.model.share_checkpoint).
        print(f"loraflow: training flow run {crashed[0].name} crashed ({crashed[0].state.message}"
              f"); attempt {attempt + 1} of {CRASH_ATTEMPTS} resumes from its last shared "
              "checkpoint", flush=True)
    for flow_run in runs:
        if flow_run.state is None or not flow_run.state.is_completed():
            state = flow_run.state.name if flow_run.state else "unknown"
            raise RemoteTrainingError(
                f"the train deployment's flow run {flow_run.name} ({flow_run.id}) ended "
                f"{state}; its logs are in the Prefect UI; is a worker polling the gpu pool "
                f"(infra/worker.sh), one per machine for train.nodes={train.nodes}?"
            )
    tags = MlflowClient().get_run(run_id).data.tags
    if ADAPTER_TAG not in tags:
        raise RemoteTrainingError(
            f"flow run {flow_run.id} completed but MLflow run {run_id} has no {ADAPTER_TAG} tag; "
            "the gpu worker must use the same MLFLOW_TRACKING_URI as the pipeline"
        )
    return Adapter.model_validate_json(tags[ADAPTER_TAG])


def wait_until_final(flow_run_id: Any, poll_seconds: float = 2.0) -> Any:
    """The flow run once it has ended (completed, failed, crashed, cancelled)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        while True:
            flow_run = client.read_flow_run(flow_run_id)
            if flow_run.state is not None and flow_run.state.is_final():
                return flow_run
            time.sleep(poll_seconds)
