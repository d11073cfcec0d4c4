"""The release as one transaction: push, register and promote killed at each step boundary
(the fault hook LORAFLOW_KILL_AFTER: the process SIGKILLs itself there) leave the registry and
the store as before the release or with a complete new version, and the next run completes the
release without a second version of the same weights. Real parts: the test home's MLflow
registry, moto's S3 server on loopback, the release code in a process of its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from tiny import make_adapter

from loraflow.artifacts import Adapter, MergedModel
from loraflow.config import RegistryConfig, StorageConfig, TrainConfig
from loraflow.evaluation.gate import GateDecision
from loraflow.hashing import sha256_tree
from loraflow.release import registry
from loraflow.release.merge import merge_adapter
from loraflow.release.storage import open_store, pull_tree

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]

# One release, as the pipeline's flows make it (tasks.release.release), each step's task
# function called directly (Prefect's retries and caching are not what is tested here).
CHILD = """
import json, sys
from loraflow.artifacts import Adapter, MergedModel
from loraflow.config import RegistryConfig, StorageConfig
from loraflow.evaluation.gate import GateDecision
from tasks.release import release

spec = json.loads(open(sys.argv[1]).read())
step = lambda task, **kwargs: task.fn(**kwargs)
out = release(step, "sft", MergedModel(**spec["model"]), Adapter(**spec["adapter"]),
              {"exact_match": spec["score"]}, GateDecision(**spec["decision"]),
              RegistryConfig(**spec["registry"]), StorageConfig(**spec["storage"]),
              spec["run_id"], None)
