"""The MLflow model registry: versions, aliases, the promotion gate and the champion lookups.

Every new version gets alias `challenger`; `champion` moves to it only when the gate passes
against the current champion (or, for the first model, against the base model).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from loraflow.artifacts import Champion, MergedModel, SftModel, SftParent
from loraflow.evaluation.gate import GateDecision
from loraflow.release.lineage import LINEAGE_FILE, Lineage, read_manifest

CHALLENGER, CHAMPION = "challenger", "champion"
METRIC_TAG = "metric."  # version tags holding evaluation metrics, e.g. metric.exact_match
PREVIOUS_TAG = "loraflow.previous_champion"  # on a champion: the version it replaced
# "aliases pending" from a version's creation (complete: files, lineage, metrics, verdict) until
# its aliases have moved, then "complete" (tasks/release.py: the release's order)
RELEASE_STATE = "loraflow.release"
StageMirroring = Literal["none", "staging-production"]
STAGE_OF = {CHALLENGER: "Staging", CHAMPION: "Production"}
# What the served model needs, pinned to what made it; no torchvision, no loraflow install (its
# shipped code, loraflow.data.records and .prompts, needs pydantic and jinja2).
SERVING_PACKAGES = ("mlflow", "torch", "transformers", "safetensors", "pandas", "pydantic",
                    "jinja2")


class RegistryError(RuntimeError):
    """A registry operation cannot be done as asked; the message says why and what to do."""


def package_model(merged_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Save an MLflow pyfunc model: the merged model, the adapter beside it, a signature, an
    input example and explicit pip requirements. Nothing is loaded or uploaded here."""
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from loraflow.data import prompts, records
    from loraflow.evaluation import generation
    from loraflow.release import serving

    # No input schema: MLflow would then refuse a list of instruction strings before predict
    # sees it; serving.prompts_of checks every accepted shape and names the fix.
    signature = ModelSignature(
        inputs=None,
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", serving.MAX_NEW_TOKENS)]),
    )
    # Only the prompt module, the records it reads and the generation path travel as code, at
    # their own import paths (loraflow.data.*, loraflow.evaluation.generation): they render
    # prompts exactly as in training and answer exactly as evaluation does, without loraflow.
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "loraflow"
        for package in (code, code / "data", code / "evaluation"):
            package.mkdir(parents=True, exist_ok=True)
            (package / "__init__.py").write_text("")
        for module, folder in ((records, "data"), (prompts, "data"), (generation, "evaluation")):
            shutil.copy(module.__file__, code / folder / Path(module.__file__).name)
        mlflow.pyfunc.save_model(
            path=str(out_dir),
            python_model=serving.__file__,
            artifacts={"model": str(merged_dir), "adapter": str(adapter_dir)},
            code_paths=[str(code)],
            signature=signature,
            input_example=pd.DataFrame(
                {"instruction": ["Extract the order as JSON."], "input": ["2 mugs to Oslo"]}
            ),
            pip_requirements=[f"{p}=={metadata.version(p)}" for p in SERVING_PACKAGES],
        )
    return out_dir


def log_packaged_model(
    client: MlflowClient, experiment_id: str, run_id: str, local_dir: Path, name: str
) -> tuple[str, str]:
    """Upload a packaged model as an MLflow LoggedModel and mark it READY only once every file
    is stored; return (model id, artifact URI). A failed upload leaves it FAILED."""
    logged = client.create_logged_model(experiment_id, name=name, source_run_id=run_id)
    try:
        client.log_model_artifacts(logged.model_id, str(local_dir))
    except BaseException:
        client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    client.finalize_logged_model(logged.model_id, "READY")
    return logged.model_id, logged.artifact_location


def register_version(
    client: MlflowClient,
    name: str,
    source: str,
    run_id: str,
    tags: dict[str, str],
    model_id: str | None = None,
) -> str:
    """Create a version of `name` from artifacts that are already complete at `source`."""
    if model_id is not None and str(client.get_logged_model(model_id).status) != "READY":
        raise RegistryError(
            f"logged model {model_id} is not READY (its upload did not finish); "
            "no version is created from incomplete artifacts. Fix: re-run the merge step."
        )
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="LoRA fine-tunes made by loraflow")
    # A retry after a lost response (the tracking server restarted mid-request) finds the
    # version its first attempt made instead of registering the same model twice.
    for existing in client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
        if existing.source == source or (model_id and existing.model_id == model_id):
            return str(existing.version)
    version = client.create_model_version(
        name, source=source, run_id=run_id, tags=tags, model_id=model_id
    )
    return str(version.version)


