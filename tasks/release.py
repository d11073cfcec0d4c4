"""Release tasks: export the merged model in the formats users serve (each checked against the
evaluated model's answers), register it in MLflow, push it to object storage, promote it."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import task
from prefect.cache_policies import NO_CACHE, CacheKeyFnPolicy
from prefect.tasks import exponential_backoff
from pydantic import BaseModel
from tqdm import tqdm

from loraflow.artifacts import Adapter, Evaluation, Exports, HeldoutSplit, MergedModel
from loraflow.config import (
    EvalConfig,
    ExportConfig,
    RegistryConfig,
    StorageConfig,
    loraflow_home,
)
from loraflow.credentials import safe_url
from loraflow.evaluation import evaluate
from loraflow.evaluation.gate import GateDecision
from loraflow.hashing import sha256_tree
from loraflow.release import registry
from loraflow.release.exports import export_version, llama_cpp_skipped, llama_cpp_version
from loraflow.release.lineage import read_manifest
from loraflow.release.storage import open_store, push_tree
from tasks.caching import CONTENT
from tasks.tracking import fetch, fetch_verified, log_dir, log_metrics, log_params

ENDPOINT_TAG = "loraflow.storage_endpoint"
TRANSIENT = (OSError, ConnectionError, BotoCoreError, ClientError, MlflowException)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry network trouble only; a permanent error (bad bucket, bad credentials) fails at once."""
    try:
        state.result()
    except TRANSIENT:
        return True
    except BaseException:
        return False
    return False


NETWORK_RETRIES = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_condition_fn": retry_transient,
}


def llama_cpp_key(context: Any, inputs: dict[str, Any]) -> str:
    """Part of export_model's key: installing (or upgrading) llama-cpp-python checks the same
    model again, now answered by llama.cpp too (export.llama_cpp=auto)."""
    return f"llama-cpp-python {llama_cpp_version()}"


@task(cache_policy=CONTENT + CacheKeyFnPolicy(cache_key_fn=llama_cpp_key))
def export_model(
    model: MergedModel,
    adapter: Adapter,
    tuned: Evaluation,
    test: HeldoutSplit,
    cfg: ExportConfig,
    eval_cfg: EvalConfig,
    model_name: str,
    run_id: str,
) -> Exports:
    """Write export.formats from the merged model and its adapter (artifact exports/<format>/);
    each answers the test sets in a runtime loraflow did not write (a GGUF file also in llama.cpp
    where it is installed), compared with the tuned (evaluated) answers: agreement per format
    and runtime as export.<format>[/llama.cpp].agreement, the differing answers in
    eval/exports/exports.json. The gate reads the agreement (decide_promotion)."""
    sets = evaluate.load_sets(eval_cfg, fetch(test.uri) / "test.jsonl")
    evaluated = evaluate.read_result(fetch(tuned.uri))
    with tempfile.TemporaryDirectory() as tmp:
        out, details = Path(tmp) / "exports", Path(tmp) / "details"
        reports = export_version(fetch(model.uri), fetch_verified(adapter, "adapter"), out, cfg,
                                 sets, eval_cfg, evaluated, model_name)
        details.mkdir()
        (details / "exports.json").write_text(
            json.dumps([r.model_dump() for r in reports], indent=2))
        log_dir(run_id, details, "eval/exports")
        uri, sha256 = log_dir(run_id, out, "exports"), sha256_tree(out)
    checks = [r.check for r in reports]
    log_metrics(run_id, {f"export.{c.name}.{k}": float(v) for c in checks for k, v in {
        "agreement": c.agreement, "bytes": sum(c.files.values()),
        "write_seconds": c.write_seconds, "check_seconds": c.check_seconds}.items()})
    notes = [note] if (note := llama_cpp_skipped(cfg, eval_cfg)) else []
    for note in notes:
        print(f"loraflow: {note}")
    return Exports(uri=uri, sha256=sha256, checks=checks, notes=notes)


class Registered(BaseModel):
    version: str
    created: bool  # False: a version of these very files was registered already


