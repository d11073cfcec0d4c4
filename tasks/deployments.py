"""Tasks for the pipeline as a deployment: remember which data a model was trained on (and skip
data already trained on), and run every step that loads the full model on the `gpu` work pool.

The pipeline runs on the `cpu` pool. Training (flows/train.py), the base and champion
evaluations (flows/evaluate.py) and the merge with the tuned evaluation (flows/merge.py) are
deployments on the `gpu` pool, started with run_deployment by the tasks below. Each child
flow works in the pipeline's MLflow run and tags it with its result's reference, which is
how the task reads it back (not through Prefect results, which both sides would need a shared
result store for). The task on the pipeline's side is cached on the same content as the step
itself, so a re-run with nothing changed starts no child run at all.

After training, the GPU steps fetch the adapter from the MLflow run (rank 0 logged it there)
on whichever gpu worker takes them: a LoRA adapter is megabytes, any GPU machine can serve the
next step, and a run never waits for one particular machine.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple, TypeVar

from mlflow import MlflowClient
from prefect import Task, get_run_logger, task
from prefect.states import Completed, State

from loraflow.artifacts import (
    Adapter,
    ArtifactRef,
    Evaluation,
    HeldoutSplit,
    MergedModel,
    TokenizedData,
    ValidatedData,
)
from loraflow.base_model import BaseModelRef
from loraflow.config import EvalConfig, LaunchConfig, LoraSettings, MergeConfig, TrainConfig
from loraflow.data.prompts import PromptTemplate
from tasks.caching import CONTENT
from tasks.evaluation import CHAMPION_CACHE, champion_to_compare, evaluate_champion
from tasks.model import evaluate_base, merge_adapter, prepare_base_model, train_adapter

DATA_TAG = "loraflow.data_sha256"  # the validated data a pipeline run trained on
MODEL_TAG = "loraflow.model_name"  # the registered model it was for
SKIPPED_TAG = "loraflow.skipped"  # why a run stopped early
ADAPTER_TAG = "loraflow.adapter"  # the Adapter reference (JSON), set by the train flow
STEP_TAG = "loraflow.step."  # + step: a GPU step's result (its reference, JSON), set by its flow
TRAIN_DEPLOYMENT = "train/train"
CRASH_ATTEMPTS = 3  # training runs started when the previous one crashed (a worker died)
EVALUATE_DEPLOYMENT = "evaluate/evaluate"
MERGE_DEPLOYMENT = "merge/merge"


Ref = TypeVar("Ref", bound=ArtifactRef)


class RemoteStepError(RuntimeError):
    """A gpu-pool deployment's run did not complete; the message quotes its own error."""



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


def skip_run(run_id: str, name: str, data: ValidatedData, earlier: str) -> State:
    """End early: tag the MLflow run with the reason, log it to the flow run (Prefect UI), and
    end in a Completed state named Skipped whose result is the (short) summary."""
    reason = f"skipped: data already trained on (sha256 {data.sha256[:12]}, run {earlier})"
    MlflowClient().set_tag(run_id, SKIPPED_TAG, reason)
    get_run_logger().info("loraflow: %s", reason)
    summary = {"run_id": run_id, "model_name": name, "skipped": reason,
               "data_sha256": data.sha256}
    return Completed(name="Skipped", message=reason, data=summary)


def base_on_this_machine(base: BaseModelRef) -> BaseModelRef:
    """The base model on the machine a gpu-pool step runs on: the pipeline's directory when it
    is here, else model.base resolved here, which must give the same bytes."""
    if base.path.is_dir():
        return base
    local = prepare_base_model(base.source)
    if local.sha256 != base.sha256:
        raise ValueError(
            f"model.base {base.source!r} resolves to different weights on this worker "
            f"(sha256 {local.sha256[:12]} vs {base.sha256[:12]} on the pipeline's "
            "machine); pin the source (a path or revision) both machines see alike"
        )
    return local


