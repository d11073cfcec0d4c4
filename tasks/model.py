"""Model tasks: resolve the base, train the adapter (engine as a subprocess), evaluate, merge."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.utilities.hashing import hash_objects

from loraflow import evaluate, merge, registry
from loraflow.artifacts import ArtifactRef
from loraflow.config import (
    LAUNCH_FIELDS,
    EvalConfig,
    LoraSettings,
    MergeConfig,
    TrainConfig,
    loraflow_home,
)
from loraflow.distributed import launch_command
from loraflow.lineage import (
    LINEAGE_FILE,
    adapter_manifest,
    code_version,
    sha256_json,
    sha256_tree,
)
from loraflow.model import BaseModelRef, load_tokenizer, resolve_base_model, source_location
from loraflow.prompts import PromptTemplate
from loraflow.train import (
    EXIT_DIVERGED,
    EXIT_HUNG,
    EXIT_OOM,
    EXIT_REFUSED,
    EngineConfig,
    halve_micro_batch,
)
from tasks.caching import CONTENT, fingerprint
from tasks.tracking import (
    fetch,
    log_dir,
    log_metric_records,
    log_metrics,
    log_model_package,
    log_params,
    package_path,
)


class TrainingError(RuntimeError):
    """The training engine failed; the message says where its output is."""


class TrainingOOM(TrainingError):
    """Out of memory: the next attempt halves the micro-batch (same effective batch)."""


class TrainingCrashed(TrainingError):
    """The engine died (killed, crashed): the next attempt resumes from its last checkpoint."""


class TrainingStopped(TrainingError):
    """The engine stopped itself (NaN, unrecovered loss spike, hang): never retried blindly."""


def retry_training(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except (TrainingOOM, TrainingCrashed):
        return True
    except BaseException:
        return False
    return False


def base_model_key(context: Any, parameters: dict[str, Any]) -> str:
    """The base model's bytes, not its name: a new GGUF or weight file means a new key."""
    return hash_objects(code_version(), fingerprint(source_location(parameters["source"])))


@task(cache_key_fn=base_model_key)
def prepare_base_model(source: str) -> BaseModelRef:
    """Resolve model.base to a local safetensors directory (GGUF is dequantised once)."""
    return resolve_base_model(source, loraflow_home() / "models")


@task(cache_policy=CONTENT, retries=2, retry_condition_fn=retry_training)
def train_adapter(
    tokens: ArtifactRef, base: BaseModelRef, lora: LoraSettings, train: TrainConfig, run_id: str
) -> ArtifactRef | None:
    """Run the training engine as its own process (torchrun for several GPUs or machines);
    relay its metrics; log the adapter. None on a machine that trained without rank 0."""
    # The run's identity leaves out where it runs: a retry or rerun on another GPU count
    # resumes the same run directory's checkpoints.
    key = sha256_json([tokens.sha256, base.sha256, lora.model_dump(),
                       train.model_dump(exclude=LAUNCH_FIELDS)])
    run_dir = loraflow_home() / "runs" / key[:16]
    run_dir.mkdir(parents=True, exist_ok=True)
    adapt = run_dir / "adapt.json"
    if adapt.is_file():  # an earlier attempt ran out of memory
        train = halve_micro_batch(train, json.loads(adapt.read_text())["halvings"])
    engine = EngineConfig(
        base_path=base.path, data_dir=fetch(tokens.uri), output_dir=run_dir, lora=lora, train=train
    )
    config_file = run_dir / "engine.json"
    config_file.write_text(engine.model_dump_json(indent=2))
    processes = max(train.gpus_per_node, 1)  # 0 GPUs: one process on CPU
    command = launch_command(
        ["--config", str(config_file)], processes, train.nodes, train.rdzv_endpoint, key[:16]
    )
    result = run_engine(command, run_dir, run_id)
    if result is None:  # a machine without rank 0: the adapter is on rank 0's machine
        return None
    log_params(run_id, {"train.run_dir": run_dir})  # rank 0's machine (a failure names it)

    adapter_dir = run_dir / "adapter"
    # The lineage manifest (issue 5): every later load checks it against its base.
    lineage = adapter_manifest(
        base.path,
        base.name,
        base.sha256,
        lora=lora.model_dump(),
        train=train.model_dump(),
        data_sha256=tokens.meta["data_sha256"],
        template=tokens.meta["template"],
        chat_template=load_tokenizer(base.path).chat_template,
        base_quantization={"nf4": "4bit", "int8": "8bit"}.get(train.precision, "none"),
    ) | {"tokenize": tokens.meta["settings"]}
    (adapter_dir / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2, sort_keys=True))
    uri = log_dir(run_id, adapter_dir, "adapter")
    log_metrics(run_id, {f"train.{k}": v for k, v in result.items()})
    return ArtifactRef(uri=uri, sha256=sha256_tree(adapter_dir), meta=result)


