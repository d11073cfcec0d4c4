"""Model tasks: resolve the base, train the adapter (the engine, launched and supervised by
loraflow.engine.launch), evaluate, merge."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from prefect import task
from prefect.utilities.hashing import hash_objects

from loraflow.artifacts import (
    Adapter,
    Champion,
    Evaluation,
    MergedModel,
    TokenizedData,
    ValidatedData,
)
from loraflow.base_model import BaseModelRef, load_tokenizer, resolve_base_model, source_location
from loraflow.config import (
    LAUNCH_FIELDS,
    EvalConfig,
    LoraSettings,
    MergeConfig,
    TrainConfig,
    loraflow_home,
)
from loraflow.data.prompts import PromptTemplate
from loraflow.engine.config import EngineConfig
from loraflow.engine.launch import TrainingCrashed, TrainingOOM, after_oom, launch
from loraflow.evaluation import evaluate
from loraflow.hashing import code_version, sha256_json, sha256_tree
from loraflow.release import merge, registry
from loraflow.release.lineage import LINEAGE_FILE, adapter_manifest
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
    tokens: TokenizedData, base: BaseModelRef, lora: LoraSettings, train: TrainConfig, run_id: str,
    lineage_extra: dict[str, Any] | None = None,
) -> Adapter | None:
    """Run the training engine as its own process (torchrun for several GPUs or machines);
    relay its metrics; log the adapter. None on a machine that trained without rank 0.

    lineage_extra: more fields for the adapter's lineage manifest (the align stage: its SFT
    parent and preference data)."""
    # The run's identity leaves out where it runs: a retry or rerun on another GPU count
    # resumes the same run directory's checkpoints.
    key = sha256_json([tokens.sha256, base.sha256, lora.model_dump(),
                       train.model_dump(exclude=LAUNCH_FIELDS)])
    run_dir = loraflow_home() / "runs" / key[:16]
    run_dir.mkdir(parents=True, exist_ok=True)
    train = after_oom(train, run_dir)
    engine = EngineConfig(base_path=base.path, base_source=base.source, data_dir=fetch(tokens.uri),
                          output_dir=run_dir, lora=lora, train=train)
    # the align stage's engine metrics apart from the SFT run's
    prefix = "train." if train.objective == "sft" else "align.train."
    result = launch(engine, key[:16], run_id,
                    lambda records: log_metric_records(run_id, records, prefix=prefix))
    if result is None:  # a machine without rank 0: the adapter is on rank 0's machine
        return None
    log_params(run_id, {f"{prefix}run_dir": run_dir})  # rank 0's machine (a failure names it)

    adapter_dir = run_dir / "adapter"
    # The lineage manifest (issue 5): every later load checks it against its base.
    lineage = adapter_manifest(
        base.path,
        base.name,
        base.sha256,
        lora=lora.model_dump(),
        train=train.model_dump(),
        data_sha256=tokens.data_sha256,
        template=tokens.template.model_dump(),
        chat_template=load_tokenizer(base.path).chat_template,
        base_quantization={"nf4": "4bit", "int8": "8bit"}.get(train.precision, "none"),
        base_source=base.source,
    ) | {"tokenize": tokens.report.settings.model_dump()} | (lineage_extra or {})
    (adapter_dir / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2, sort_keys=True))
    uri = log_dir(run_id, adapter_dir, "adapter")
    log_metrics(run_id, {f"{prefix}{k}": v for k, v in result.items()})
    return Adapter(uri=uri, sha256=sha256_tree(adapter_dir), result=result)


@task(cache_policy=CONTENT)
def evaluate_model(
    model: BaseModelRef | Champion,
    adapter: Adapter | None,
    data: ValidatedData,
    template: PromptTemplate,
    cfg: EvalConfig,
    run_id: str,
    label: str | None = None,
) -> Evaluation:
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
    return Evaluation(uri=uri, sha256=sha256, label=label, metrics=result.metrics)


evaluate_base = evaluate_model.with_options(name="evaluate_base")
evaluate_tuned = evaluate_model.with_options(name="evaluate_tuned")


@task(cache_policy=CONTENT)
def merge_adapter(
    base: BaseModelRef, adapter: Adapter, cfg: MergeConfig, run_id: str
) -> MergedModel:
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
    return MergedModel(uri=uri, sha256=sha256, model_id=model_id, dtype=cfg.dtype,
                       device=report.device, note=report.note)
