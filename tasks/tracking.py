"""MLflow glue shared by the tasks: the pipeline's run, artifact hand-off and metric relay."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from loraflow.artifacts import ArtifactIntegrityError, ArtifactRef
from loraflow.config import PipelineConfig, loraflow_home
from loraflow.hashing import code_version, sha256_tree
from loraflow.release import registry

BATCH = 1000  # MLflow's log_batch limit for metrics


@contextmanager
def pipeline_run(cfg: PipelineConfig, name: str = "finetune") -> Iterator[str]:
    """One MLflow run per pipeline run (or sweep); ends FAILED if the pipeline raises."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(cfg.registry.experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(
            cfg.registry.experiment,
            artifact_location=(loraflow_home() / "mlartifacts").as_uri()
            if mlflow.get_tracking_uri().startswith("sqlite")
            else None,
        )
    )
    run = client.create_run(
        experiment_id, tags={"loraflow.code_version": code_version()}, run_name=name
    )
    run_id = run.info.run_id
    log_params(run_id, flatten(cfg.model_dump(mode="json")))
    try:
        yield run_id
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def flatten(value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, dict):
            out.update(flatten(item, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = item
    return out


def log_params(run_id: str, params: dict[str, Any]) -> None:
    entries = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(entries), 100):
        MlflowClient().log_batch(run_id, params=entries[start : start + 100])


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    log_metric_records(run_id, [{**metrics, "step": step}])


def log_metric_records(run_id: str, records: list[dict[str, Any]], prefix: str = "") -> None:
    """Log JSON-lines metric records ({"step": N, name: value, ...}) in batches."""
    now = mlflow.utils.time.get_current_time_millis()
    entries = [
        Metric(f"{prefix}{k}", float(v), now, int(r["step"]))
        for r in records
        for k, v in r.items()
        if k != "step"
    ]
    for start in range(0, len(entries), BATCH):
        MlflowClient().log_batch(run_id, metrics=entries[start : start + BATCH])


def log_dir(run_id: str, local_dir: Path, artifact_path: str) -> str:
    """Log a directory's files under artifact_path; return their artifact URI."""
    MlflowClient().log_artifacts(run_id, str(local_dir), artifact_path)
    return f"{MlflowClient().get_run(run_id).info.artifact_uri}/{artifact_path}"


def fetch(uri: str) -> Path:
    """A local copy of an artifact URI (local paths are used in place)."""
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tempfile.mkdtemp()))


def fetch_verified(ref: ArtifactRef, what: str) -> Path:
    """fetch(ref.uri), refused unless its files hash to ref.sha256 (a tree hash): a file
    corrupted or swapped in the artifact store is caught before anything loads it."""
    path = fetch(ref.uri)
    actual = sha256_tree(path, cached=False)
    if actual != ref.sha256:
        raise ArtifactIntegrityError(
            f"the {what} at {ref.uri} hashes to {actual[:12]}, not the {ref.sha256[:12]} "
            "recorded when it was made: it was changed in the artifact store, and nothing "
            "loaded it. Fix: re-run the step that made it (or restore the artifact store)."
        )
    return path


def log_model_package(run_id: str, package_dir: Path) -> tuple[str, str]:
    """Upload a packaged MLflow model as a LoggedModel of the run; (model id, artifact URI)."""
    client = MlflowClient()
    experiment_id = client.get_run(run_id).info.experiment_id
    return registry.log_packaged_model(client, experiment_id, run_id, package_dir, "model")


def package_path(package_dir: Path, artifact: str) -> str:
    """Where a pyfunc artifact (e.g. the merged model) lies inside the packaged model."""
    from mlflow.models import Model

    flavor = Model.load(str(package_dir)).flavors["python_function"]
    return flavor["artifacts"][artifact]["path"]
