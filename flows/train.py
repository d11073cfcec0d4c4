"""The training step as its own flow, for the `train` deployment on the `gpu` work pool.

The pipeline (flows/finetune.py, running as a deployment) starts it with run_deployment and the
references it already has: the tokenized data's reference, the base model's ref and source,
the LoRA and train settings and its MLflow run id. This flow trains in that MLflow run (metrics
and the adapter land there) and tags the run with the adapter's reference, which is how the
pipeline reads it back. Several GPU workers can poll the pool; each takes one run at a time
(`prefect worker start --pool gpu --limit 1`, infra/worker.sh). Several GPUs of a machine,
or several machines, train one adapter together through torchrun (loraflow/distributed.py).
"""

from __future__ import annotations

from mlflow import MlflowClient
from prefect import flow

from loraflow.artifacts import Adapter, TokenizedData
from loraflow.base_model import BaseModelRef
from loraflow.config import LoraSettings, TrainConfig
from loraflow.credentials import check_mlflow
from loraflow.environment import configure
from tasks.deployments import ADAPTER_TAG
from tasks.model import prepare_base_model, train_adapter


class GpuCountError(ValueError):
    """The run asks for more GPUs than this worker's machine has."""


@flow(name="train")
def train(
    tokens: TokenizedData,
    base: BaseModelRef,
    base_source: str,
    lora: LoraSettings,
    train: TrainConfig,
    run_id: str,
    gpus_per_node: int = 1,
    nodes: int = 1,
) -> Adapter | None:
    """Train a LoRA adapter into MLflow run `run_id`; tag the run with the adapter's ref.

    gpus_per_node: engine processes on this machine, one a GPU (0: one process on CPU); more
    than one starts the engine under torchrun. nodes: machines training together; the
    pipeline starts one run of this flow per machine and each joins torchrun's rendezvous
    at train.rdzv_endpoint. Only the machine that holds rank 0 returns and tags the adapter."""
    configure()
    check_mlflow()  # this worker's MLflow credentials, before the model is loaded
    check_gpus(gpus_per_node)
    train = train.model_copy(update={"gpus_per_node": gpus_per_node, "nodes": nodes})
    if not base.path.is_dir():  # another machine: resolve the same source here, same bytes
        local = prepare_base_model(base_source)
        if local.sha256 != base.sha256:
            raise ValueError(
                f"model.base {base_source!r} resolves to different weights on this worker "
                f"(sha256 {local.sha256[:12]} vs {base.sha256[:12]} on the pipeline's "
                "machine); pin the source (a path or revision) both machines see alike"
            )
        base = local
    adapter = train_adapter(tokens=tokens, base=base, lora=lora, train=train, run_id=run_id)
    if adapter is not None:
        MlflowClient().set_tag(run_id, ADAPTER_TAG, adapter.model_dump_json())
    return adapter


def check_gpus(gpus_per_node: int) -> None:
    if gpus_per_node < 0:
        raise GpuCountError(f"train deployment parameter gpus_per_node={gpus_per_node}: "
                            "allowed are 0 (CPU) or the GPUs to use on each machine")
    if gpus_per_node >= 1:
        import torch

        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus_per_node > visible:
            raise GpuCountError(
                f"train deployment parameter gpus_per_node={gpus_per_node} but this worker "
                f"sees {visible} CUDA device(s); run the worker on a machine with that many "
                "GPUs (check CUDA_VISIBLE_DEVICES), lower gpus_per_node, or set gpus_per_node=0 "
                "for a CPU run"
            )