def hand_back(run_id: str, step: str, ref: ArtifactRef) -> None:
    """Tag the pipeline's MLflow run with a GPU step's result, for the pipeline to read."""
    MlflowClient().set_tag(run_id, STEP_TAG + step, ref.model_dump_json())


def handed_back(run_id: str, step: str, kind: type[Ref]) -> Ref:
    """The reference a GPU step's flow tagged the pipeline's MLflow run with."""
    tags = MlflowClient().get_run(run_id).data.tags
    if STEP_TAG + step not in tags:
        raise RemoteStepError(
            f"the {step} flow run completed but MLflow run {run_id} has no {STEP_TAG}{step} "
            "tag; the gpu worker must use the same MLFLOW_TRACKING_URI as the pipeline"
        )
    return kind.model_validate_json(tags[STEP_TAG + step])


def run_on_gpu_pool(
    deployment: str, parameters: dict[str, Any], copies: int = 1, crash_attempts: int = 1
) -> None:
    """Run a gpu-pool deployment and wait for it to end; raise, quoting the run's own error,
    unless it completed. `copies` > 1 starts that many runs at once (one per machine of a
    multi-machine training, which meet at a rendezvous: all must start before any ends); a
    crashed attempt (a worker died) is started again up to `crash_attempts` times."""
    from prefect.deployments import run_deployment

    for attempt in range(1, crash_attempts + 1):
        # One run a machine; they meet at a rendezvous, so all must start before any can
        # finish: start them all (timeout=0), then wait for each.
        started = [run_deployment(deployment, parameters=parameters, as_subflow=True, timeout=0)
                   for _ in range(copies)]
        runs = [wait_until_final(flow_run.id) for flow_run in started]
        crashed = [r for r in runs if r.state is not None and r.state.is_crashed()]
        if not crashed or attempt == crash_attempts:
            break
        # A machine died (its runs stopped sending heartbeats; infra/automations.yaml marks
        # them Crashed): start again; a worker that takes it resumes from the checkpoint the
        # dead one shared through the MLflow run (tasks.model.share_checkpoint).
        print(f"loraflow: {deployment} flow run {crashed[0].name} crashed "
              f"({crashed[0].state.message}); attempt {attempt + 1} of {crash_attempts} "
              "resumes from its last shared checkpoint", flush=True)
    for flow_run in runs:
        check_completed(flow_run, deployment, copies)


def check_completed(flow_run: Any, deployment: str, copies: int = 1) -> None:
    """Raise RemoteStepError unless the flow run completed; the error quotes the run's final
    state message (its exception), and suggests a worker only when no worker took the run."""
    state = flow_run.state
    if state is not None and state.is_completed():
        return
    name = state.name if state is not None else "unknown"
    where = f"the {deployment} deployment's flow run {flow_run.name} ({flow_run.id})"
    if state is None or state.type.value in ("SCHEDULED", "PENDING"):
        machines = f", one per machine for {copies} machines" if copies > 1 else ""
        raise RemoteStepError(
            f"{where} is still {name}: no worker took it. Start a worker on the gpu pool "
            f"(infra/worker.sh gpu{machines})."
        )
    raise RemoteStepError(
        f"{where} ended {name}: {state.message or 'no message'} (its logs are in the Prefect "
        "UI under that flow run)"
    )


