"""Register, push, promote and pull through real servers on loopback: `mlflow server` (SQLite
backend, artifacts proxied to S3) and moto's S3-protocol server, each its own process, started
on free ports and stopped by the fixtures whatever happens. Faults: S3 stopped during a push,
wrong credentials, the tracking server restarted between tasks."""

import json
import time
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
from botocore.exceptions import BotoCoreError
from mlflow import MlflowClient
from servers import mlflow_server, moto
from test_pipeline import tiny_config
from tiny import make_adapter

from loraflow.cli import main as cli
from loraflow.hashing import sha256_file
from loraflow.release.storage import (
    StoragePermanentError,
    StorageUnreachableError,
    open_store,
    push_tree,
)

pytestmark = pytest.mark.integration
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """S3 (moto) with buckets `mlflow` and `models`, and an MLflow tracking server using it."""
    tmp = tmp_path_factory.mktemp("servers")
    started = []
    with pytest.MonkeyPatch.context() as env:
        for key, value in CREDENTIALS.items():
            env.setenv(key, value)
        try:
            s3 = moto(tmp)
            started.append(s3)
            s3.start()
            client = boto3.client("s3", endpoint_url=s3.url)
            for bucket in ("mlflow", "models"):
                client.create_bucket(Bucket=bucket)
            tracking = mlflow_server(tmp, tmp / "mlflow.db", "s3://mlflow/artifacts", s3.url)
            started.append(tracking)
            tracking.start("/health", timeout=180)  # a busy machine: MLflow takes ~50 s
            env.setenv("MLFLOW_TRACKING_URI", tracking.url)
            yield SimpleNamespace(s3=s3, tracking=tracking, tmp=tmp)
        finally:
            for server in reversed(started):
                server.stop()


def s3_config(data, model_dir, name, s3_url, **sections):
    return tiny_config(
        data, model_dir, name, storage={"root": "s3://models/loraflow", "endpoint_url": s3_url},
        **sections,
    )  # fmt: skip


def test_register_push_promote_pull_through_real_servers_surviving_a_restart(
    prefect_server, servers, small_data, tiny_model_dir, tmp_path, capsys
):
    """v1 from the whole pipeline; v2 from the release tasks with the tracking server
    restarted between register and promote; then champion by hand, listing, rollback, pull."""
    import mlflow.pyfunc
    import pandas as pd

    from flows.finetune import finetune

    name = "srv-orders"
    first = finetune(config=s3_config(small_data, tiny_model_dir, name, servers.s3.url))
    assert first["tracking_uri"] == servers.tracking.url
    client = MlflowClient()
    v1 = client.get_model_version(name, "1")
    sha = v1.tags["loraflow.model_sha256"]
    assert first["storage_uri"] == f"s3://models/loraflow/{name}/{sha}"
    assert v1.tags["loraflow.base_files"] and v1.tags["loraflow.merge"]
    assert "metric.exact_match" in v1.tags and "challenger" in v1.aliases
    # the model's artifacts went through the tracking server into the S3 bucket
    listing = boto3.client("s3", endpoint_url=servers.s3.url).list_objects_v2(Bucket="mlflow")
    keys = [o["Key"] for o in listing.get("Contents", [])]
    assert any(k.endswith("artifacts/model/model.safetensors") for k in keys)

    run_id, pids = release_with_restart(servers, tiny_model_dir, tmp_path, name)
    assert pids[0] != pids[1], "the tracking server was restarted"
    assert client.get_run(run_id).info.status == "FINISHED"
    sha = client.get_model_version(name, "2").tags["loraflow.model_sha256"]
    assert client.get_run(run_id).data.params["storage.uri"] == f"s3://models/loraflow/{name}/{sha}"
    # v2 beat the base model (no champion yet: v1 did not pass the gate on a random model)
    assert client.get_model_version_by_alias(name, "champion").version == "2"

    assert cli(["promote", name, "--version", "1"]) == 0
    assert "champion is now v1 (was v2)" in capsys.readouterr().out
    assert cli(["models", name]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0] == f"{name}  ({servers.tracking.url})"
    v2_row, v1_row = table.splitlines()[2:4]  # newest first
    assert v2_row.split()[:2] == ["2", "challenger"] and v1_row.split()[:2] == ["1", "champion"]
    assert f"pushed to s3://models/loraflow/{name}/<merged model's SHA-256>" in table.splitlines()
    assert cli(["promote", name, "--rollback"]) == 0
    assert "rolled back from v1 to v2" in capsys.readouterr().out
    assert client.get_model_version_by_alias(name, "champion").version == "2"

    # the champion loads by alias through the server and generates
    loaded = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    answers = loaded.predict(pd.DataFrame({"instruction": ["Say hi."]}), {"max_new_tokens": 4})
    assert len(answers) == 1 and isinstance(answers[0], str)

    # pull the champion from S3: every file verified against the manifest
    endpoint = ["--set", f"storage.endpoint_url={servers.s3.url}"]
    assert cli(["pull", name, "--dest", str(tmp_path / "pulled"), *endpoint]) == 0
    manifest = json.loads((tmp_path / "pulled" / "manifest.json").read_text())
    assert manifest["model_sha256"] == client.get_model_version(name, "2").tags[
        "loraflow.model_sha256"]
    for key, digest in manifest["files"].items():
        assert sha256_file(tmp_path / "pulled" / key) == digest
    # a corrupted stored file is caught by the pull
    stored = client.get_model_version(name, "2").tags["loraflow.storage_uri"]
    boto3.client("s3", endpoint_url=servers.s3.url).put_object(
        Bucket="models", Key=f"{stored.removeprefix('s3://models/')}/model/config.json",
        Body=b"{}"
    )
    assert cli(["pull", name, "--dest", str(tmp_path / "again"), *endpoint]) == 1
    assert "model/config.json: downloaded bytes hash to" in capsys.readouterr().err


