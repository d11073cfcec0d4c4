"""Model tasks: resolve the base, train the adapter (the engine, launched and supervised by
loraflow.engine.launch), evaluate, merge. The steps that load the full model take their typed
request and where to run: here, or on the gpu work pool (tasks/deployments.py)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from prefect import task
from prefect.utilities.hashing import hash_objects

from loraflow.artifacts import (
    Adapter,
    Champion,
    EvaluateRequest,
    Evaluation,
    MergedModel,
    MergeRequest,
    MergeResult,
    TrainRequest,
)
from loraflow.base_model import BaseModelRef, resolve_base_model, source_location
from loraflow.config import TrainConfig, loraflow_home
from loraflow.engine import launch as engine_launch
from loraflow.engine import ray_job
from loraflow.engine.checkpoints import latest_checkpoint
from loraflow.engine.config import EngineConfig
from loraflow.engine.launch import TrainingCrashed, TrainingOOM, after_oom
from loraflow.evaluation import evaluate
from loraflow.hashing import code_version, sha256_tree
from loraflow.release import merge, registry
from loraflow.release.lineage import adapter_lineage
from loraflow.search import TrialRef, report_progress
from tasks.caching import CONTENT, fingerprint
from tasks.deployments import (
    CRASH_ATTEMPTS,
    EVALUATE_DEPLOYMENT,
    MERGE_DEPLOYMENT,
    TRAIN_DEPLOYMENT,
    Where,
    on_gpu_pool,
)
from tasks.tracking import (
    fetch,
    fetch_verified,
    log_dir,
    log_metric_records,
    log_metrics,
    log_model_package,
    log_params,
    package_path,
)


def retry_training(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except (TrainingOOM, TrainingCrashed):
        return True
    except BaseException:
        return False
    return False


def base_model_key(context: Any, parameters: dict[str, Any]) -> str:
    """The base model's bytes: a new GGUF or weight file means a new key. The configured
    source counts too, since the reference carries it (the adapter names its base by it)."""
    source = parameters["source"]
    return hash_objects(code_version(), source, fingerprint(source_location(source)))


@task(cache_key_fn=base_model_key)
def prepare_base_model(source: str) -> BaseModelRef:
    """Resolve model.base to a local safetensors directory (GGUF is dequantised once)."""
    return resolve_base_model(source, loraflow_home() / "models")


def base_on_this_machine(base: BaseModelRef) -> BaseModelRef:
    """The base model on the machine a step runs on: the pipeline's directory when it is here,
    else model.base resolved here (a gpu worker), which must give the same bytes."""
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


@task(cache_policy=CONTENT, retries=2, retry_condition_fn=retry_training)
def train_adapter(
    request: TrainRequest, run_id: str, where: Where = "here", share_checkpoints: bool = False,
    trial: TrialRef | None = None,
) -> Adapter | None:
    """Run the training engine as its own process (torchrun for several GPUs or machines);
    relay its metrics; log the adapter. None on a machine that trained without rank 0. On the
    gpu pool: one run of the `train` deployment a machine (launch.nodes), or one run that
    submits the training to a Ray cluster (launch.backend=ray).

    share_checkpoints: also upload each new checkpoint to the MLflow run, and start from the
    one found there when this machine has none: a run retried on another worker after its
    machine died resumes instead of starting over (the train deployment sets it).

    trial: a sweep's trial, told each validation loss as it comes; its pruner may stop the
    engine (optuna.TrialPruned). On the gpu pool the trial is told the curve afterwards
    (flows/sweep.py): the engine runs on another machine and is not stopped early."""
    if where == "gpu_pool":
        # torchrun: one run a machine, meeting at the rendezvous; ray: one run submits the job
        machines = request.launch.nodes if request.launch.backend == "torchrun" else 1
        return on_gpu_pool(TRAIN_DEPLOYMENT, request, run_id, Adapter, copies=machines,
                           crash_attempts=CRASH_ATTEMPTS)
    tokens, lora, launch = request.tokens, request.lora, request.launch
    base = base_on_this_machine(request.base)
    key = request.run_key()  # leaves out where it runs: another GPU count resumes the run
    run_dir = loraflow_home() / "runs" / key
    run_dir.mkdir(parents=True, exist_ok=True)
    train = after_oom(request.train, run_dir)
    engine = EngineConfig(base_path=base.path, base_source=base.source,
                          data_dir=fetch_verified(tokens, "tokenized data"), output_dir=run_dir,
                          lora=lora, train=train, launch=launch)
    if share_checkpoints:
        restore_shared_checkpoint(run_dir, run_id)
    # the align stage's engine metrics apart from the SFT run's
    prefix = "train." if train.objective == "sft" else "align.train."

    def relay(records: list[dict[str, Any]]) -> None:
        log_metric_records(run_id, records, prefix=prefix)
        if trial is not None:
            report_progress(trial, records)

    start = ray_job.launch_on_ray if launch.backend == "ray" else engine_launch.launch
    result = start(engine, key, run_id, relay,
                   (lambda: share_checkpoint(run_dir, run_id)) if share_checkpoints else None)
    if result is None:  # a machine without rank 0: the adapter is on rank 0's machine
        return None
    # What the engine trained with (preflight's micro-batch, epochs as steps, ...); the run
    # directory stays keyed on the config asked for, so a rerun finds this run again.
    trained = TrainConfig.model_validate(result.pop("config"))
    log_params(run_id, {f"{prefix}run_dir": run_dir})  # rank 0's machine (a failure names it)

    adapter_dir = run_dir / "adapter"
    # The lineage manifest (issue 5): every later load checks it against its base.
    lineage = adapter_lineage(
        base,
        lora=lora,
        train=trained,
        data_sha256=tokens.data_sha256,
        template=tokens.template,
        tokenize=tokens.report.settings,
        aligned_on=request.aligned_on,
    )
    lineage.write(adapter_dir)
    uri = log_dir(run_id, adapter_dir, "adapter")
    log_metrics(run_id, {f"{prefix}{k}": v for k, v in result.items()})
    return Adapter(uri=uri, sha256=sha256_tree(adapter_dir), result=result, trained=trained)


SHARED_CHECKPOINTS = "train/checkpoints"  # in the MLflow run: step-N/ and latest.json


def share_checkpoint(run_dir: Path, run_id: str) -> None:
    """Upload the engine's newest checkpoint to the MLflow run once, then latest.json naming
    it: a checkpoint is only ever named after all its files are stored."""
    latest = latest_checkpoint(run_dir / "checkpoints")
    mark = run_dir / "shared.json"
    shared = json.loads(mark.read_text()) if mark.is_file() else {}
    if latest is None or shared == {"run_id": run_id, "name": latest.name}:
        return
    try:
        log_dir(run_id, latest, f"{SHARED_CHECKPOINTS}/{latest.name}")
    except FileNotFoundError:  # the engine's retention removed it mid-upload: a newer one exists
        return
    with tempfile.TemporaryDirectory() as tmp:
        pointer = Path(tmp) / "latest.json"
        pointer.write_text(json.dumps({"name": latest.name}))
        MlflowClient().log_artifact(run_id, str(pointer), SHARED_CHECKPOINTS)
    mark.write_text(json.dumps({"run_id": run_id, "name": latest.name}))


def restore_shared_checkpoint(run_dir: Path, run_id: str) -> Path | None:
    """With no checkpoint of its own, put the MLflow run's shared one (if any) where the engine
    resumes from it; its path, or None."""
    if latest_checkpoint(run_dir / "checkpoints") is not None:
        return None  # this machine's own is at least as new
    client = MlflowClient()
    if not any(a.path.endswith("latest.json") for a in client.list_artifacts(run_id,
                                                                            SHARED_CHECKPOINTS)):
        return None
    pointer = fetch(f"{client.get_run(run_id).info.artifact_uri}/{SHARED_CHECKPOINTS}/latest.json")
    name = json.loads(pointer.read_text())["name"]
    source = fetch(f"{client.get_run(run_id).info.artifact_uri}/{SHARED_CHECKPOINTS}/{name}")
    target = run_dir / "checkpoints" / name
    staging = target.with_name(f".{name}.partial")  # not step-*: never taken for a checkpoint
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    staging.rename(target)
    print(f"loraflow: resuming from checkpoint {name}, shared by an earlier attempt", flush=True)
    return target


@task(cache_policy=CONTENT)
def evaluate_model(request: EvaluateRequest, run_id: str, where: Where = "here") -> Evaluation:
    """Answer every test set; log metrics and every scored answer under eval/<label>/. On the
    gpu pool: a run of the `evaluate` deployment.

    The model is the base, or a registered model's files (the champion); the request holds the
    held-out split alone: the cache key holds what is read, not the training data."""
    if where == "gpu_pool":
        return on_gpu_pool(EVALUATE_DEPLOYMENT, request, run_id, Evaluation)
    model, template, cfg, label = request.model, request.template, request.cfg, request.label
    path = fetch(model.uri) if isinstance(model, Champion) else base_on_this_machine(model).path
    source = evaluate.ModelSource(path=path)
    sets = evaluate.load_sets(cfg, fetch(request.test.uri) / "test.jsonl")
    result = evaluate.evaluate(source, sets, template, cfg, label=label)
    return log_evaluation(result, run_id)


def log_evaluation(
    result: evaluate.EvalResult, run_id: str, extra: dict[str, str] | None = None
) -> Evaluation:
    """Metrics as <label>.<metric>, the dtype and device it answered in as params, every answer
    (and `extra` files) under eval/<label>/."""
    label = result.label
    log_params(run_id, {f"{label}.dtype": result.dtype, f"{label}.device": result.device})
    log_metrics(run_id, {f"{label}.{k}": v for k, v in result.metrics.items()})
    with tempfile.TemporaryDirectory() as tmp:
        out = evaluate.write_result(result, Path(tmp) / label)
        for name, text in (extra or {}).items():
            (out / name).write_text(text)
        sha256 = sha256_tree(out)
        uri = log_dir(run_id, out, f"eval/{label}")
    return Evaluation(uri=uri, sha256=sha256, label=label, metrics=result.metrics)


evaluate_base = evaluate_model.with_options(name="evaluate_base")


@task(cache_policy=CONTENT)
def merge_adapter(request: MergeRequest, run_id: str, where: Where = "here") -> MergeResult:
    """Check lineage; base + adapter answer the test sets; fold the adapter in; the merged
    model answers them in its serving dtype (the tuned score the gate reads); log the merged
    model once, as an MLflow pyfunc model (READY only when every file is stored). On the gpu
    pool: a run of the `merge` deployment.

    Returns the merged model and its evaluation (label tuned, parity.json beside it)."""
    if where == "gpu_pool":
        return on_gpu_pool(MERGE_DEPLOYMENT, request, run_id, MergeResult)
    adapter, template, eval_cfg, cfg = (request.adapter, request.template, request.eval_cfg,
                                        request.cfg)
    base = base_on_this_machine(request.base)
    adapter_dir = fetch_verified(adapter, "adapter")
    sets = evaluate.load_sets(eval_cfg, fetch(request.test.uri) / "test.jsonl")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        report, tuned, reference = merge.merge_and_evaluate(
            base.path,
            adapter_dir,
            out,
            sets,
            template,
            eval_cfg,
            cfg.dtype,
            cfg.max_differing,
            lineage_extra={"adapter_sha256": adapter.sha256, "merged_dtype": cfg.dtype},
            onto=cfg.onto,
        )
        sha256 = sha256_tree(out)
        package = registry.package_model(out, adapter_dir, Path(tmp) / "pyfunc")
        model_id, location = log_model_package(run_id, package)
        # The merged model's own files inside the pyfunc model: what push uploads.
        uri = f"{location}/{package_path(package, 'model')}"
    parity = report.parity
    assert parity is not None  # merge_and_evaluate always sets it
    log_params(run_id, {"merge.note": report.note, "merge.device": report.device,
                        "merge.reference_dtype": parity.reference_dtype})
    log_metrics(run_id, {"merge.answers": parity.answers,
                         "merge.answers_differing": parity.differing})
    log_evaluation(reference, run_id)  # eval/adapter: base + adapter, the parity reference
    tuned_eval = log_evaluation(tuned, run_id, {"parity.json": parity.model_dump_json(indent=2)})
    model = MergedModel(uri=uri, sha256=sha256, model_id=model_id, dtype=cfg.dtype,
                        device=report.device, note=report.note)
    return MergeResult(model=model, evaluation=tuned_eval)
