"""The pipeline as a deployment: remember which data a model was trained on (and skip data
already trained on), and run a step that loads the full model on the `gpu` work pool.

The pipeline runs on the `cpu` pool. Each GPU step is one task (train_adapter, evaluate_base,
merge_adapter, evaluate_champion) that takes its typed request (loraflow.artifacts), the
pipeline's MLflow run id and where it runs: "here" does the work in this process; "gpu_pool"
hands the request to the step's deployment (flows/train.py, flows/evaluate.py,
flows/merge.py) through `on_gpu_pool` below, and that flow calls the same task "here". The
flow works in the pipeline's MLflow run and tags it with its result (loraflow.step.<step>,
the result's JSON), which is how `on_gpu_pool` reads it back (not through Prefect results,
which both sides would need a shared result store for). A task's cache key leaves out where
it runs, so a re-run with nothing changed starts no child run at all.

After training, the GPU steps fetch the adapter from the MLflow run (rank 0 logged it there)
on whichever gpu worker takes them: a LoRA adapter is megabytes, any GPU machine can serve the
next step, and a run never waits for one particular machine.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Literal, TypeVar
from uuid import UUID

from mlflow import MlflowClient
from prefect import get_run_logger
from prefect.states import Completed, State
from pydantic import BaseModel

from loraflow.artifacts import EvaluateRequest, MergeRequest, TrainRequest, ValidatedData

Where = Literal["here", "gpu_pool"]  # a GPU step in this process, or on the gpu work pool
StepRequest = TrainRequest | EvaluateRequest | MergeRequest
Result = TypeVar("Result", bound=BaseModel)

DATA_TAG = "loraflow.data_sha256"  # the validated data a pipeline run trained on
MODEL_TAG = "loraflow.model_name"  # the registered model it was for
SKIPPED_TAG = "loraflow.skipped"  # why a run stopped early
CLAIM_PREFIX = "loraflow-trains-"  # + key + "-" + n: a Prefect variable, one run's claim
STEP_TAG = "loraflow.step."  # + step: a GPU step's result (JSON), set by its deployment's flow
TRAIN_DEPLOYMENT = "train/train"
EVALUATE_DEPLOYMENT = "evaluate/evaluate"
MERGE_DEPLOYMENT = "merge/merge"
CRASH_ATTEMPTS = 3  # training runs started when the previous one crashed (a worker died)


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


def claim_data(data: ValidatedData, model_name: str, run_id: str) -> str | None:
    """Claim training `model_name` on this data for this flow run, atomically; return None
    when this run holds the claim (it trains), else what holds it (this run skips).

    Two watchers, an event sent again after a Prefect server restart, or the same bytes
    landing under two names all start runs on one content, at the same moment or while the
    first still trains; record_trained_data only sees runs that finished. The claim is a
    Prefect variable, created only if absent (the server's unique name: one creator wins,
    in its database, across restarts). A claim whose flow run ended other than Completed
    (failed, crashed, cancelled) or is gone is stale: the next claim takes the next number."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import VariableCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.runtime import flow_run

    key = hashlib.sha256(f"{model_name}\0{data.sha256}".encode()).hexdigest()[:32]
    mine = {"flow_run": str(flow_run.id), "mlflow_run": run_id, "model": model_name,
            "data_sha256": data.sha256}
    with get_client(sync_client=True) as client:
        while True:
            claims = client.request("POST", "/variables/filter", json={
                "variables": {"name": {"like_": CLAIM_PREFIX + key}}}).json()
            latest = max(claims, key=lambda c: int(c["name"].rsplit("-", 1)[1]), default=None)
            number = 0
            if latest is not None:
                holder = latest["value"]
                if holder["flow_run"] == mine["flow_run"]:
                    return None  # ours: this run's own claim, answered late and retried
                try:
                    state = client.read_flow_run(UUID(holder["flow_run"])).state
                except ObjectNotFound:
                    state = None
                if state is not None and (not state.is_final() or state.is_completed()):
                    word = "trained on" if state.is_completed() else "being trained on"
                    return (f"{word} by flow run {holder['flow_run']} (MLflow run "
                            f"{holder['mlflow_run']})")
                number = int(latest["name"].rsplit("-", 1)[1]) + 1  # stale: take the next
            try:
                client.create_variable(VariableCreate(name=f"{CLAIM_PREFIX}{key}-{number}",
                                                      value=mine, tags=["loraflow"]))
                return None
            except ObjectAlreadyExists:
                continue  # another run claimed it first: read who