def run_engine(command: list[str], run_dir: Path, run_id: str) -> dict[str, Any] | None:
    """Start the engine (`python -m loraflow.train`, or torchrun over it), relay metrics.jsonl
    to MLflow every few seconds; turn how it ended into an error that says whether a retry
    can help."""
    (run_dir / "result.json").unlink(missing_ok=True)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    while True:
        finished = process.poll() is not None
        relay_metrics(run_dir, run_id)
        if finished:
            break
        time.sleep(2.0)
    if process.returncode == 0:  # rank 0 writes the result; other machines have none
        result = run_dir / "result.json"
        return json.loads(result.read_text()) if result.is_file() else None
    failure = first_failure(run_dir)
    # torchrun exits 1 whatever its workers did: the ranks' failure files say what happened.
    code = EXIT_CODES.get(failure.get("kind"), process.returncode)
    where = f"(config, metrics and checkpoints in {run_dir})"
    if code == EXIT_OOM:
        adapt = run_dir / "adapt.json"
        halvings = json.loads(adapt.read_text())["halvings"] + 1 if adapt.is_file() else 1
        adapt.write_text(json.dumps({"halvings": halvings}))
        raise TrainingOOM(f"{failure.get('message', 'out of memory')} {where}")
    if code in (EXIT_DIVERGED, EXIT_HUNG, EXIT_REFUSED):
        raise TrainingStopped(f"{failure.get('message', 'training stopped')} {where}")
    raise TrainingCrashed(
        f"the training engine exited with code {process.returncode}; its "
        f"output is above {where}; a retry resumes from the last checkpoint"
    )


EXIT_CODES = {"oom": EXIT_OOM, "diverged": EXIT_DIVERGED, "hung": EXIT_HUNG,
              "preflight": EXIT_REFUSED}


def first_failure(run_dir: Path) -> dict[str, Any]:
    """The failure report that explains the run's end: with several ranks, an OOM (which a
    retry can fix) before a hang or divergence, and rank 0's before the others'."""
    reports = [json.loads(p.read_text()) for p in sorted(run_dir.glob("failure*.json"))]
    order = list(EXIT_CODES)
    reports.sort(key=lambda r: (order.index(r["kind"]) if r.get("kind") in order else 9,
                                r.get("rank", 0)))
    return reports[0] if reports else {}


def relay_metrics(run_dir: Path, run_id: str) -> None:
    """Send the steps not relayed yet to MLflow in one batch. The last relayed step is kept
    in the run directory: a resumed attempt repeats steps after its checkpoint, and MLflow
    keeps the first value of each step rather than two (per MLflow run)."""
    metrics_file, mark = run_dir / "metrics.jsonl", run_dir / "relayed.json"
    if not metrics_file.is_file():
        return
    seen = json.loads(mark.read_text()) if mark.is_file() else {}
    done = seen["step"] if seen.get("run_id") == run_id else 0
    records = [r for r in map(json.loads, (line for line in metrics_file.read_text()
                                           .splitlines() if line.endswith("}")))
               if r["step"] > done]
    if records:
        log_metric_records(run_id, records, prefix="train.")
        mark.write_text(json.dumps({"run_id": run_id, "step": max(r["step"] for r in records)}))


@task(cache_policy=CONTENT)
def evaluate_model(
    model: BaseModelRef | ArtifactRef,
    adapter: ArtifactRef | None,
    data: ArtifactRef,
    template: PromptTemplate,
    cfg: EvalConfig,
    run_id: str,
    label: str | None = None,
) -> ArtifactRef:
    """Answer every test set; log metrics and every scored answer under eval/<label>/.

    `model` is the base model, or a registered model's artifacts (the champion)."""
    label = label or ("base" if adapter is None else "tuned")
    path = model.path if isinstance(model, BaseModelRef) else fetch(model.uri)
    source = evaluate.ModelSource(path=path, adapter=fetch(adapter.uri) if adapter else None)
    sets = evaluate.load_sets(cfg, fetch(data.uri) / "test.jsonl")
    result = evaluate.evaluate(source, sets, template, cfg, label=label)
    log_metrics(run_id, {f"{label}.{k}": v for k, v in result.metrics.items()})
    with tempfile.TemporaryDirectory() as tmp:
        out = evaluate.write_result(result, Path(tmp) / label)
        sha256 = sha256_tree(out)
        uri = log_dir(run_id, out, f"eval/{label}")
    return ArtifactRef(uri=uri, sha256=sha256, meta={"label": label, "metrics": result.metrics})


evaluate_base = evaluate_model.with_options(name="evaluate_base")
evaluate_tuned = evaluate_model.with_options(name="evaluate_tuned")


@task(cache_policy=CONTENT)
def merge_adapter(
    base: BaseModelRef, adapter: ArtifactRef, cfg: MergeConfig, run_id: str
) -> ArtifactRef:
    """Check lineage, fold the adapter into the base, check greedy answers; log the merged
    model once, as an MLflow pyfunc model (READY only when every file is stored)."""
    adapter_dir = fetch(adapter.uri)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        report = merge.merge_adapter(
            base.path,
            adapter_dir,
            out,
            cfg.dtype,
            cfg.check_prompts,
            cfg.check_new_tokens,
            lineage_extra={"adapter_sha256": adapter.sha256, "merged_dtype": cfg.dtype},
        )
        sha256 = sha256_tree(out)
        package = registry.package_model(out, adapter_dir, Path(tmp) / "pyfunc")
        model_id, location = log_model_package(run_id, package)
        # The merged model's own files inside the pyfunc model: what push uploads.
        uri = f"{location}/{package_path(package, 'model')}"
    check = report.check
    log_params(run_id, {"merge.note": report.note, "merge.device": report.device})
    log_metrics(
        run_id,
        {
            "merge.check_prompts": check.prompts,
            "merge.check_identical": check.identical_outputs,
            "merge.check_max_logit_diff": check.max_logit_diff,
        },
    )
    meta = {"dtype": cfg.dtype, "model_id": model_id} | report.model_dump()
    return ArtifactRef(uri=uri, sha256=sha256, meta=meta)
