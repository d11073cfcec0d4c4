"""Model tasks: resolve the base, train the adapter (engine as a subprocess), evaluate, merge."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.utilities.hashing import hash_objects

from loraflow import evaluate, merge
from loraflow.artifacts import ArtifactRef
from loraflow.config import EvalConfig, LoraSettings, MergeConfig, TrainConfig, loraflow_home
from loraflow.lineage import code_version, library_versions, sha256_json, sha256_tree
from loraflow.model import BaseModelRef, load_tokenizer, resolve_base_model, source_location
from loraflow.train import EngineConfig
from tasks.caching import CONTENT, fingerprint
from tasks.tracking import fetch, log_dir, log_metrics, log_params

LINEAGE_FILE = "loraflow.json"


class TrainingError(RuntimeError):
    """The training engine failed; the message says where its output is."""


def base_model_key(context: Any, parameters: dict[str, Any]) -> str:
    """The base model's bytes, not its name: a new GGUF or weight file means a new key."""
    return hash_objects(code_version(), fingerprint(source_location(parameters["source"])))


@task(cache_key_fn=base_model_key)
def prepare_base_model(source: str) -> BaseModelRef:
    """Resolve model.base to a local safetensors directory (GGUF is dequantised once)."""
    return resolve_base_model(source, loraflow_home() / "models")


@task(cache_policy=CONTENT)
def train_adapter(
    tokens: ArtifactRef, base: BaseModelRef, lora: LoraSettings, train: TrainConfig, run_id: str
) -> ArtifactRef:
    """Run the training engine as its own process; relay its metrics; log the adapter."""
    key = sha256_json([tokens.sha256, base.sha256, lora.model_dump(), train.model_dump()])
    run_dir = loraflow_home() / "runs" / key[:16]
    run_dir.mkdir(parents=True, exist_ok=True)
    engine = EngineConfig(
        base_path=base.path, data_dir=fetch(tokens.uri), output_dir=run_dir, lora=lora, train=train
    )
    config_file = run_dir / "engine.json"
    config_file.write_text(engine.model_dump_json(indent=2))
    log_params(run_id, {"train.run_dir": run_dir})
    result = run_engine(config_file, run_dir, run_id)

    adapter_dir = run_dir / "adapter"
    lineage = {
        "base_model": base.name,
        "base_sha256": base.sha256,
        "tokenizer_sha256": tokens.meta["tokenizer_sha256"],
        "chat_template": load_tokenizer(base.path).chat_template,
        "template": tokens.meta["template"],
        "data_sha256": tokens.meta["data_sha256"],
        "lora": lora.model_dump(),
        "train": train.model_dump(),
        "code_version": code_version(),
        "libraries": library_versions(),
    }
    (adapter_dir / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2, sort_keys=True))
    uri = log_dir(run_id, adapter_dir, "adapter")
    log_metrics(run_id, {f"train.{k}": v for k, v in result.items()})
    return ArtifactRef(uri=uri, sha256=sha256_tree(adapter_dir), meta=result)


def run_engine(config_file: Path, run_dir: Path, run_id: str) -> dict[str, Any]:
    """Start `python -m loraflow.train`, relay metrics.jsonl to MLflow every few seconds."""
    metrics_file = run_dir / "metrics.jsonl"
    metrics_file.unlink(missing_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-m", "loraflow.train", "--config", str(config_file)],
        stdout=subprocess.DEVNULL,
    )
    relayed = 0
    while True:
        finished = process.poll() is not None
        relayed = relay_metrics(metrics_file, relayed, run_id)
        if finished:
            break
        time.sleep(2.0)
    if process.returncode != 0:
        raise TrainingError(
            f"the training engine exited with code {process.returncode}; its output is above, "
            f"its config and metrics in {run_dir}"
        )
    return json.loads((run_dir / "result.json").read_text())


def relay_metrics(metrics_file: Path, already: int, run_id: str) -> int:
    """Send the lines after the first `already` to MLflow in batches; return lines relayed."""
    if not metrics_file.is_file():
        return already
    lines = metrics_file.read_text().splitlines()
    complete = [json.loads(line) for line in lines[already:] if line.endswith("}")]
    for record in complete:
        step = record.pop("step")
        log_metrics(run_id, {f"train.{k}": v for k, v in record.items()}, step=step)
    return already + len(complete)


@task(cache_policy=CONTENT)
def evaluate_model(
    model: BaseModelRef | ArtifactRef,
    adapter: ArtifactRef | None,
    data: ArtifactRef,
    template: str,
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
    """Fold the adapter into the base; log the standalone model directory to the run."""
    adapter_dir = fetch(adapter.uri)
    with tempfile.TemporaryDirectory() as tmp:
        out = merge.merge_adapter(base.path, adapter_dir, Path(tmp) / "model", cfg.dtype)
        lineage = json.loads((adapter_dir / LINEAGE_FILE).read_text())
        (out / LINEAGE_FILE).write_text(
            json.dumps(
                lineage | {"merged_dtype": cfg.dtype, "adapter_sha256": adapter.sha256},
                indent=2,
                sort_keys=True,
            )
        )
        sha256 = sha256_tree(out)
        uri = log_dir(run_id, out, "model")
    return ArtifactRef(uri=uri, sha256=sha256, meta={"dtype": cfg.dtype})