def version_of(client: MlflowClient, name: str, model_sha256: str) -> str | None:
    """The registered version of `name` whose merged model has these bytes (the oldest if
    several do), or None: what a re-run registers instead of a second copy."""
    try:
        found = client.search_model_versions(
            f"name='{name}' and tags.`loraflow.model_sha256` = '{model_sha256}'"
        )
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return str(min(int(v.version) for v in found)) if found else None


def lineage_tags(lineage: Lineage) -> dict[str, str]:
    """The lineage manifest as version tags (long values as JSON, hashes as they are)."""
    values = {
        "base_model": lineage.base_model,
        "base_revision": lineage.base_revision,
        "base_sha256": lineage.base_sha256,
        "base_quantization": lineage.base_quantization,
        "tokenizer_sha256": lineage.tokenizer_sha256,
        "chat_template_sha256": lineage.chat_template_sha256,
        "template": lineage.template.model_dump(),  # str() of the record, as tags always had
        "data_sha256": lineage.data_sha256,
        "code_version": lineage.code_version,
        "adapter_sha256": lineage.adapter_sha256,
    }
    tags = {f"loraflow.{k}": str(v) for k, v in values.items() if v is not None}
    long_values = {"base_files": lineage.base_files, "lora": lineage.lora,
                   "train": lineage.train, "libraries": lineage.libraries,
                   "merge": lineage.merge}
    for key, value in long_values.items():
        if value is not None:
            tags[f"loraflow.{key}"] = json.dumps(value, sort_keys=True)[:5000]
    return tags


def set_alias(
    client: MlflowClient, name: str, alias: str, version: str, mirroring: StageMirroring
) -> None:
    """Point an alias at a version; with mirroring, also move the matching registry stage."""
    client.set_registered_model_alias(name, alias, version)
    if mirroring == "staging-production":
        # Stages are deprecated in MLflow 3 but still read by older deployment tooling.
        client.transition_model_version_stage(
            name, version, STAGE_OF[alias], archive_existing_versions=alias == CHAMPION
        )


def promote(
    client: MlflowClient, name: str, version: str, reason: str, mirroring: StageMirroring
) -> str | None:
    """Make `version` the champion, remembering the one it replaces; return that one."""
    current = champion(client, name)
    previous = current[0] if current else None
    if previous == version:
        return previous
    if previous is not None:
        client.set_model_version_tag(name, version, PREVIOUS_TAG, previous)
    client.set_model_version_tag(name, version, "loraflow.promoted", reason)
    set_alias(client, name, CHAMPION, version, mirroring)
    return previous


def rollback(client: MlflowClient, name: str, mirroring: StageMirroring) -> tuple[str, str]:
    """Give `champion` back to the version it replaced; return (from, to)."""
    current = champion(client, name)
    if current is None:
        raise RegistryError(f"model {name!r} has no champion to roll back")
    tags = client.get_model_version(name, current[0]).tags
    previous = tags.get(PREVIOUS_TAG)
    if previous is None:
        raise RegistryError(
            f"champion v{current[0]} of {name!r} replaced no earlier champion: nothing to roll "
            f"back to. Fix: promote a version by hand (loraflow promote {name} --version N)."
        )
    client.set_model_version_tag(name, current[0], "loraflow.rolled_back", f"to v{previous}")
    set_alias(client, name, CHAMPION, previous, mirroring)
    return current[0], previous


def list_versions(client: MlflowClient, name: str) -> list[dict[str, Any]]:
    """Every version, newest first, with its aliases, metrics, stage and storage URI."""
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        raise RegistryError(f"no registered model {name!r} (or it has no versions)")
    rows = []
    for found in sorted(versions, key=lambda v: int(v.version), reverse=True):
        v = client.get_model_version(name, found.version)  # search leaves aliases out
        rows.append(
            {
                "version": str(v.version),
                "aliases": sorted(v.aliases),
                "stage": None if v.current_stage in (None, "None") else v.current_stage,
                "metrics": tagged_metrics(v.tags),
                "storage_uri": v.tags.get("loraflow.storage_uri"),
                "release": v.tags.get(RELEASE_STATE, "complete"),  # older versions: no tag
                "created": v.creation_timestamp,
            }
        )
    return rows


