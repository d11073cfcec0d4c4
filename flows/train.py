"""The training step as its own flow, for the `train` deployment on the `gpu` work pool.

The pipeline (flows/finetune.py, running as a deployment) starts it with run_deployment, the
TrainRequest (the tokenized data's reference, the base model's with its source, the LoRA,
train and launch settings) and its MLflow run id. This flow runs train_adapter here, in that
MLflow run (metrics and the adapter land there), and hands the adapter back through the run's
tag loraflow.step.train_adapter (tasks/deployments.py). Several GPU workers can poll the pool;
each takes one run at a time (`prefect worker start --pool gpu --limit 1`, infra/worker.sh).
Several GPUs of a machine, or several machines (launch.nodes), train one adapter together
through torchrun (loraflow/engine/distributed.py).
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from loraflow.artifacts import Adapter, TrainRequest
from loraflow.credentials import check_mlflow
from loraflow.environment import configure
from tasks.deployments import hand_back
from tasks.model import train_adapter


class GpuCountError(ValueError):
    """The run asks for more GPUs than this worker's machine has, or two settings disagree."""


@flow(name="train", log_prints=True)
def train(request: TrainRequest, run_id: str, gpus_per_node: int | None = None) -> Adapter | None:
    """Train a LoRA adapter into MLflow run `run_id`; hand the adapter back through the run.

    gpus_per_node (this deployment's parameter) and launch.gpus_per_node (the pipeline's
    config) are one setting: whichever is set counts (both set, they must agree); neither:
    1 if this worker sees a GPU, else 0 (one process on CPU). More than one starts the engine
    under torchrun. With launch.nodes > 1 the pipeline starts one run of this flow per machine
    and each joins torchrun's rendezvous at launch.rdzv_endpoint; only the machine that holds
    rank 0 returns and hands back the adapter. With launch.backend=ray this one run submits
    the training to the Ray cluster (launch.ray_address; its machines, not this worker's
    GPUs, train) and hands back the adapter."""
    configure()
    check_mlflow()  # this worker's MLflow credentials, before the model is loaded
    launch = request.launch
    if launch.backend == "ray":  # the cluster's machines train; this one submits and relays
        get_run_logger().info("training on the Ray cluster at %s, %d machine(s)",
                              launch.ray_address, launch.nodes)
        here = request
    else:
        gpus = resolve_gpus(launch.gpus_per_node, gpus_per_node)
        get_run_logger().info("training on %s GPU(s) a machine, %d machine(s)", gpus,
                              launch.nodes)
        here = request.model_copy(
            update={"launch": launch.model_copy(update={"gpus_per_node": gpus})})
    adapter = train_adapter(request=here, run_id=run_id, share_checkpoints=True)
    if adapter is not None:
        hand_back(run_id, request, adapter)
    return adapter


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_gpus(pipeline: int | None, deployment: int | None) -> int:
    """The GPUs a machine trains on: launch.gpus_per_node or the deployment's gpus_per_node,
    whichever is set, else 1 when this worker sees a GPU and 0 (CPU) when it does not."""
    if pipeline is not None and deployment is not None and pipeline != deployment:
        raise GpuCountError(
            f"launch.gpus_per_node={pipeline} in the pipeline's config but the train "
            f"deployment's parameter gpus_per_node={deployment}; set one of them (or both "
            "alike): the config for this run, the deployment for every run on its workers"
        )
    chosen = pipeline if pipeline is not None else deployment
    if chosen is None:
        return min(visible_gpus(), 1)
    check_gpus(chosen)
    return chosen


def check_gpus(gpus_per_node: int) -> None:
    if gpus_per_node < 0:
        raise GpuCountError(f"gpus_per_node={gpus_per_node}: allowed are 0 (CPU) or the GPUs "
                            "to use on each machine")
    if gpus_per_node >= 1:
        visible = visible_gpus()
        if gpus_per_node > visible:
            raise GpuCountError(
                f"gpus_per_node={gpus_per_node} but this worker sees {visible} CUDA device(s); "
                "run the worker on a machine with that many GPUs (check "
                "CUDA_VISIBLE_DEVICES), lower gpus_per_node, or set gpus_per_node=0 for a CPU "
                "run (launch.gpus_per_node in the config, or the train deployment's parameter)"
            )
