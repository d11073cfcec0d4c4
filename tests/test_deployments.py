"""The deployments for real, on loopback: `prefect server start`, the pools and deployments of
the repo's prefect.yaml (infra/deploy.sh), a cpu worker and two gpu workers (infra/worker.sh),
the watcher (`loraflow watch`). A data file lands -> an event -> the trigger starts `finetune`
on the cpu worker -> training, the base evaluation and the merge (with the tuned evaluation)
run in flow runs of the gpu workers -> a version is registered and the aliases move. A re-run
on the same data starts nothing on the gpu pool; the same bytes again start nothing; a run on
data already trained on ends Skipped; new data with a champion evaluates the champion on the
gpu pool and keeps the base's evaluation. Every process the test starts is stopped."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.servers import Server, free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-deployed"


def tiny_prefect_yaml(out: Path, model_dir: Path, data: dict[str, Path], rdzv: str) -> Path:
    """The repo's prefect.yaml with the pipeline's parameters overridden for the tiny model
    (pools, trigger, schedule and entrypoints as they are), trained by two "machines"."""
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    config = {
        "data": {k: [str(v)] for k, v in data.items()},
        "model": {"base": str(model_dir)},
        # nodes 2: two gpu workers train together, as two machines would, meeting at the
        # rendezvous endpoint; no launch.gpus_per_node: the train deployment's own counts
        "train": {"max_steps": 3, "micro_batch_size": 4, "learning_rate": 1e-2},
        "launch": {"nodes": 2, "rdzv_endpoint": rdzv},
        "eval": {"max_new_tokens": 8, "batch_size": 4},
        "merge": {"dtype": "fp32"},
        "registry": {"model_name": MODEL},
    }
    for deployment in spec["deployments"]:
        if deployment["name"] == "train":  # the CPU profile infra/README.md documents
            deployment["parameters"]["gpus_per_node"] = 0
        if deployment["name"] == "finetune":
            deployment["parameters"]["config"] = config
            for schedule in deployment["schedules"]:
                schedule["parameters"]["config"] = config
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def run(args: list[str], env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def wait_for(what: str, check, timeout: float, logs: list[Path]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1.0)
    tails = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in logs if p.is_file())
    raise AssertionError(f"{what}: not within {timeout:.0f} s\n{tails}")


def test_new_data_triggers_training_on_the_gpu_pool_and_the_same_bytes_do_not(
    tmp_path, tiny_model_dir, small_data
):
    from mlflow import MlflowClient

    home, inbox = tmp_path / "home", tmp_path / "incoming"
    inbox.mkdir()
    home.mkdir()
    tracking = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking)
    client.search_experiments()  # the schema exists before two processes could race to make it
    bin_dir = str(Path(sys.executable).parent)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))
    } | {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "LORAFLOW_HOME": str(home),
        "PREFECT_HOME": str(tmp_path / "prefect-client"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "0",
        "MLFLOW_TRACKING_URI": tracking,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "WATCH_LOCATION": str(inbox),  # deploy.sh: the only place a data_uri may come from
    }
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"} | {
        "PREFECT_HOME": str(tmp_path / "prefect-server"),
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    server = Server(
        "prefect server",
        [f"{bin_dir}/prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        port,
        server_env,  # over os.environ, which has no PREFECT_API_URL: the server is itself
        logs / "server.log",
    )
    workers: list[Server] = []
    try:
        server.start("/api/health", timeout=90)
        data = {"train": small_data["train"], "validation": small_data["validation"],
                "test": small_data["test"]}  # fmt: skip
        prefect_file = tiny_prefect_yaml(tmp_path / "prefect.yaml", tiny_model_dir, data,
                                         f"127.0.0.1:{free_port()}")
        # seven prefect CLI calls (pools, deploys, the automation), ~30 s each on a loaded machine
        run(["infra/deploy.sh"], env | {"PREFECT_FILE": str(prefect_file)}, timeout=600)
        # one cpu worker; two gpu workers with homes of their own, like two GPU machines
        for name, pool in (("cpu", "cpu"), ("gpu-a", "gpu"), ("gpu-b", "gpu")):
            worker = Server(f"{name} worker", ["infra/worker.sh", pool], 0, {}, logs / name)
            workers.append(worker)
            own = {"WORKER_NAME": name}
            if pool == "gpu":
                own["LORAFLOW_HOME"] = str(tmp_path / name)
            with open(worker.log, "ab") as log:
                worker.process = subprocess.Popen(
                    worker.args, cwd=ROOT, env=env | own, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
        all_logs = [server.log] + [w.log for w in workers]

        # data lands: a new file in the watched folder; the watcher emits the event
        landed = inbox / "orders-2026-11.jsonl"
        shutil.copy(small_data["train"], landed)
        t_landed = time.monotonic()
        watch = [sys.executable, "-m", "loraflow.cli", "watch", str(inbox), "--once"]
        watch += ["--interval", "1"]
        out = run(watch, env)
        assert f"landed {landed}" in out

        def registered():
            return client.search_model_versions(f"name='{MODEL}'")

        # five flow runs on the gpu pool (two train, evaluate, merge) and their process starts
        (version,) = wait_for("a registered version", registered, 900, all_logs)
        latency = time.monotonic() - t_landed
        print(f"\nfile landed -> version {version.version} registered: {latency:.1f} s")

        assert str(version.version) == "1"

        def pipeline_finished():
            done = [r for r in flow_runs(api) if r["deployment"] == "finetune"]
            return done if done and done[0]["state"] in ("COMPLETED", "FAILED", "CRASHED") else None

        (pipeline,) = wait_for("the pipeline run's end", pipeline_finished, 300, all_logs)
        assert pipeline["state"] == "COMPLETED"
        assert pipeline["parameters"]["data_uri"] == str(landed)
        aliases = {k: str(v) for k, v in client.get_registered_model(MODEL).aliases.items()}
        assert aliases.get("challenger") == "1", aliases
        summary = json.loads((home / "last-run.json").read_text())
        assert summary["model_version"] == "1"
        assert aliases.get("champion") == ("1" if "champion" in summary["aliases"] else None)
        tags = client.get_run(version.run_id).data.tags
        assert json.loads(tags["loraflow.step.train_adapter"])["uri"]  # the train flow's
        assert tags["loraflow.data_sha256"]

        runs = flow_runs(api)
        assert len([r for r in runs if r["deployment"] == "finetune"]) == 1
        training = [r for r in runs if r["deployment"] == "train"]  # one run a machine
        assert len(training) == 2 and {r["work_pool_name"] for r in training} == {"gpu"}
        assert {r["parameters"]["run_id"] for r in training} == {version.run_id}
        assert {r["parameters"]["request"]["launch"]["nodes"] for r in training} == {2}
        assert {r["state"] for r in training} == {"COMPLETED"}
        # the two machines trained one adapter together: rank 0's relayed two ranks' tokens
        result = json.loads(tags["loraflow.step.train_adapter"])["result"]
        assert result["world_size"] == 2
        # every step that loads the model ran in a flow run of a gpu worker; the cpu side
        # only waited for it (the task of the same name, whose child that flow run is)
        placed = placement(api)
        for step in ("train_adapter", "evaluate_base", "merge_adapter"):
            assert "gpu" in placed[step], (step, placed)
        assert placed["evaluate_base"]["gpu"] == ["evaluate"]
        assert placed["merge_adapter"]["gpu"] == ["merge"]
        for step in ("validate_data", "tokenize_data", "report_evaluation", "register_model",
                     "push_model", "promote_model"):
            assert set(placed[step]) == {"cpu"}, (step, placed)
        assert "gpu" not in placed.get("evaluate_champion", {})  # no champion: nothing started
        # the summary reached the flow run's log (the Prefect UI), not only the worker's stdout
        # (logs reach the server in batches, a few seconds after the run ends)
        assert wait_for_log(api, pipeline["id"], "loraflow run summary"), \
            flow_run_log(api, pipeline["id"])

        # started again on the same data, training allowed: cached on the cpu side, nothing
        # runs on the gpu pool, and the summary reads the registry as it is now
        gpu_runs = len([r for r in flow_runs(api) if r["work_pool_name"] == "gpu"])
        again = run_deployment_now(api, env, {"data_uri": str(landed),
                                              "skip_trained_data": False})
        assert again["state_name"] == "Completed", again
        assert len([r for r in flow_runs(api) if r["work_pool_name"] == "gpu"]) == gpu_runs
        rerun = json.loads((home / "last-run.json").read_text())
        assert rerun["run_id"] != summary["run_id"] and rerun["model_version"] == "1"
        assert {n: t["state"] for n, t in rerun["tasks"].items()
                if n not in ("register_model", "promote_model")} == dict.fromkeys(
            [n for n in rerun["tasks"] if n not in ("register_model", "promote_model")],
            "Cached")
        assert len(client.search_model_versions(f"name='{MODEL}'")) == 1

        # the same bytes under another name: no event, no run
        shutil.copy(landed, inbox / "orders-copy.jsonl")
        out = run(watch, env)
        assert "landed" not in out
        time.sleep(3)
        assert len([r for r in flow_runs(api) if r["deployment"] == "finetune"]) == 2

        # started by hand (or by the schedule) on data already trained on: skipped, and says
        # so in its final state and its log
        skipped = run_deployment_now(api, env, {"data_uri": str(landed)})
        assert skipped["state_name"] == "Skipped", skipped
        assert wait_for_log(api, skipped["id"], "skipped: data already trained on")
        assert len(client.search_model_versions(f"name='{MODEL}'")) == 1
        last = json.loads((home / "last-run.json").read_text())  # unchanged: written on success
        assert last["run_id"] == rerun["run_id"]
        skipped_runs = client.search_runs(
            [client.get_run(version.run_id).info.experiment_id],
            filter_string="tags.`loraflow.skipped` LIKE 'skipped: data already trained on%'",
        )
        assert len(skipped_runs) == 1

        # new data while v1 is champion: the champion answers on the gpu pool, and the base's
        # evaluation is kept (same base, same test split)
        client.set_registered_model_alias(MODEL, "champion", "1")
        newer = inbox / "orders-2026-12.jsonl"
        newer.write_text("".join(reversed(landed.read_text().splitlines(keepends=True))))
        out = run(watch, env)
        assert f"landed {newer}" in out

        def second_version():
            found = client.search_model_versions(f"name='{MODEL}'")
            return found if len(found) == 2 else None

        wait_for("a second version", second_version, 900, all_logs)
        (latest,) = wait_for("the second pipeline's end", lambda: [
            r for r in flow_runs(api) if r["deployment"] == "finetune"
            and r["parameters"].get("data_uri") == str(newer)
            and r["state"] in ("COMPLETED", "FAILED", "CRASHED")], 300, all_logs)
        assert latest["state"] == "COMPLETED"
        newest = json.loads((home / "last-run.json").read_text())
        assert newest["tasks"]["evaluate_base"]["state"] == "Cached", newest["tasks"]
        assert newest["tasks"]["evaluate_champion"]["state"] == "Completed"
        assert set(newest["metrics"]) == {"base", "tuned", "champion"}
        assert placement(api)["evaluate_champion"]["gpu"] == ["evaluate"]
    finally:
        stop_flow_run_processes(api)  # workers start runs in sessions of their own
        for worker in workers:
            worker.stop()
        server.stop()


def post(api: str, path: str, body: dict) -> list[dict]:
    request = urllib.request.Request(
        f"{api}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def stop_flow_run_processes(api: str) -> None:
    """End the process group of every flow run still running (a test that failed midway)."""
    try:
        runs = post(api, "/flow_runs/filter", {})
    except OSError:  # the server never came up or is gone: no runs to end
        return
    for r in runs:
        pid = (r.get("infrastructure_pid") or "").rpartition(":")[2]
        if r["state_type"] in ("RUNNING", "PENDING") and pid.isdigit():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(pid), signal.SIGKILL)


def flow_runs(api: str) -> list[dict]:
    """Every flow run the server has started (scheduled future runs left out), by deployment."""
    names = {d["id"]: d["name"] for d in post(api, "/deployments/filter", {})}
    return [
        {
            "id": r["id"],
            "deployment": names.get(r["deployment_id"]),
            "parameters": r["parameters"],
            "work_pool_name": r["work_pool_name"],
            "state": r["state_type"],
            "state_name": r["state_name"],
        }
        for r in post(api, "/flow_runs/filter", {})
        if r["state_type"] != "SCHEDULED"
    ]


def placement(api: str) -> dict[str, dict[str, list[str]]]:
    """Task name -> work pool -> the deployments of the flow runs it ran in (Completed runs
    only; a Cached one executed nothing)."""
    runs = {r["id"]: r for r in flow_runs(api)}
    placed: dict[str, dict[str, list[str]]] = {}
    for task_run in post(api, "/task_runs/filter", {}):
        flow_run = runs.get(task_run["flow_run_id"])
        if flow_run is None or task_run["state_name"] != "Completed":
            continue
        name = task_run["name"].rsplit("-", 1)[0]
        pool = placed.setdefault(name, {}).setdefault(flow_run["work_pool_name"], [])
        if flow_run["deployment"] not in pool:
            pool.append(flow_run["deployment"])
    return placed


def wait_for_log(api: str, flow_run_id: str, text: str, seconds: float = 60.0) -> bool:
    """Whether `text` shows in the flow run's log within `seconds`."""
    deadline = time.monotonic() + seconds
    while text not in flow_run_log(api, flow_run_id):
        if time.monotonic() > deadline:
            return False
        time.sleep(2)
    return True