def champion(client: MlflowClient, name: str) -> tuple[str, dict[str, float]] | None:
    """(version, metrics) of the current champion, or None when there is none."""
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return str(version.version), tagged_metrics(version.tags)


def tagged_metrics(tags: dict[str, str]) -> dict[str, float]:
    """A version's evaluation metrics, from its metric.<name> tags."""
    return {k.removeprefix(METRIC_TAG): float(v) for k, v in tags.items()
            if k.startswith(METRIC_TAG)}


def champion_files(name: str) -> Champion | None:
    """The champion's merged model (its files' URI and hash) and version; None if there is none."""
    from loraflow.release.inference import registered_model

    found = registered_model(name, alias=CHAMPION)
    if found is None:
        return None
    return Champion(uri=found.source, sha256=found.sha256 or f"{name}/{found.version}",
                    version=found.version)


def rival(name: str, candidate: MergedModel) -> Champion | None:
    """The champion a candidate is compared with: None when there is none, or when it is the
    candidate itself."""
    found = champion_files(name)
    return None if found is None or found.sha256 == candidate.sha256 else found


def champion_to_align(name: str) -> SftModel | None:
    """The champion as the SFT model an align-only run starts from: its files, the hashes its
    aligned model's lineage names, its metrics and prompt template; None if there is none."""
    found = champion_files(name)
    if found is None:
        return None
    tags = MlflowClient().get_model_version(name, found.version).tags
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.artifacts.download_artifacts(artifact_uri=f"{found.uri}/{LINEAGE_FILE}",
                                            dst_path=tmp)
        template = read_manifest(Path(tmp)).template
    parent = SftParent(version=found.version, model_sha256=found.sha256,
                       adapter_sha256=tags.get("loraflow.adapter_sha256", "unknown"))
    return SftModel(model=found, parent=parent, metrics=tagged_metrics(tags), template=template)


def applicable(client: MlflowClient, name: str, version: str | None, decision: GateDecision,
               adapter_sha256: str) -> str:
    """The decision's verdict, or why it does not apply to the registry as it is now: the
    version is the champion already, it holds the champion's very adapter (merged or scored
    differently: nothing new), or the champion is not the model it was decided against.
    version: None for a version not created yet (the release tags it with the verdict)."""
    current = champion(client, name)
    if current is not None and current[0] == version:
        return f"v{version} is already the champion"
    if current is not None:
        theirs = client.get_model_version(name, current[0]).tags.get("loraflow.adapter_sha256")
        if adapter_sha256 == theirs:
            ours = f"v{version}" if version else "this model"
            return (f"not promoted: {ours} holds the very adapter of champion v{current[0]} "
                    "(merged in another dtype or scored differently): nothing new to promote")
    if decision.reference_version != (current[0] if current else None):
        now = f"champion v{current[0]}" if current else "no champion"
        return (f"not promoted: decided against {decision.reference_name}, but the registry "
                f"holds {now} now. Run again to decide against it")
    return decision.verdict


def decision_tags(decision: GateDecision, verdict: str) -> dict[str, str]:
    """The version's record of its gate: the verdict and, when there was a paired test, its
    estimate, interval, p-value and counts."""
    tags = {"loraflow.gate": verdict[:5000]}
    if decision.primary is not None:
        p = decision.primary
        tags |= {f"loraflow.gate.{k}": f"{v:.6g}" if isinstance(v, float) else str(v)
                 for k, v in {"metric": p.metric, "estimate": p.estimate, "lower": p.lower,
                              "upper": p.upper, "p_value": p.p_value, "wins": p.wins,
                              "losses": p.losses, "ties": p.ties, "confidence": p.confidence,
                              "reference": decision.reference_name}.items()}
        tags["loraflow.gate.failed_guards"] = ",".join(decision.failed_guards) or "none"
    for check in decision.exports:
        tags[f"loraflow.export.{check.name}.agreement"] = f"{check.agreement:.6g}"
    if decision.exports:
        tags["loraflow.gate.failed_exports"] = ",".join(decision.failed_exports) or "none"
    return tags


def aliases(client: MlflowClient, name: str, version: str) -> list[str]:
    return sorted(client.get_model_version(name, version).aliases)


def metric_tags(metrics: dict[str, Any]) -> dict[str, str]:
    return {f"{METRIC_TAG}{k}": f"{v:.6g}" for k, v in metrics.items()}