def release_with_restart(servers, tiny_model_dir: Path, tmp_path: Path, name: str):
    """The release tasks of the pipeline, the tracking server restarted between two of them."""
    from prefect import flow

    from loraflow.artifacts import Adapter, HeldoutSplit, MergeRequest
    from loraflow.config import PipelineConfig, TrainConfig
    from loraflow.data.prompts import PromptTemplate
    from loraflow.hashing import sha256_tree
    from tasks.model import merge_adapter, prepare_base_model
    from tasks.release import promote_model, push_model, register_model
    from tasks.tracking import log_dir, pipeline_run

    adapter_dir = make_adapter(tiny_model_dir, tmp_path / "adapter", template="chat")
    heldout = tmp_path / "heldout"
    heldout.mkdir()
    lines = (Path(__file__).parents[1] / "data/orders/test.jsonl").read_text().splitlines()
    (heldout / "test.jsonl").write_text("\n".join(lines[:2]) + "\n")
    cfg = PipelineConfig.model_validate(
        {
            "eval": {"max_new_tokens": 4, "batch_size": 2},
            "merge": {"dtype": "fp32"},
            "registry": {"model_name": name},
            "storage": {"root": "s3://models/loraflow", "endpoint_url": servers.s3.url},
        }
    )
    from loraflow.evaluation.gate import GateDecision

    tuned = {"exact_match": 0.5, "json_valid": 1.0}
    decision = GateDecision(promote=True, verdict="promoted: the paired test passed (planted)",
                            metric="exact_match", set_name="test", reference_name="base model",
                            primary=None)
    pids = []

    @flow
    def release() -> str:
        with pipeline_run(cfg) as run_id:
            base = prepare_base_model(str(tiny_model_dir))
            adapter = Adapter(uri=log_dir(run_id, adapter_dir, "adapter"),
                              sha256=sha256_tree(adapter_dir), result={},
                              trained=TrainConfig())
            test = HeldoutSplit(uri=log_dir(run_id, heldout, "data"),
                                sha256=sha256_tree(heldout))
            model = merge_adapter(MergeRequest(base=base, adapter=adapter, test=test,
                                               template=PromptTemplate(), eval_cfg=cfg.eval,
                                               cfg=cfg.merge), run_id).model
            pushed = push_model(model, adapter, cfg.storage, name, run_id)
            version = register_model(model, adapter, tuned, cfg.registry, run_id, pushed,
                                     decision).version
            pids.append(servers.tracking.process.pid)
            servers.tracking.stop()  # the tracking server goes away between two tasks ...
            servers.tracking.start("/health", timeout=180)  # ... and comes back (same db, S3)
            pids.append(servers.tracking.process.pid)
            promote_model(version, decision, cfg.registry, run_id, adapter.sha256)
        return run_id

    return release(), pids


