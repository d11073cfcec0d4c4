"""Release tasks: export the merged model in the formats users serve (each checked against the
evaluated model's answers), register it in MLflow, push it to object storage, promote it."""

from __future__ import annotations

import json
import os
import signal
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


class Pushed(BaseModel):
    uri: str  # <storage.root>/<model name>/<the merged model's SHA-256>
    endpoint: str | None  # the S3 endpoint (credentials removed), None for a local store


class Registered(BaseModel):
    version: str


# The release is push -> register -> promote, ordered so that each step's result is complete
# before anything a user sees names it: the files go first to a folder named by the merged
# model's SHA-256, which no version names yet; then the version is created with every tag at
# once (lineage, metrics, where its files are, the gate's verdict), one registry call; then the
# aliases move, challenger then champion, each one call. A process killed between two steps
# leaves the registry as it was (an unnamed folder of verified files, used again by the next
# push) or a complete version whose aliases the next run moves; the next run finds the version
# by its SHA-256 and registers no second one. Its registry.RELEASE_STATE tag says which.
# Fault hook (tests): LORAFLOW_KILL_AFTER names boundaries, comma-separated, of "pushed" (after
# push_model), "registered" (the version made, before its alias) and "challenger" (after it).
KILL_AFTER = "LORAFLOW_KILL_AFTER"


def boundary(name: str) -> None:
    """A step boundary of the release. With LORAFLOW_KILL_AFTER naming it, the process is
    SIGKILLed here, as a crash or an OOM kill would end it: nothing after runs, no cleanup."""
    if name in os.environ.get(KILL_AFTER, "").split(","):
        os.kill(os.getpid(), signal.SIGKILL)


@task(cache_policy=CONTENT, **NETWORK_RETRIES)
def push_model(
    model: MergedModel,
    adapter: Adapter,
    cfg: StorageConfig,
    model_name: str,
    run_id: str,
    exports: Exports | None = None,
) -> Pushed:
    """Upload merged model + adapter (+ exports/<format>/) + SHA-256 manifest (written last)
    to <root>/<model-name>/<model SHA-256>/. Files already there with the right hash are not
    sent again (a re-run after a crash, the same weights again)."""
    store = open_configured_store(cfg)
    dirs = {"model": fetch(model.uri), "adapter": fetch_verified(adapter, "adapter")}
    if exports is not None and exports.checks:
        dirs["exports"] = fetch_verified(exports, "exports")
    total = sum(p.stat().st_size for d in dirs.values() for p in Path(d).rglob("*") if p.is_file())
    with tqdm(total=total, desc="push", unit="B", unit_scale=True) as bar:
        pushed = push_tree(
            store,
            dirs,
            f"{model_name}/{model.sha256}",
            {"model_name": model_name, "model_sha256": model.sha256,
             "adapter_sha256": adapter.sha256},
            progress=bar.update,
        )
    endpoint = getattr(store, "endpoint", None)  # S3: where `loraflow pull` finds it
    log_params(run_id, {"storage.uri": pushed["uri"]})
    log_metrics(
        run_id,
        {"storage.files": len(pushed["manifest"]["files"]), "storage.uploaded": pushed["uploaded"]},
    )
    return Pushed(uri=pushed["uri"], endpoint=safe_url(endpoint) if endpoint else None)


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
    pushed: Pushed,
    decision: GateDecision,
    tags: dict[str, str] | None = None,
) -> Registered:
    """Create the version, complete in one call: lineage, evaluation metrics, where its pushed
    files are, the gate's verdict (`tags`: more, e.g. the aligned model's parent); then alias
    `challenger`. A version of the same merged files (loraflow.model_sha256) is returned as it
    is, no second copy; `challenger` moves to it only if its release was cut short."""
    client = MlflowClient()
    name = cfg.model_name
    existing = registry.version_of(client, name, model.sha256)
    if existing is not None:
        found = client.get_model_version(name, existing).tags
        if found.get("loraflow.storage_uri") is None:  # registered by a release before this one
            for key, value in storage_tags(pushed).items():
                client.set_model_version_tag(name, existing, key, value)
        if found.get(registry.RELEASE_STATE) == "aliases pending":  # killed before its aliases
            registry.set_alias(client, name, registry.CHALLENGER, existing, cfg.stage_mirroring)
        log_params(run_id, {"registry.version": existing})
        return Registered(version=existing)
    lineage = read_manifest(fetch(model.uri))
    verdict = registry.applicable(client, name, None, decision, adapter.sha256)
    all_tags = (
        registry.lineage_tags(lineage)
        | {
            "loraflow.model_sha256": model.sha256,
            "loraflow.adapter_sha256": adapter.sha256,
            "loraflow.adapter_uri": adapter.uri,
            # the transformers directory inside the pyfunc package: what evaluation,
            # `loraflow generate` and vLLM/TGI load
            "loraflow.model_uri": model.uri,
        }
        | storage_tags(pushed)
        | registry.metric_tags(metrics)
        | registry.decision_tags(decision, verdict)
        | (tags or {})
        | {registry.RELEASE_STATE: "aliases pending"}
    )
    model_id = model.model_id
    version = registry.register_version(
        client, name, f"models:/{model_id}", run_id, all_tags, model_id=model_id
    )
    boundary("registered")
    registry.set_alias(client, name, registry.CHALLENGER, version, cfg.stage_mirroring)
    log_params(run_id, {"registry.version": version})
    return Registered(version=version)