def skip_run(run_id: str, name: str, data: ValidatedData, held: str) -> State:
    """End early: tag the MLflow run with the reason, log it to the flow run (Prefect UI), and
    end in a Completed state named Skipped whose result is the (short) summary. held: which
    run trained on the data or holds its claim ("trained on by run <id>", claim_data's)."""
    reason = f"skipped: data already {held} (sha256 {data.sha256[:12]})"
    MlflowClient().set_tag(run_id, SKIPPED_TAG, reason)
    get_run_logger().info("loraflow: %s", reason)
    summary = {"run_id": run_id, "model_name": name, "skipped": reason,
               "data_sha256": data.sha256}
    return Completed(name="Skipped", message=reason, data=summary)


def on_gpu_pool(
    deployment: str, request: StepRequest, run_id: str, returns: type[Result],
    copies: int = 1, crash_attempts: int = 1,
) -> Result:
    """Run the step's gpu-pool deployment on `request` and return the result its flow handed
    back; raise, quoting the run's own error, unless it completed. `copies` > 1 starts that
    many runs at once (one per machine of a multi-machine training, which meet at a
    rendezvous: all must start before any ends); a crashed attempt (a worker died) is started
    again up to `crash_attempts` times."""
    from prefect.deployments import run_deployment

    for attempt in range(1, crash_attempts + 1):
        # One run a machine; they meet at a rendezvous, so all must start before any can
        # finish: start them all (timeout=0), then wait for each.
        started = [run_deployment(deployment, parameters=parameters(request, run_id),
                                  as_subflow=True, timeout=0) for _ in range(copies)]
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
    return handed_back(run_id, request, returns)


def parameters(request: StepRequest, run_id: str) -> dict[str, Any]:
    """What a GPU step's deployment is started with: the request (JSON-ready) and the run id.
    The train deployment's own gpus_per_node is left alone: launch.gpus_per_node goes inside
    the request, and the train flow takes whichever of the two is set."""
    return {"request": request.model_dump(mode="json"), "run_id": run_id}


def hand_back(run_id: str, request: StepRequest, result: BaseModel) -> None:
    """Tag the pipeline's MLflow run with a GPU step's result, for the pipeline to read."""
    MlflowClient().set_tag(run_id, STEP_TAG + request.step, result.model_dump_json())


def handed_back(run_id: str, request: StepRequest, returns: type[Result]) -> Result:
    """The result a GPU step's flow tagged the pipeline's MLflow run with."""
    tags = MlflowClient().get_run(run_id).data.tags
    if STEP_TAG + request.step not in tags:
        raise RemoteStepError(
            f"the {request.step} flow run completed but MLflow run {run_id} has no "
            f"{STEP_TAG}{request.step} tag; the gpu worker must use the same "
            "MLFLOW_TRACKING_URI as the pipeline"
        )
    return returns.model_validate_json(tags[STEP_TAG + request.step])


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


IN_FLIGHT = ("PENDING", "RUNNING", "CANCELLING")  # a worker (or a process) is on it


def runs_in_flight() -> list[Any]:
    """The Prefect server's flow runs that some process is working on now: pipelines, their
    GPU steps and `loraflow run`s in process against the server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    in_flight = FlowRunFilter(state=FlowRunFilterState(
        type=FlowRunFilterStateType(any_=[StateType(kind) for kind in IN_FLIGHT])))
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=in_flight)


def wait_for_runs_in_flight(timeout_s: float, poll_s: float = 5.0, report_s: float = 60.0,
                            say: Any = print) -> list[Any]:
    """Wait until no flow run is in flight, up to timeout_s; what is still in flight then.
    Says which runs it waits for when it starts, and again every report_s (infra/stop.sh calls
    this before it stops the workers, whose SIGTERM would cut a training off)."""
    start = last_said = time.monotonic()
    left = runs_in_flight()
    if left:
        say(f"waiting up to {timeout_s:g} s for {_listed(left)} to finish (Ctrl-C stops waiting)")
    while left and time.monotonic() - start < timeout_s:
        time.sleep(poll_s)
        left = runs_in_flight()
        if left and time.monotonic() - last_said >= report_s:
            say(f"{time.monotonic() - start:.0f} s: still in flight: {_listed(left)}")
            last_said = time.monotonic()
    return left


def _listed(runs: list[Any]) -> str:
    names = ", ".join(f"{run.name} ({run.state.name})" for run in runs)
    return f"{len(runs)} flow run{'s' if len(runs) > 1 else ''}: {names}"