# register and promote are never cached: they read the registry as it is now (a cached result
# would report a version, aliases and a gate decision the registry may have moved on from);
# both are a few registry calls that change nothing when nothing changed.
@task(cache_policy=NO_CACHE, **NETWORK_RETRIES)
def register_model(
    model: MergedModel,
    adapter: Adapter,
    metrics: dict[str, float],
    cfg: RegistryConfig,
    run_id: str,
) -> Registered:
    """Create a registry version from the complete (READY) logged model; alias `challenger`.
    Lineage and evaluation metrics become version tags. A version of the same merged files
    (loraflow.model_sha256) is returned as it is: no second copy, no alias moved."""
    client = MlflowClient()
    existing = registry.version_of(client, cfg.model_name, model.sha256)
    if existing is not None:
        log_params(run_id, {"registry.version": existing})
        return Registered(version=existing, created=False)
    lineage = read_manifest(fetch(model.uri))
    tags = (
        registry.lineage_tags(lineage)
        | {
            "loraflow.model_sha256": model.sha256,
            "loraflow.adapter_sha256": adapter.sha256,
            "loraflow.adapter_uri": adapter.uri,
            # the transformers directory inside the pyfunc package: what evaluation,
            # `loraflow generate` and vLLM/TGI load
            "loraflow.model_uri": model.uri,
        }
        | registry.metric_tags(metrics)
    )
    model_id = model.model_id
    version = registry.register_version(
        client, cfg.model_name, f"models:/{model_id}", run_id, tags, model_id=model_id
    )
    registry.set_alias(client, cfg.model_name, registry.CHALLENGER, version, cfg.stage_mirroring)
    log_params(run_id, {"registry.version": version})
    return Registered(version=version, created=True)


def discard_version(cfg: RegistryConfig, version: str) -> None:
    """Remove a version whose push failed, so the registry holds no half-released model."""
    MlflowClient().delete_model_version(cfg.model_name, version)


def open_configured_store(cfg: StorageConfig):  # noqa: ANN201 - an ObjectStore
    """The store of storage.root (default: <LORAFLOW_HOME>/storage)."""
    return open_store(
        cfg.root or (loraflow_home() / "storage").as_uri(),
        cfg.endpoint_url,
        cfg.multipart_threshold_mb,
        cfg.multipart_chunk_mb,
    )


@task(cache_policy=CONTENT, **NETWORK_RETRIES)
def push_model(
    version: str,
    model: MergedModel,
    adapter: Adapter,
    cfg: StorageConfig,
    model_name: str,
    run_id: str,
    exports: Exports | None = None,
) -> str:
    """Upload merged model + adapter (+ exports/<format>/) + SHA-256 manifest to
    <root>/<model-name>/<version>/."""
    store = open_configured_store(cfg)
    dirs = {"model": fetch(model.uri), "adapter": fetch_verified(adapter, "adapter")}
    if exports is not None and exports.checks:
        dirs["exports"] = fetch_verified(exports, "exports")
    total = sum(p.stat().st_size for d in dirs.values() for p in Path(d).rglob("*") if p.is_file())
    with tqdm(total=total, desc="push", unit="B", unit_scale=True) as bar:
        pushed = push_tree(
            store,
            dirs,
            f"{model_name}/{version}",
            {
                "model_name": model_name,
                "version": version,
                "model_sha256": model.sha256,
                "adapter_sha256": adapter.sha256,
            },
            progress=bar.update,
        )
    client = MlflowClient()
    client.set_model_version_tag(model_name, version, "loraflow.storage_uri", pushed["uri"])
    if endpoint := getattr(store, "endpoint", None):  # S3: where `loraflow pull` finds it
        client.set_model_version_tag(model_name, version, ENDPOINT_TAG, safe_url(endpoint))
    log_params(run_id, {"storage.uri": pushed["uri"]})
    log_metrics(
        run_id,
        {"storage.files": len(pushed["manifest"]["files"]), "storage.uploaded": pushed["uploaded"]},
    )
    return pushed["uri"]


@task(cache_policy=NO_CACHE, **NETWORK_RETRIES)
def promote_model(
    version: str, decision: GateDecision, cfg: RegistryConfig, run_id: str
) -> dict[str, Any]:
    """Move `champion` to this version if the paired decision says so and the registry still
    holds what it was decided against; tag the version with the decision either way."""
    client = MlflowClient()
    verdict = registry.applicable(client, cfg.model_name, version, decision)
    promoted = verdict == decision.verdict and decision.promote
    if promoted:
        registry.promote(client, cfg.model_name, version, verdict, cfg.stage_mirroring)
    for key, value in registry.decision_tags(decision, verdict).items():
        client.set_model_version_tag(cfg.model_name, version, key, value)
    log_params(run_id, {"gate.decision": "promoted" if promoted else "kept",
                        "gate.reason": verdict})
    log_metrics(run_id, {"gate.promoted": float(promoted)})
    return {"promote": promoted, "reason": verdict,
            "aliases": registry.aliases(client, cfg.model_name, version)}