def storage_tags(pushed: Pushed) -> dict[str, str]:
    """Where a version's files are: what `loraflow pull` reads."""
    return {"loraflow.storage_uri": pushed.uri} | (
        {ENDPOINT_TAG: pushed.endpoint} if pushed.endpoint else {})


def open_configured_store(cfg: StorageConfig):  # noqa: ANN201 - an ObjectStore
    """The store of storage.root (default: <LORAFLOW_HOME>/storage)."""
    return open_store(
        cfg.root or (loraflow_home() / "storage").as_uri(),
        cfg.endpoint_url,
        cfg.multipart_threshold_mb,
        cfg.multipart_chunk_mb,
    )


@task(cache_policy=NO_CACHE, **NETWORK_RETRIES)
def promote_model(
    version: str, decision: GateDecision, cfg: RegistryConfig, run_id: str, adapter_sha256: str
) -> dict[str, Any]:
    """Move `champion` to this version if the paired decision says so and the registry still
    holds what it was decided against; the version's gate tags say so if that changed since it
    was registered; its release is complete then."""
    client = MlflowClient()
    name = cfg.model_name
    verdict = registry.applicable(client, name, version, decision, adapter_sha256)
    promoted = verdict == decision.verdict and decision.promote
    if promoted:
        registry.promote(client, name, version, verdict, cfg.stage_mirroring)
    tags = client.get_model_version(name, version).tags
    wanted = registry.decision_tags(decision, verdict)
    if tags.get("loraflow.gate") != wanted["loraflow.gate"] and "loraflow.promoted" not in tags:
        for key, value in wanted.items():
            client.set_model_version_tag(name, version, key, value)
    if tags.get(registry.RELEASE_STATE) != "complete":
        client.set_model_version_tag(name, version, registry.RELEASE_STATE, "complete")
    log_params(run_id, {"gate.decision": "promoted" if promoted else "kept",
                        "gate.reason": verdict})
    log_metrics(run_id, {"gate.promoted": float(promoted)})
    return {"promote": promoted, "reason": verdict,
            "aliases": registry.aliases(client, name, version)}


push_aligned = push_model.with_options(name="push_aligned")
register_aligned = register_model.with_options(name="register_aligned")
promote_aligned = promote_model.with_options(name="promote_aligned")
STEPS = {"sft": (push_model, register_model, promote_model),
         "aligned": (push_aligned, register_aligned, promote_aligned)}


def release(
    step: Any, stage: str, model: MergedModel, adapter: Adapter, metrics: dict[str, float],
    decision: GateDecision, registry_cfg: RegistryConfig, storage_cfg: StorageConfig,
    run_id: str, exports: Exports | None, tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """push -> register -> promote for one stage's model ("sft" or "aligned": its steps'
    names), through `step` (the flow's StepLog); what the summary shows of it."""
    push, register, promote = STEPS[stage]
    name = registry_cfg.model_name
    pushed = step(push, model=model, adapter=adapter, cfg=storage_cfg, model_name=name,
                  run_id=run_id, exports=exports)
    boundary("pushed")
    registered = step(register, model=model, adapter=adapter, metrics=metrics, cfg=registry_cfg,
                      run_id=run_id, pushed=pushed, decision=decision, tags=tags)
    boundary("challenger")
    gate = step(promote, version=registered.version, decision=decision, cfg=registry_cfg,
                run_id=run_id, adapter_sha256=adapter.sha256)
    return {"model_version": registered.version, "aliases": gate["aliases"],
            "gate": gate["reason"], "storage_uri": pushed.uri}