def flow_run_log(api: str, flow_run_id: str) -> str:
    logs = post(api, "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}},
                                      "limit": 200})
    return "\n".join(entry["message"] for entry in logs)


def run_deployment_now(api: str, env: dict[str, str], parameters: dict) -> dict:
    """`prefect deployment run finetune/finetune` and wait for its end; that flow run."""
    before = {r["id"] for r in flow_runs(api)}
    run(
        ["prefect", "--no-prompt", "deployment", "run", "finetune/finetune",
         "--params", json.dumps(parameters), "--watch", "--watch-timeout", "600"],
        env, timeout=620,
    )  # fmt: skip
    (started,) = [r for r in flow_runs(api)
                  if r["id"] not in before and r["deployment"] == "finetune"]
    return started


def test_one_run_a_content_holds_the_claim_and_a_failed_run_hands_it_on(prefect_server):
    """Two runs on one content (two watchers, an event sent again): the second skips while the
    first trains and after it completed; a run that failed leaves the content to the next."""
    from types import SimpleNamespace

    from prefect import flow
    from prefect.runtime import flow_run

    from tasks.deployments import claim_data

    def data(n: int) -> SimpleNamespace:  # claim_data reads the validated data's hash only
        return SimpleNamespace(sha256=f"{n:064x}")

    @flow
    def second(n: int) -> str | None:
        return claim_data(data(n), MODEL, run_id="mlflow-second")

    @flow
    def first(n: int, fail: bool = False) -> tuple[str, str | None, str | None]:
        mine = claim_data(data(n), MODEL, run_id="mlflow-first")
        again = claim_data(data(n), MODEL, run_id="mlflow-first")  # its own claim, read back
        assert mine is None and again is None
        if fail:
            raise RuntimeError("training failed")
        return str(flow_run.id), second(n), claim_data(data(n), "another-model", "mlflow-other")

    holder, while_training, other_model = first(1)
    assert while_training == f"being trained on by flow run {holder} (MLflow run mlflow-first)"
    assert other_model is None  # the claim is per model and content
    assert second(1) == f"trained on by flow run {holder} (MLflow run mlflow-first)"
    assert second(2) is None  # a content of its own
    with pytest.raises(RuntimeError, match="training failed"):
        first(3, fail=True)
    assert second(3) is None  # the failed run's claim is stale: this one takes it
    assert second(3).startswith("trained on by flow run ")