def test_s3_stopped_during_a_push_retries_then_fails_and_registers_nothing(
    prefect_server, servers, small_data, tiny_model_dir, tmp_path, monkeypatch
):
    from flows.finetune import finetune
    from loraflow.release.storage import S3Store

    # S3 answered the pipeline's check at its start and goes away before the push
    monkeypatch.setattr(S3Store, "check", lambda self: None)

    storage = moto(servers.tmp)
    try:
        storage.start()
        boto3.client("s3", endpoint_url=storage.url).create_bucket(Bucket="models")
        cfg = s3_config(small_data, tiny_model_dir, "srv-s3-down", storage.url)
        # The upstream tasks are cached from the first test; the push is the first to need S3.
        storage.stop()
        start = time.perf_counter()
        with pytest.raises(StorageUnreachableError, match="cannot be reached"):
            finetune(config=cfg)
        assert time.perf_counter() - start >= 2 + 4 + 8  # the task's three retries, backing off
    finally:
        storage.stop()
    assert MlflowClient().search_model_versions("name='srv-s3-down'") == []


def test_s3_stopped_in_the_middle_of_a_multipart_upload_is_a_transient_error(tmp_path):
    storage = moto(tmp_path, **CREDENTIALS)
    big = tmp_path / "model.safetensors"
    big.write_bytes(bytes(range(256)) * (12 * 4096))  # 12 MiB: three 5 MiB parts
    try:
        storage.start()
        s3 = boto3.client("s3", endpoint_url=storage.url, **_boto_credentials())
        s3.create_bucket(Bucket="models")
        with pytest.MonkeyPatch.context() as env:
            for key, value in CREDENTIALS.items():
                env.setenv(key, value)
            store = open_store("s3://models/x", storage.url, 5, 5)
            done = []

            def stop_after_first_part(n: int) -> None:
                done.append(n)
                if sum(done) >= 5 << 20:
                    storage.stop()

            start = time.perf_counter()
            with pytest.raises((BotoCoreError, OSError)) as err:
                push_tree(store, {"model": big.parent}, "m/1", {}, progress=stop_after_first_part)
            assert not isinstance(err.value, StoragePermanentError)  # so the task retries it
            assert time.perf_counter() - start < 60
    finally:
        storage.stop()


def test_wrong_credentials_fail_at_once_without_retrying(tmp_path, monkeypatch):
    storage = moto(tmp_path, INITIAL_NO_AUTH_ACTION_COUNT="0", **CREDENTIALS)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    try:
        storage.start()
        for key, value in CREDENTIALS.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-never-printed")
        store = open_store("s3://models/x", storage.url)
        start = time.perf_counter()
        with pytest.raises(StoragePermanentError) as err:
            push_tree(store, {"model": tmp_path / "m"}, "m/1", {})
        assert time.perf_counter() - start < 5
        assert "InvalidAccessKeyId" in str(err.value) or "403" in str(err.value)
        assert "wrong-secret-never-printed" not in str(err.value)
    finally:
        storage.stop()


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_DEFAULT_REGION"],
    }


def test_every_server_of_this_module_answers_on_loopback_only(servers):
    for server in (servers.s3, servers.tracking):
        assert server.url.startswith("http://127.0.0.1:")
    assert Path(servers.tmp / "mlflow.db").is_file()