def wait_until_final(flow_run_id: Any, poll_seconds: float = 2.0) -> Any:
    """The flow run once it has ended (completed, failed, crashed, cancelled)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        while True:
            flow_run = client.read_flow_run(flow_run_id)
            if flow_run.state is not None and flow_run.state.is_final():
                return flow_run
            time.sleep(poll_seconds)


def dumped(**values: Any) -> dict[str, Any]:
    """Deployment parameters: pydantic models as JSON-ready dicts."""
    return {k: v.model_dump(mode="json") if hasattr(v, "model_dump") else v
            for k, v in values.items()}


@task(name="train_adapter", cache_policy=CONTENT)
def train_on_gpu_pool(
    tokens: TokenizedData, base: BaseModelRef, lora: LoraSettings, train: TrainConfig,
    launch: LaunchConfig, run_id: str,
) -> Adapter:
    """Run the `train` deployment (gpu pool; one run a machine) and read the adapter its
    rank 0 tagged the MLflow run with."""
    parameters = dumped(tokens=tokens, base=base, lora=lora, train=train, launch=launch,
                        run_id=run_id)
    # launch.gpus_per_node goes inside `launch`: the train flow's own gpus_per_node parameter
    # (the deployment's) is left alone, and the flow takes whichever of the two is set.
    run_on_gpu_pool(TRAIN_DEPLOYMENT, parameters, copies=launch.nodes,
                    crash_attempts=CRASH_ATTEMPTS)
    tags = MlflowClient().get_run(run_id).data.tags
    if ADAPTER_TAG not in tags:
        raise RemoteStepError(
            f"the train flow run completed but MLflow run {run_id} has no {ADAPTER_TAG} tag; "
            "the gpu worker must use the same MLFLOW_TRACKING_URI as the pipeline"
        )
    return Adapter.model_validate_json(tags[ADAPTER_TAG])


@task(name="evaluate_base", cache_policy=CONTENT)
def evaluate_base_on_gpu_pool(
    model: BaseModelRef,
    adapter: None,
    test: HeldoutSplit,
    template: PromptTemplate,
    cfg: EvalConfig,
    run_id: str,
) -> Evaluation:
    """The base model answers the test sets on the gpu pool (the `evaluate` deployment)."""
    parameters = dumped(label="base", base=model, test=test, template=template, cfg=cfg,
                        run_id=run_id)
    run_on_gpu_pool(EVALUATE_DEPLOYMENT, parameters)
    return handed_back(run_id, "evaluate_base", Evaluation)


@task(name="merge_adapter", cache_policy=CONTENT)
def merge_on_gpu_pool(
    base: BaseModelRef,
    adapter: Adapter,
    test: HeldoutSplit,
    template: PromptTemplate,
    eval_cfg: EvalConfig,
    cfg: MergeConfig,
    run_id: str,
) -> tuple[MergedModel, Evaluation]:
    """Merge, evaluate the merged model and check it against base + adapter on the gpu pool
    (the `merge` deployment); (the merged model, its evaluation)."""
    parameters = dumped(base=base, adapter=adapter, test=test, template=template,
                        eval_cfg=eval_cfg, cfg=cfg, run_id=run_id)
    run_on_gpu_pool(MERGE_DEPLOYMENT, parameters)
    return (handed_back(run_id, "merge_adapter", MergedModel),
            handed_back(run_id, "evaluate_tuned", Evaluation))


@task(name="evaluate_champion", cache_policy=CHAMPION_CACHE)
def evaluate_champion_on_gpu_pool(
    model_name: str,
    candidate: MergedModel,
    test: HeldoutSplit,
    template: PromptTemplate,
    cfg: EvalConfig,
    run_id: str,
) -> Evaluation | None:
    """The current champion (looked up here) answers the test sets on the gpu pool; None when
    there is no other champion, and then nothing is started."""
    champion = champion_to_compare(model_name, candidate, cfg, run_id)
    if champion is None:
        return None
    parameters = dumped(label="champion", champion=champion, test=test, template=template,
                        cfg=cfg, run_id=run_id)
    run_on_gpu_pool(EVALUATE_DEPLOYMENT, parameters)
    return handed_back(run_id, "evaluate_champion", Evaluation)


class ModelSteps(NamedTuple):
    """The steps that load the full model, with the same signatures wherever they run."""

    train: Task[..., Any]
    evaluate_base: Task[..., Any]
    merge: Task[..., Any]
    evaluate_champion: Task[..., Any]


IN_PROCESS = ModelSteps(train_adapter, evaluate_base, merge_adapter, evaluate_champion)
ON_GPU_POOL = ModelSteps(
    train_on_gpu_pool, evaluate_base_on_gpu_pool, merge_on_gpu_pool,
    evaluate_champion_on_gpu_pool,
)
