"""Faults in the long-running parts, each with what the user sees and what is left afterwards:
the disk of the home full while tokenizing, an adapter corrupted in the artifact store, the
MLflow tracking server restarted during register (real servers on loopback, tests/servers.py).
docs/reliability.md holds the table of these tests with the figures measured on them."""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
import yaml
from mlflow import MlflowClient
from test_pipeline import tiny_config
from test_servers import servers  # noqa: F401 - a fixture: S3 (moto) and an MLflow server
from tiny import make_adapter

from loraflow.artifacts import Adapter, ArtifactIntegrityError, HeldoutSplit, MergeRequest
from loraflow.cli import main as cli
from loraflow.data.prompts import PromptTemplate
from loraflow.hashing import sha256_file

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def full_disk(where: Path, room: int = 8192):
    """A small tmpfs mounted at `where`, filled but for `room` bytes; yields the filler file,
    whose removal frees the space. Needs root (CAP_SYS_ADMIN): the test skips without it."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {mounted.stderr.strip()}")
    try:
        filler = where / "filler.bin"
        filler.write_bytes(b"\0" * (shutil.disk_usage(where).free - room))
        yield filler
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_the_home_disk_full_while_tokenizing_is_a_clear_error_and_the_next_run_succeeds(
    prefect_server, home, small_data, tiny_model_dir, tmp_path, capsys
):
    # a line no other test has: tokenizing is cached on content, this run must really write
    with small_data["train"].open("a") as f:
        f.write(json.dumps({"instruction": "Say when the disk filled.", "input": "",
                            "output": f"{time.time()}"}) + "\n")
    cfg = tiny_config(small_data, tiny_model_dir, "rel-disk-full")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    cache = home / "tokenized"

    with full_disk(cache) as filler:
        start = time.perf_counter()
        assert cli(["run", "--config", str(config)]) == 1
        failed_s = time.perf_counter() - start
        err = capsys.readouterr().err
        assert "the run stopped, nothing was registered" in err
        assert f"no space left on the disk of {cache} while tokenizing" in err
        assert "Fix: free space there" in err
        assert sorted(p.name for p in cache.iterdir()) == ["filler.bin"]  # no entry, no .partial
        assert MlflowClient().search_model_versions("name='rel-disk-full'") == []

        filler.unlink()  # the user frees space and runs again
        start = time.perf_counter()
        assert cli(["run", "--config", str(config)]) == 0
        rerun_s = time.perf_counter() - start
        (entry,) = [p for p in cache.iterdir()]
        assert (entry / "report.json").is_file() and not entry.name.endswith(".partial")
    (version,) = MlflowClient().search_model_versions("name='rel-disk-full'")
    assert str(version.version) == "1"
    print(f"\ndisk full: failed after {failed_s:.1f} s; rerun with space: {rerun_s:.1f} s")


def test_the_staging_folder_is_removed_whatever_the_failure():
    from loraflow.staging import DiskFullError, staged_dir

    root = Path(__import__("tempfile").mkdtemp())
    with pytest.raises(DiskFullError, match="while testing"), \
            staged_dir(root / "entry", "testing") as staging:
        staging.mkdir()
        (staging / "half").write_text("x")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(KeyboardInterrupt), staged_dir(root / "entry", "testing") as staging:
        staging.mkdir()
        raise KeyboardInterrupt
    assert list(root.iterdir()) == []
    with staged_dir(root / "entry", "testing") as staging:
        staging.mkdir()
        (staging / "whole").write_text("x")
    assert [p.name for p in root.iterdir()] == ["entry"]
    shutil.rmtree(root)


def planted_decision():
    from loraflow.evaluation.gate import GateDecision

    return GateDecision(promote=False, verdict="kept: planted by the test", metric="exact_match",
                        set_name="test", reference_name="base model", primary=None)


def release_flow(servers, tiny_model_dir: Path, tmp_path: Path, name: str, middle):  # noqa: F811
    """A pipeline's release tasks on a made adapter, through the real servers; `middle(run_id,
    adapter_ref)` runs between logging the adapter and the tasks that load it."""
    from prefect import flow

    from loraflow.config import PipelineConfig, TrainConfig
    from loraflow.hashing import sha256_tree
    from tasks.model import merge_adapter, prepare_base_model
    from tasks.release import push_model, register_model
    from tasks.tracking import log_dir, pipeline_run

    adapter_dir = make_adapter(tiny_model_dir, tmp_path / "adapter")
    held_out = tmp_path / "heldout"  # the merge task's test split: two shipped examples
    held_out.mkdir()
    shipped = (ROOT / "data" / "orders" / "test.jsonl").read_text().splitlines()[:2]
    (held_out / "test.jsonl").write_text("\n".join(shipped) + "\n")
    test = HeldoutSplit(uri=held_out.as_uri(), sha256=sha256_file(held_out / "test.jsonl"))
    cfg = PipelineConfig.model_validate({
        "merge": {"dtype": "fp32"},
        "eval": {"max_new_tokens": 4, "batch_size": 2},
        "registry": {"model_name": name},
    })  # fmt: skip

    @flow
    def release() -> tuple[str, str]:
        with pipeline_run(cfg) as run_id:
            base = prepare_base_model(str(tiny_model_dir))
            adapter = Adapter(uri=log_dir(run_id, adapter_dir, "adapter"),
                              sha256=sha256_tree(adapter_dir), result={},
                              trained=TrainConfig())
            middle(run_id, adapter)
            model = merge_adapter(request=MergeRequest(
                base=base, adapter=adapter, test=test, template=PromptTemplate(kind="chat"),
                eval_cfg=cfg.eval, cfg=cfg.merge), run_id=run_id).model
            middle(run_id, None)
            pushed = push_model(model, adapter, cfg.storage, name, run_id)
            version = register_model(model, adapter, {"exact_match": 0.5}, cfg.registry,
                                     run_id, pushed, planted_decision()).version
        return run_id, version

    return release


def test_an_adapter_corrupted_in_the_artifact_store_is_refused_before_any_load(
    prefect_server, servers, tiny_model_dir, tmp_path, monkeypatch  # noqa: F811
):
    s3 = boto3.client("s3", endpoint_url=servers.s3.url)
    loads = []
    monkeypatch.setattr("loraflow.release.merge.merge_and_evaluate",
                        lambda *a, **k: loads.append(a))

    def corrupt(run_id: str, adapter: Adapter | None) -> None:
        if adapter is None:
            return
        listing = s3.list_objects_v2(Bucket="mlflow")["Contents"]
        (key,) = [o["Key"] for o in listing
                  if o["Key"].endswith(f"{run_id}/artifacts/adapter/adapter_model.safetensors")]
        body = s3.get_object(Bucket="mlflow", Key=key)["Body"].read()
        s3.put_object(Bucket="mlflow", Key=key, Body=body[: len(body) // 2])  # a cut-off upload

    release = release_flow(servers, tiny_model_dir, tmp_path, "rel-corrupt", corrupt)
    with pytest.raises(ArtifactIntegrityError) as err:
        release()
    message = str(err.value)
    assert "the adapter at mlflow-artifacts:/" in message or "the adapter at s3://" in message
    assert "was changed in the artifact store, and nothing loaded it" in message
    assert loads == []  # the merge never saw the bytes
    assert MlflowClient().search_model_versions("name='rel-corrupt'") == []


def test_the_tracking_server_restarted_during_register_registers_the_version_once(
    prefect_server, servers, tiny_model_dir, tmp_path  # noqa: F811
):
    from loraflow.release import registry

    timings = {}

    def restart_during_register(run_id: str, adapter: Adapter | None) -> None:
        if adapter is not None:  # before the merge: leave the server up
            return
        servers.tracking.stop()  # register's first request finds no server ...
        timings["down"] = time.perf_counter()

        def back() -> None:
            time.sleep(5)
            servers.tracking.start("/health")  # ... it is back 5 s later: same db, same S3
            timings["up"] = time.perf_counter()

        threading.Thread(target=back, daemon=True).start()

    name = "rel-restart"
    release = release_flow(servers, tiny_model_dir, tmp_path, name, restart_during_register)
    run_id, version = release()
    registered_s = time.perf_counter() - timings["down"]
    client = MlflowClient()
    (only,) = client.search_model_versions(f"name='{name}'")
    assert str(only.version) == version == "1"
    assert client.get_model_version_by_alias(name, "challenger").version == "1"
    assert client.get_run(run_id).info.status == "FINISHED"
    assert timings["up"] - timings["down"] >= 5
    # a retry whose first attempt did register (its answer lost in the restart) finds it
    again = registry.register_version(client, name, only.source, run_id, {}, only.model_id)
    assert again == "1" and len(client.search_model_versions(f"name='{name}'")) == 1
    print(f"\ntracking server down {timings['up'] - timings['down']:.1f} s; version registered "
          f"{registered_s:.1f} s after it went down")


def test_a_shared_checkpoint_reaches_another_machine_only_once_complete(tmp_path):
    """What a retried training run on another worker finds: the newest checkpoint of the
    first machine, uploaded to the MLflow run, named by latest.json only after its files."""
    from loraflow.hashing import sha256_tree
    from tasks.model import SHARED_CHECKPOINTS, restore_shared_checkpoint, share_checkpoint

    client = MlflowClient()
    experiment = client.create_experiment(f"rel-share-{time.time()}",
                                          artifact_location=(tmp_path / "store").as_uri())
    run_id = client.create_run(experiment).info.run_id
    first, second = tmp_path / "machine-a", tmp_path / "machine-b"
    assert restore_shared_checkpoint(second, run_id) is None  # nothing shared yet
    for step in (4, 8):
        checkpoint = first / "checkpoints" / f"step-{step:07d}"
        (checkpoint / "adapter").mkdir(parents=True)
        (checkpoint / "adapter" / "adapter_model.safetensors").write_bytes(bytes([step]) * 64)
        (checkpoint / "state.json").write_text(json.dumps({"step": step}))
        share_checkpoint(first, run_id)
    share_checkpoint(first, run_id)  # nothing new: nothing uploaded again
    names = [a.path.rsplit("/", 1)[1] for a in client.list_artifacts(run_id, SHARED_CHECKPOINTS)]
    assert sorted(names) == ["latest.json", "step-0000004", "step-0000008"]
    restored = restore_shared_checkpoint(second, run_id)
    assert restored == second / "checkpoints" / "step-0000008"
    assert sha256_tree(restored) == sha256_tree(first / "checkpoints" / "step-0000008")
    assert [p.name for p in (second / "checkpoints").iterdir()] == ["step-0000008"]
    assert restore_shared_checkpoint(second, run_id) is None  # its own now: left alone


def test_every_fault_test_has_a_row_in_docs_reliability():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    here = Path(__file__).read_text()
    names = [line.split("(")[0].removeprefix("def ") for line in here.splitlines()
             if line.startswith("def test_") and "docs_reliability" not in line]
    missing = [n for n in names if n not in doc]
    assert not missing, f"docs/reliability.md has no row for {missing}"



# ---------------------------------------------------------------- the deployed stack (opt-in)
# A real `prefect server start`, the repo's deployments and workers (infra/): minutes each on
# two cores, so behind the `reliability` marker (.ci/run runs them after make test).


def stack_env(tmp_path: Path, api: str) -> dict[str, str]:
    """What infra/env.sh gives a worker or the CLI: this server, the embedded MLflow store of
    a home of the test's own."""
    import os
    import sys

    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))} | {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "LORAFLOW_HOME": str(home),
        "PREFECT_HOME": str(tmp_path / "prefect-client"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "0",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


@pytest.fixture
def prefect_db(tmp_path):
    """The Prefect server's database setting (servers.DATABASE): a PostgreSQL of the test's
    own, stopped after the test, or nothing (the server's SQLite file)."""
    from servers import prefect_database

    with prefect_database(tmp_path / "postgres.log") as setting:
        yield setting


def prefect_server(tmp_path: Path, env: dict[str, str], port: int, database: dict[str, str]):
    from servers import Server

    bin_dir = Path(env["PATH"].split(":")[0])
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"} | database
    return Server("prefect server",
                  [f"{bin_dir}/prefect", "server", "start", "--host", "127.0.0.1", "--port",
                   str(port)],
                  port, server_env | {"PREFECT_HOME": str(tmp_path / "prefect-server")},
                  tmp_path / "prefect-server.log")  # fmt: skip


def api_flow_runs(api: str) -> list[dict]:
    from test_deployments import post

    names = {d["id"]: d["name"] for d in post(api, "/deployments/filter", {})}
    return [r | {"deployment": names.get(r["deployment_id"])}
            for r in post(api, "/flow_runs/filter", {}) if r["state_type"] != "SCHEDULED"]


ROOT = Path(__file__).resolve().parents[1]
MODEL_DEPLOYED = "tiny-deployed"  # registry.model_name of tests/test_deployments' prefect.yaml


@pytest.mark.reliability
def test_the_prefect_server_restarted_during_a_pipeline_run_loses_nothing(
    tmp_path, tiny_model_dir, small_data, prefect_db
):
    """`loraflow run` against a Prefect server that is stopped and started again (same port,
    same database) while the engine trains: the run goes on, its API calls wait for the
    server, and the server's record of the run is whole."""
    import os
    import signal

    from servers import free_port
    from test_deployments import wait_for

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = stack_env(tmp_path, api)
    home = Path(env["LORAFLOW_HOME"])
    server = prefect_server(tmp_path, env, port, prefect_db)
    cfg = tiny_config(small_data, tiny_model_dir, "rel-prefect-restart",
                      train={"max_steps": 40, "micro_batch_size": 4})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    log = tmp_path / "run.log"
    process = None
    try:
        server.start("/api/health")
        with log.open("wb") as out:
            process = subprocess.Popen(
                [str(Path(env["PATH"].split(":")[0]) / "python"), "-m", "loraflow.cli", "run",
                 "--config", str(config)],
                env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

        def training() -> bool:
            metrics = list((home / "runs").glob("*/metrics.jsonl"))
            return bool(metrics) and len(metrics[0].read_text().splitlines()) >= 3

        wait_for("training under way", training, 400, [log, server.log])
        old_pid = server.process.pid
        down = time.perf_counter()
        server.stop()
        server.start("/api/health")
        outage_s = time.perf_counter() - down
        assert server.process.pid != old_pid
        returncode = process.wait(timeout=600)
        total_s = time.perf_counter() - down
        output = log.read_text()
        assert returncode == 0, output[-4000:]
    finally:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        server.stop()
    assert "loraflow run summary" in output and "registered model rel-prefect-restart v1" in output
    assert "Traceback" not in output
    server.start("/api/health")  # what the server kept, read after the run
    try:
        (pipeline,) = api_flow_runs(api)  # one flow run: local training has no subflow
        assert pipeline["state_type"] == "COMPLETED"
        from test_deployments import post

        tasks = post(api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [pipeline["id"]]}}})
        states = {t["name"].rsplit("-", 1)[0]: t["state_type"] for t in tasks}
        assert {"train_adapter", "register_model", "promote_model"} <= set(states), states
        assert set(states.values()) == {"COMPLETED"}, states
    finally:
        server.stop()
    print(f"\nprefect server down {outage_s:.1f} s during training; the run ended "
          f"{total_s:.1f} s after it went down")


@contextlib.contextmanager
def deployed_stack(tmp_path: Path, model_dir: Path, data: dict[str, Path], train: dict,
                   database: dict[str, str],
                   gpu_workers: tuple[str, ...] = ("gpu-a", "gpu-b"), gpu_slots: int | None = None,
                   watch_location: Path | None = None, nodes: int = 1):
    """A Prefect server on `database` (the prefect_db fixture), prefect.yaml deployed for the
    tiny model (infra/deploy.sh), a cpu worker and gpu workers with homes of their own (two
    machines); all stopped at the end.
    Each training runs on `nodes` of them (launch.nodes; tiny_prefect_yaml's 2 otherwise).
    watch_location: where the deployment accepts data from (deploy.sh's WATCH_LOCATION;
    default $LORAFLOW_HOME/incoming)."""
    from servers import Server, free_port
    from test_deployments import run, stop_flow_run_processes, tiny_prefect_yaml

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = stack_env(tmp_path, api)
    server = prefect_server(tmp_path, env, port, database)
    workers: dict[str, Server] = {}
    try:
        server.start("/api/health")
        prefect_file = tiny_prefect_yaml(tmp_path / "prefect.yaml", model_dir, data,
                                         f"127.0.0.1:{free_port()}")
        spec = yaml.safe_load(prefect_file.read_text())
        for deployment in spec["deployments"]:
            if deployment["name"] == "finetune":
                for holder in [deployment, *deployment["schedules"]]:
                    holder["parameters"]["config"]["train"] |= train
                    holder["parameters"]["config"]["launch"]["nodes"] = nodes
        prefect_file.write_text(yaml.safe_dump(spec, sort_keys=False))
        slots = {"GPU_SLOTS": str(gpu_slots)} if gpu_slots else {}
        watch = {"WATCH_LOCATION": str(watch_location)} if watch_location else {}
        run(["infra/deploy.sh"], env | {"PREFECT_FILE": str(prefect_file)} | slots | watch,
            timeout=300)
        for name in ("cpu", *gpu_workers):
            pool = "cpu" if name == "cpu" else "gpu"
            own = {"WORKER_NAME": name, "CPU_WORKER_LIMIT": "4"}
            if pool == "gpu":
                own["LORAFLOW_HOME"] = str(tmp_path / name)
            worker = Server(f"{name} worker", ["infra/worker.sh", pool], 0, {}, tmp_path / name)
            with open(tmp_path / f"{name}.log", "ab") as log:
                worker.process = subprocess.Popen(
                    worker.args, cwd=ROOT, env=env | own, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            workers[name] = worker
        yield SimpleNamespace(api=api, env=env, server=server, workers=workers,
                              logs=[server.log, *(tmp_path / f"{n}.log" for n in workers)],
                              client=MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]))
    finally:
        stop_flow_run_processes(api)
        for worker in workers.values():
            with contextlib.suppress(ProcessLookupError):
                worker.stop()
        server.stop()


def worker_of(pid: int, workers: dict) -> str:
    """The name of the worker whose process started process `pid` (walking up the parents)."""
    pids = {w.process.pid: name for name, w in workers.items()}
    while pid > 1:
        if pid in pids:
            return pids[pid]
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    raise LookupError("no worker started it")


@pytest.mark.reliability
def test_the_gpu_worker_killed_during_training_is_retried_and_resumes_on_another_worker(
    tmp_path, tiny_model_dir, small_data, prefect_db
):
    """Two gpu workers, each its own home (two machines). While the pipeline trains on one,
    that worker and its flow run (engine included) are killed, as when a machine dies. Its
    heartbeats stop, the automation marks the run Crashed, the pipeline starts training again,
    the other worker takes it and resumes from the checkpoint shared through the MLflow run."""
    import os
    import signal

    from test_deployments import run, wait_for

    from tasks.deployments import STEP_TAG
    from tasks.model import SHARED_CHECKPOINTS

    # Long enough that a shared checkpoint stays visible while the run is RUNNING for a good
    # while: with 120 steps (~25 s of training) one run's polls here, slowed by the Prefect
    # server's locked sqlite, missed the whole window.
    steps = 300
    train = {"max_steps": steps, "micro_batch_size": 4, "checkpoint_minutes": 0.05}
    with deployed_stack(tmp_path, tiny_model_dir, small_data, train, prefect_db) as stack:
        run(["prefect", "--no-prompt", "deployment", "run", "finetune/finetune"], stack.env)

        def training_with_a_shared_checkpoint():
            for r in api_flow_runs(stack.api):
                if r["deployment"] == "train" and r["state_type"] == "RUNNING" \
                        and r.get("infrastructure_pid"):
                    shared = stack.client.list_artifacts(r["parameters"]["run_id"],
                                                         SHARED_CHECKPOINTS)
                    if any(a.path.endswith("latest.json") for a in shared):
                        return r
            return None

        first = wait_for("a checkpoint shared by the training run",
                         training_with_a_shared_checkpoint, 600, stack.logs)
        pid = int(first["infrastructure_pid"].rpartition(":")[2])
        victim = worker_of(pid, stack.workers)
        killed = time.perf_counter()
        os.killpg(pid, signal.SIGKILL)  # the flow run and its engine ...
        os.killpg(stack.workers[victim].process.pid, signal.SIGKILL)  # ... and their worker
        stack.workers[victim].process.wait()

        def crashed():
            runs = {r["id"]: r for r in api_flow_runs(stack.api)}
            return runs[first["id"]] if runs[first["id"]]["state_type"] == "CRASHED" else None

        wait_for("the killed run marked Crashed", crashed, 400, stack.logs)
        crashed_s = time.perf_counter() - killed

        def pipeline_done():
            done = [r for r in api_flow_runs(stack.api) if r["deployment"] == "finetune"]
            return done[0] if done and done[0]["state_type"] in (
                "COMPLETED", "FAILED", "CRASHED") else None

        pipeline = wait_for("the pipeline's end", pipeline_done, 600, stack.logs)
        total_s = time.perf_counter() - killed
        assert pipeline["state_type"] == "COMPLETED"
        training = [r for r in api_flow_runs(stack.api) if r["deployment"] == "train"]
        assert sorted(r["state_type"] for r in training) == ["COMPLETED", "CRASHED"]
        run_id = first["parameters"]["run_id"]
        adapter = json.loads(stack.client.get_run(run_id).data.tags[STEP_TAG + "train_adapter"])
        assert adapter["result"]["resumed_from"] > 0, adapter["result"]  # not from step 0
        assert adapter["result"]["steps"] == steps
        (version,) = stack.client.search_model_versions(f"name='{MODEL_DEPLOYED}'")
        assert version.run_id == run_id
        survivor = next(n for n in stack.workers if n.startswith("gpu") and n != victim)
        assert list((tmp_path / survivor / "runs").glob("*/adapter"))  # trained there
    print(f"\nworker {victim} killed; its run marked Crashed after {crashed_s:.1f} s; resumed "
          f"from step {adapter['result']['resumed_from']} on {survivor}; pipeline done "
          f"{total_s:.1f} s after the kill")


@pytest.mark.reliability
def test_a_hundred_files_in_five_minutes_two_watchers_a_prefect_restart_train_each_content_once(
    tmp_path, tiny_model_dir, small_data, prefect_db
):
    """100 files land over 4 minutes, one new content every 10 files and the others copies of
    contents landed before, under names of their own (10 contents, 90 byte-identical copies).
    Two `loraflow watch` processes with homes of their own (two machines): `a` from the start;
    the Prefect server is stopped and started again as the third content lands, and `b` joins
    once it is back, sending every content's event again, which the restarted server no longer
    knows. Each content trains once (one training run, one registered version with its storage
    and tags complete), each watcher accounts for every file and delivers every content's event
    (those of the outage included), and the runs started twice for one content skip."""
    import ast
    import hashlib
    import random
    import signal
    import statistics
    import sys
    import tempfile

    from test_deployments import wait_for

    from loraflow.data.watch import state_path
    from loraflow.release.storage import open_store, pull_tree

    wall = time.perf_counter()
    files, contents_n, spacing_s = 100, 10, 2.4
    train = {"max_steps": 2, "micro_batch_size": 4}
    inbox = tmp_path / "incoming"
    inbox.mkdir()
    base_lines = small_data["train"].read_text()
    contents = [base_lines + json.dumps({"instruction": f"Load test {i}.", "input": "",
                                         "output": str(i)}) + "\n" for i in range(contents_n)]
    sha_of = [hashlib.sha256(text.encode()).hexdigest() for text in contents]
    pick = random.Random(27)
    landings = [(f"orders-{n:03d}.jsonl", n // 10 if n % 10 == 0 else pick.randrange(n // 10 + 1))
                for n in range(files)]  # fmt: skip
    with deployed_stack(tmp_path, tiny_model_dir, small_data, train, prefect_db, gpu_slots=1,
                        watch_location=inbox) as stack:
        watch = [sys.executable, "-m", "loraflow.cli", "watch", str(inbox), "--interval", "1"]
        homes = {name: tmp_path / f"watcher-{name}" for name in ("a", "b")}
        watchers = {}

        def start_watcher(name: str) -> None:
            with (tmp_path / f"watch-{name}.log").open("wb") as out:
                watchers[name] = subprocess.Popen(
                    watch, cwd=ROOT, env=stack.env | {"LORAFLOW_HOME": str(homes[name])},
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

        start_watcher("a")
        logs = [tmp_path / f"watch-{name}.log" for name in homes]
        outage: dict[str, float] = {}

        def restart_server():  # beside the landings, which go on while it is down
            old_pid = stack.server.process.pid
            outage["down"] = time.time()
            stack.server.stop()
            stack.server.start("/api/health")
            outage["up"] = time.time()
            outage["new_pid"] = stack.server.process.pid != old_pid
            start_watcher("b")  # a second machine's watcher joins

        restart = threading.Thread(target=restart_server)
        landed_at: dict[str, float] = {}
        first_landed: dict[int, float] = {}
        for n, (name, content) in enumerate(landings):
            (inbox / name).write_text(contents[content])
            landed_at[str(inbox / name)] = time.time()
            first_landed.setdefault(content, landed_at[str(inbox / name)])
            # as the third content lands (its events come during the outage), while the first
            # two train: `b` sends theirs again, and their second runs find the first's claim
            if n == files // 5:
                restart.start()
            time.sleep(spacing_s)
        landed_s = max(landed_at.values()) - min(landed_at.values())
        assert landed_s < 300
        restart.join()
        assert outage["new_pid"]
        all_files = set(landed_at)
        state_files = {name: state_path(home, str(inbox)) for name, home in homes.items()}

        def all_accounted():
            states = {name: json.loads(f.read_text()) for name, f in state_files.items()
                      if f.is_file()}
            whole = len(states) == 2 and all(
                set(st["seen"].values()) | set(st["copies"]) == all_files
                for st in states.values())
            return states if whole else None

        states = wait_for("both watchers to account for all 100 files", all_accounted, 400,
                          logs + stack.logs)
        for watcher in watchers.values():
            watcher.send_signal(signal.SIGTERM)
            assert watcher.wait(timeout=60) == 0

        def pipelines_done():
            runs = [r for r in api_flow_runs(stack.api) if r["deployment"] == "finetune"]
            final = [r for r in runs if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")]
            return runs if len(final) >= contents_n and len(final) == len(runs) else None

        pipelines = wait_for("the pipeline runs to end", pipelines_done, 2400, stack.logs + logs)
        runs = api_flow_runs(stack.api)
        versions = stack.client.search_model_versions(f"name='{MODEL_DEPLOYED}'")
        server_log = stack.server.log.read_text()
        data_of = {v.version: stack.client.get_run(v.run_id).data.params["data.train"]
                   for v in versions}
    content_of = {str(inbox / name): sha_of[c] for name, c in landings}
    accepted = undelivered = 0
    # every file accounted for by each watcher: a content's first file, or a copy naming one
    # of the same bytes; and each watcher delivered one event a content
    for name, state in states.items():
        assert set(state["seen"]) == set(sha_of), name
        assert all(content_of[uri] == sha for sha, uri in state["seen"].items()), name
        assert all(content_of[copy] == content_of[first]
                   for copy, first in state["copies"].items()), name
        assert len(state["copies"]) == files - contents_n, name
        said = (tmp_path / f"watch-{name}.log").read_text()
        sent = [line.rsplit("-> event ", 1)[1] for line in said.splitlines()
                if "-> event " in line]
        assert len(set(sent)) == contents_n, (name, said[-3000:])  # an id a content
        accepted += len(sent)
        undelivered += said.count("was not delivered")
        for copy, first in state["copies"].items():
            assert f"skipped {copy}: the same bytes as {first}" in said
    # each content trained once: one completed training pipeline and one training run each;
    # every other run on it skipped (a second watcher's event, an event sent again)
    assert {p["state_type"] for p in pipelines} == {"COMPLETED"}, pipelines
    trained = [p for p in pipelines if p["state_name"] != "Skipped"]
    skipped = [p for p in pipelines if p["state_name"] == "Skipped"]
    assert sorted(content_of[p["parameters"]["data_uri"]] for p in trained) == sorted(sha_of)
    assert {content_of[p["parameters"]["data_uri"]] for p in skipped} <= set(sha_of)
    # the contents `a` sent before the restart were sent again by `b` after it: those runs
    # skipped, as trained (their first run had finished) or as claimed (it was still running)
    before = {sha_of[c] for c, at in first_landed.items() if at < outage["down"] - 5}
    assert before and before <= {content_of[p["parameters"]["data_uri"]] for p in skipped}
    reasons = [p["state"]["message"] for p in skipped]
    claimed = sum("being trained on by flow run" in r for r in reasons)
    assert all(r.startswith("skipped: data already ") for r in reasons), reasons
    # one completed training a content. A training run whose process starts while the server
    # is down exits at once (Prefect's client retries a refused connection only once it has
    # connected) and is Crashed; its pipeline starts it again (tasks.deployments.on_gpu_pool)
    training = [r for r in runs if r["deployment"] == "train"]
    completed = [r for r in training if r["state_type"] == "COMPLETED"]
    crashed = [r for r in training if r["state_type"] != "COMPLETED"]
    assert {r["state_type"] for r in crashed} <= {"CRASHED"}, crashed
    # one registered version a content, none without its storage: every pushed file is there
    # and hashes to its manifest, and the version's tags are complete
    assert len(versions) == contents_n
    version_content = {}
    for v in versions:
        (uri,) = ast.literal_eval(data_of[v.version])  # str() of the list of files
        version_content[v.version] = content_of[uri]
        for tag in ("loraflow.storage_uri", "loraflow.data_sha256", "loraflow.adapter_sha256",
                    "loraflow.model_sha256", "loraflow.base_sha256", "loraflow.gate"):
            assert v.tags.get(tag), (v.version, tag, v.tags)
        with tempfile.TemporaryDirectory() as pulled:
            got = pull_tree(open_store(v.tags["loraflow.storage_uri"]), "", Path(pulled))
        assert got["manifest"]["files"], v.version
    assert sorted(version_content.values()) == sorted(sha_of)
    trained_runs = sorted(v.run_id for v in versions)
    assert sorted(r["parameters"]["run_id"] for r in completed) == trained_runs
    assert {r["parameters"]["run_id"] for r in crashed} <= set(trained_runs)
    latency = [v.creation_timestamp / 1000 - first_landed[sha_of.index(version_content[
        v.version])] for v in versions]
    deciles = statistics.quantiles(latency, n=10)
    wall_s = time.perf_counter() - wall
    print(f"\n{files} files ({contents_n} contents) landed over {landed_s:.1f} s, "
          f"{files / landed_s:.2f} files/s; Prefect server down {outage['up'] - outage['down']:.1f}"
          f" s from {outage['down'] - min(landed_at.values()):.1f} s in; {accepted} events "
          f"accepted from the two watchers, {accepted / landed_s:.3f} events/s over the "
          f"landing ({undelivered} refused while the server was down, sent again); "
          f"{len(pipelines)} pipeline runs ({len(trained)} trained, {len(skipped)} skipped: "
          f"{claimed} on another run's claim, {len(skipped) - claimed} as trained), "
          f"{len(completed)} trainings ({len(crashed)} more started during the outage, "
          "crashed and started again); landing -> registered "
          f"version p50 {deciles[4]:.1f} s, p90 {deciles[8]:.1f} s, max {max(latency):.1f} s; "
          f"'database is locked' {server_log.count('database is locked')} times in the Prefect "
          f"server's log; test wall {wall_s:.1f} s")
