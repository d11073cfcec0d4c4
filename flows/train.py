"""The training step as its own flow, for the `train` deployment on the `gpu` work pool.

The pipeline (flows/finetune.py, running as a deployment) starts it with run_deployment and the
references it already has: the tokenized data's ArtifactRef, the base model's ref and source,
the LoRA and train settings and its MLflow run id. This flow trains in that MLflow run (metrics
and the adapter land there) and tags the run with the adapter's ArtifactRef, which is how the
pipeline reads it back. Several GPU workers can poll the pool; each takes one run at a time
(`prefect worker start --pool gpu --limit 1`, infra/workers.sh).
"""

from __future__ import annotations

from mlflow import MlflowClient
from prefect import flow

from loraflow.artifacts import ArtifactRef
from loraflow.config import LoraSettings, TrainConfig
from loraflow.environment import configure
from loraflow.model import BaseModelRef
from tasks.deployments import ADAPTER_TAG
from tasks.model import prepare_base_model, train_adapter


class GpuCountError(ValueError):
    """The run asks for more GPUs than this worker's machine has, or for several at once."""


@flow(name="train")
def train(
    tokens: ArtifactRef,
    base: BaseModelRef,
    base_source: str,
    lora: LoraSettings,
    train: TrainConfig,
    run_id: str,
    gpus: int = 1,
) -> ArtifactRef:
    """Train a LoRA adapter into MLflow run `run_id`; tag the run with the adapter's ref.

    gpus: GPUs this run needs (0: CPU). The engine is one process today (`python -m
    loraflow.train`); several GPUs need it started under `torchrun --nproc-per-node N`, which it
    does not support yet, so gpus > 1 is refused rather than silently using one."""
    configure()
    check_gpus(gpus)
    if not base.path.is_dir():  # another machine: resolve the same source here, same bytes
        local = prepare_base_model(base_source)
        if local.sha256 != base.sha256:
            raise ValueError(
                f"model.base {base_source!r} resolves to different weights on this worker "
                f"(sha256 {local.sha256[:12]} vs {base.sha256[:12]} on the pipeline's "
                "machine); pin the source (a path or revision) both machines see alike"
            )
        base = local
    adapter = train_adapter(tokens, base, lora, train, run_id=run_id)
    MlflowClient().set_tag(run_id, ADAPTER_TAG, adapter.model_dump_json())
    return adapter


def check_gpus(gpus: int) -> None:
    if gpus < 0 or gpus > 1:
        raise GpuCountError(
            f"train deployment parameter gpus={gpus}: allowed are 0 (CPU) and 1; the engine "
            "runs as one process (multi-GPU via torchrun is not implemented in loraflow.train)"
        )
    if gpus == 1:
        import torch

        if not torch.cuda.is_available():
            raise GpuCountError(
                "train deployment parameter gpus=1 but this worker sees no CUDA device; run "
                "the worker on a GPU machine or set gpus=0 for a CPU run"
            )