print(json.dumps(out))
"""


def logged(tiny_model_dir: Path, tmp: Path, seed: int, run_id: str) -> tuple[dict, dict]:
    """A merged tiny model (its adapter made with `seed`: other weights per seed) and its
    adapter, logged to the run as the merge step logs them: (MergedModel, Adapter) as dicts."""
    from loraflow.release.registry import package_model
    from tasks.tracking import log_dir, log_model_package, package_path

    adapter = make_adapter(tiny_model_dir, tmp / f"adapter-{seed}", r=2 + seed)
    merge_adapter(tiny_model_dir, adapter, tmp / f"merged-{seed}", "fp32", ["Say hi."], 4)
    package = package_model(tmp / f"merged-{seed}", adapter, tmp / f"pyfunc-{seed}")
    model_id, location = log_model_package(run_id, package)
    model = MergedModel(uri=f"{location}/{package_path(package, 'model')}",
                        sha256=sha256_tree(tmp / f"merged-{seed}"), model_id=model_id,
                        dtype="fp32", device="cpu", note="test")
    ref = Adapter(uri=log_dir(run_id, adapter, f"adapter-{seed}"), sha256=sha256_tree(adapter),
                  result={}, trained=TrainConfig())
    return model.model_dump(), ref.model_dump(mode="json")


def run_release(spec: dict, tmp: Path, kill_after: str | None = None
                ) -> subprocess.CompletedProcess:
    path = tmp / f"spec-{spec['model']['sha256'][:8]}.json"
    path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "LORAFLOW_KILL_AFTER"}
    if kill_after:
        env["LORAFLOW_KILL_AFTER"] = kill_after
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", CHILD, str(path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def visible(client: MlflowClient, name: str, endpoint: str, tmp: Path) -> dict:
    """What a user sees: each version (its tags complete, its pushed files verified against
    their SHA-256 by `loraflow pull`'s code) and where the aliases point."""
    versions = {}
    for found in client.search_model_versions(f"name='{name}'"):
        tags = client.get_model_version(name, found.version).tags
        for key in ("loraflow.model_sha256", "loraflow.storage_uri", "loraflow.gate",
                    "metric.exact_match", "loraflow.base_sha256"):
            assert key in tags, (found.version, key, tags)
        root, _, prefix = tags["loraflow.storage_uri"].rpartition(f"/{name}/")
        store = open_store(root, endpoint)
        pulled = pull_tree(store, f"{name}/{prefix}", tmp / f"pull-{name}-{found.version}")
        assert pulled["manifest"]["model_sha256"] == tags["loraflow.model_sha256"]
        versions[str(found.version)] = tags
    aliases = {}
    for alias in (registry.CHALLENGER, registry.CHAMPION):
        try:
            aliases[alias] = str(client.get_model_version_by_alias(name, alias).version)
        except Exception:  # noqa: BLE001 - MLflow raises for an alias that is not set
            aliases[alias] = None
    return {"versions": versions, "aliases": aliases}


@pytest.mark.parametrize("boundary", ["pushed", "registered", "challenger"])
def test_a_release_killed_at_a_step_boundary_leaves_the_old_or_the_new_state_and_completes_once(
    boundary, tiny_model_dir, s3_env, tmp_path, capsys
):
    """v1 is the champion; the release of other weights, decided to be promoted against it, is
    killed after `boundary`. Then: no version without its verified files and tags, champion
    still v1 (nothing half-promoted), and a version only if it is complete; the next run makes
    v2 the champion (and challenger), its release "complete", and no v3."""
    from loraflow.cli import main as cli
    from tasks.release import release

    client = MlflowClient()
    experiment = client.get_experiment_by_name("release-tx") or client.get_experiment(
        client.create_experiment("release-tx"))
    run_id = client.create_run(experiment.experiment_id).info.run_id
    name = f"tx-{boundary}"
    spec = {"registry": RegistryConfig(model_name=name).model_dump(),
            "storage": StorageConfig(root="s3://models/loraflow", endpoint_url=s3_env).model_dump(),
            "run_id": run_id}
    first_model, first_adapter = logged(tiny_model_dir, tmp_path, 1, run_id)
    first = spec | {"model": first_model, "adapter": first_adapter, "score": 0.5, "decision": {
        "promote": True, "verdict": "promoted: better than the base model", "metric":
        "exact_match", "set_name": "test", "reference_name": "base model", "primary": None}}
    release(lambda task, **kwargs: task.fn(**kwargs), "sft", MergedModel(**first_model),
            Adapter(**first_adapter), {"exact_match": 0.5}, GateDecision(**first["decision"]),
            RegistryConfig(**spec["registry"]), StorageConfig(**spec["storage"]), run_id, None)
    before = visible(client, name, s3_env, tmp_path)
    assert before["aliases"] == {"challenger": "1", "champion": "1"}

    run_id = client.create_run(experiment.experiment_id).info.run_id  # a later pipeline run
    model, adapter = logged(tiny_model_dir, tmp_path, 2, run_id)
    second = spec | {"run_id": run_id, "model": model, "adapter": adapter, "score": 0.75,
                     "decision": {
        "promote": True, "verdict": "promoted: better than champion v1", "metric":
        "exact_match", "set_name": "test", "reference_name": "champion v1",
        "reference_version": "1", "primary": None}}
    killed = run_release(second, tmp_path, kill_after=boundary)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])

    after_kill = visible(client, name, s3_env, tmp_path)
    assert after_kill["aliases"]["champion"] == "1"  # never a half-promoted version
    if boundary == "pushed":  # the files are up, under a folder no version names
        assert after_kill == before
    else:  # a complete version, its files verified above; the aliases not (all) moved
        assert set(after_kill["versions"]) == {"1", "2"}
        v2 = after_kill["versions"]["2"]
        assert v2["loraflow.model_sha256"] == model["sha256"]
        assert v2[registry.RELEASE_STATE] == "aliases pending"
        assert after_kill["aliases"]["challenger"] == ("1" if boundary == "registered" else "2")
        capsys.readouterr()
        assert cli(["models", name]) == 0
        assert "(release unfinished: run the pipeline again)" in capsys.readouterr().out

    again = run_release(second, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["model_version"] == "2"
    final = visible(client, name, s3_env, tmp_path)
    assert set(final["versions"]) == {"1", "2"}  # no second version of the same weights
    assert final["aliases"] == {"challenger": "2", "champion": "2"}
    v2 = final["versions"]["2"]
    assert v2[registry.RELEASE_STATE] == "complete"
    assert v2[registry.PREVIOUS_TAG] == "1"
    assert v2["loraflow.gate"] == "promoted: better than champion v1"
    assert summary["storage_uri"] == v2["loraflow.storage_uri"]
    assert summary["storage_uri"].endswith(f"/{name}/{model['sha256']}")
