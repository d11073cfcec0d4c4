"""The stack with authentication, for real, on loopback, started the way infra/README.md says:
fresh credentials (infra/new-credentials.sh), PostgreSQL (infra/postgres.sh; SQLite with
LORAFLOW_TEST_DATABASE=sqlite), moto S3 with the stack's keys, the MLflow server with its
basic-auth app (infra/mlflow-server.sh) and its users (infra/mlflow-users.py), the Prefect server
with API auth (infra/prefect-server.sh). Anonymous and wrong-password requests are refused, the
read-only user cannot move `champion`, a missing or wrong credential stops a command at once
with the variable named, the whole pipeline and `promote --rollback` work with the right ones,
a worker stops promptly on SIGTERM, a backup restores into a fresh stack whole, and afterwards
no secret is found in any log, parameter, tag, artifact, flow-run record, summary or pushed
file."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import yaml
from servers import DATABASE, free_port, stop_session

pytestmark = pytest.mark.stack
ROOT = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)
MODEL = "auth-orders"


def read_env(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs if not k.lstrip().startswith("#")}


def clean_env() -> dict[str, str]:
    """This machine's environment without any Prefect, MLflow or AWS setting of the tests."""
    drop = ("PREFECT_", "MLFLOW_", "AWS_", "LORAFLOW_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)} | {
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":"),
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
    }


@contextlib.contextmanager
def local_stack(tmp: Path, secrets: Path, name: str, **env: str):
    """infra/local-stack.sh on free ports with a home of its own, as infra/README.md starts it;
    stopped with SIGTERM, as infra/stop.sh stops it. Its database: DATABASE (PostgreSQL's data
    in a folder of /tmp: started by root, the server runs as user postgres, which cannot enter
    pytest's folders)."""
    ports = {"S3_PORT": free_port(), "MLFLOW_PORT": free_port(), "PREFECT_PORT": free_port(),
             "POSTGRES_PORT": free_port()}  # fmt: skip
    server_home = tmp / f"{name}-home"
    postgres_data = Path(tempfile.mkdtemp(prefix="loraflow-test-postgres-"))
    server_env = clean_env() | {k: str(v) for k, v in ports.items()} | {
        "LORAFLOW_HOME": str(server_home), "LORAFLOW_SECRETS": str(secrets),
        "STACK_DATABASE": DATABASE, "POSTGRES_DATA": str(postgres_data), "MLFLOW_WORKERS": "1",
    } | env  # fmt: skip
    terminal = tmp / f"{name}.out"  # what the user's terminal shows
    with open(terminal, "wb") as out:
        process = subprocess.Popen(
            ["infra/local-stack.sh"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            env=server_env, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 400
        while "stack ready:" not in terminal.read_text():
            assert process.poll() is None, terminal.read_text()
            assert time.monotonic() < deadline, terminal.read_text()
            time.sleep(1)
        s3, mlflow, prefect = (SimpleNamespace(url=f"http://127.0.0.1:{ports[k]}")
                               for k in ("S3_PORT", "MLFLOW_PORT", "PREFECT_PORT"))  # fmt: skip
        ready = terminal.read_text()
        assert f"stack ready: S3 {s3.url}, MLflow {mlflow.url}" in ready
        assert f"Prefect {prefect.url}/api" in ready
        logs = server_home / "logs"
        assert {"s3.log", "mlflow.log", "prefect.log"} <= {f.name for f in logs.iterdir()}
        sqlite_files = [p.name for p in server_home.rglob("*.db")]
        if DATABASE == "postgresql":  # the servers' data is in PostgreSQL, none in a file
            assert "postgres.log" in {f.name for f in logs.iterdir()}
            assert sqlite_files == [], sqlite_files
            assert "PostgreSQL ready at 127.0.0.1:" in (logs / "postgres.log").read_text()
        else:
            assert {"mlflow-server.db", "mlflow-auth.db", "prefect.db"} <= set(sqlite_files)
        yield SimpleNamespace(s3=s3, mlflow=mlflow, prefect=prefect, logs=logs, home=server_home,
                              terminal=terminal, env=server_env)  # fmt: skip
    finally:
        stop_session(process, 120)  # its trap stops every server it started
        shutil.rmtree(postgres_data, ignore_errors=True)
    assert "stack stopped" in terminal.read_text()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """infra/new-credentials.sh, then the stack (local_stack) and the client side of it."""
    tmp = tmp_path_factory.mktemp("stack")
    secrets = tmp / "secrets"
    done = subprocess.run(
        ["infra/new-credentials.sh", str(secrets)], cwd=ROOT, env=clean_env(),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "credentials written" in done.stdout
    server_env = read_env(secrets / "server.env")
    assert all(server_env.values()), "every credential has a value"
    assert oct((secrets / "pipeline.env").stat().st_mode & 0o777) == "0o600"
    with local_stack(tmp, secrets, "server") as servers:
        ready = servers.terminal.read_text()
        assert len(ready.splitlines()) == 3, ready  # start, ready, next: no server's own log
        home = tmp / "client-home"
        client_env = clean_env() | {
            "LORAFLOW_HOME": str(home),
            "LORAFLOW_CREDENTIALS_FILE": str(secrets / "pipeline.env"),
            "MLFLOW_TRACKING_URI": servers.mlflow.url,
            "PREFECT_API_URL": f"{servers.prefect.url}/api",
            "AWS_ENDPOINT_URL": servers.s3.url,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        yield SimpleNamespace(
            tmp=tmp, logs=servers.logs, secrets=secrets, server_env=server_env, s3=servers.s3,
            mlflow=servers.mlflow, prefect=servers.prefect, env=client_env, home=home,
            outputs=[], terminal=servers.terminal, servers=servers,
            pipeline=read_env(secrets / "pipeline.env"), reader=read_env(secrets / "reader.env"),
        )


def cli(stack, args: list[str], env: dict[str, str] | None = None, timeout: float = 300):
    """`loraflow ...` as a user runs it; its output is kept for the leak scan."""
    done = subprocess.run(
        [sys.executable, "-m", "loraflow.cli", *args], cwd=stack.tmp,
        env=stack.env if env is None else env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    stack.outputs.append(done.stdout + done.stderr)
    return done


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def pipeline_headers(stack) -> dict[str, str]:
    pipeline = stack.pipeline
    return basic(pipeline["MLFLOW_TRACKING_USERNAME"], pipeline["MLFLOW_TRACKING_PASSWORD"])


def admin_client(stack):
    """An MlflowClient signed in as the admin (mlflow reads the variables per request)."""
    from mlflow import MlflowClient

    os.environ["MLFLOW_TRACKING_USERNAME"] = stack.server_env["MLFLOW_AUTH_ADMIN_USERNAME"]
    os.environ["MLFLOW_TRACKING_PASSWORD"] = stack.server_env["MLFLOW_AUTH_ADMIN_PASSWORD"]
    return MlflowClient(stack.mlflow.url)


@pytest.fixture
def as_admin(stack, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "x")  # restored after the test
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "x")
    return admin_client(stack)


def test_anonymous_and_wrong_password_requests_are_refused(stack):
    api = f"{stack.mlflow.url}/api/2.0/mlflow"
    wrong = basic(stack.pipeline["MLFLOW_TRACKING_USERNAME"], "not-the-password")
    requests_to_try = [  # create a version, move an alias, delete a model
        ("post", "/model-versions/create", {"name": MODEL, "source": "s3://x/y"}),
        ("post", "/registered-models/alias", {"name": MODEL, "alias": "champion", "version": "1"}),
        ("delete", "/registered-models/delete", {"name": MODEL}),
        ("post", "/registered-models/create", {"name": "anon-model"}),
    ]
    for method, path, body in requests_to_try:
        for headers in ({}, wrong):
            answer = requests.request(method, api + path, json=body, headers=headers, timeout=30)
            assert answer.status_code == 401, (method, path, headers and "wrong", answer.text)
    answer = requests.get(f"{api}/registered-models/search", headers=pipeline_headers(stack),
                          timeout=30)  # fmt: skip
    assert answer.status_code == 200 and "anon-model" not in answer.text

    papi = f"{stack.prefect.url}/api"
    wrong = basic("loraflow", "not-the-auth-string")
    for path, body in [("/flow_runs/", {"flow_id": "00000000-0000-0000-0000-000000000000"}),
                       ("/deployments/filter", {}), ("/work_pools/filter", {})]:  # fmt: skip
        for headers in ({}, wrong):
            answer = requests.post(papi + path, json=body, headers=headers, timeout=30)
            assert answer.status_code == 401, (path, headers and "wrong", answer.text)
    user, _, password = stack.pipeline["PREFECT_API_AUTH_STRING"].partition(":")
    assert requests.post(papi + "/deployments/filter", json={}, headers=basic(user, password),
                         timeout=30).status_code == 200  # fmt: skip

    # S3: anonymous writes and reads, and another key, refused like the other two servers
    for method in ("put", "get", "delete"):
        answer = requests.request(method, f"{stack.s3.url}/models/anonymous", data=b"x",
                                  timeout=30)  # fmt: skip
        assert answer.status_code == 403 and "AccessDenied" in answer.text, (method, answer.text)
    import boto3
    from botocore.exceptions import ClientError

    for key_id, secret in ((stack.pipeline["AWS_ACCESS_KEY_ID"], "not-the-secret-key"),
                           ("someone-else", stack.pipeline["AWS_SECRET_ACCESS_KEY"])):
        s3 = boto3.client("s3", endpoint_url=stack.s3.url, aws_access_key_id=key_id,
                          aws_secret_access_key=secret, region_name="us-east-1")  # fmt: skip
        with pytest.raises(ClientError) as refused:
            s3.put_object(Bucket="models", Key="intruder", Body=b"x")
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    s3 = boto3.client("s3", endpoint_url=stack.s3.url, region_name="us-east-1",
                      aws_access_key_id=stack.pipeline["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=stack.pipeline["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
    assert "Contents" not in s3.list_objects_v2(Bucket="models", Prefix="anonymous")
    assert "Contents" not in s3.list_objects_v2(Bucket="models", Prefix="intruder")


def test_a_missing_or_wrong_credential_stops_a_command_naming_the_variable(stack):
    no_file = {k: v for k, v in stack.env.items() if k != "LORAFLOW_CREDENTIALS_FILE"}
    done = cli(stack, ["models", MODEL], env=no_file)
    assert done.returncode == 1
    assert "MLFLOW_TRACKING_USERNAME" in done.stderr and "Traceback" not in done.stderr

    wrong = stack.env | {"MLFLOW_TRACKING_PASSWORD": "wrong-password-never-shown"}
    done = cli(stack, ["models", MODEL], env=wrong)
    assert done.returncode == 1 and "refused MLFLOW_TRACKING_USERNAME='pipeline'" in done.stderr
    assert "wrong-password-never-shown" not in done.stdout + done.stderr

    wrong = stack.env | {"PREFECT_API_AUTH_STRING": "loraflow:wrong-auth-never-shown"}
    start = time.monotonic()
    worker = subprocess.run(
        ["infra/worker.sh", "cpu"], cwd=ROOT, env=wrong, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    stack.outputs.append(worker.stdout + worker.stderr)
    assert worker.returncode == 3 and "refused PREFECT_API_AUTH_STRING" in worker.stderr
    assert "wrong-auth-never-shown" not in worker.stdout + worker.stderr
    assert time.monotonic() - start < 60

    done = cli(stack, ["watch", str(stack.tmp / "inbox"), "--once"], env=no_file)
    assert done.returncode == 3 and "PREFECT_API_AUTH_STRING is not set" in done.stderr

    # the prefect CLI as infra/README.md runs it (a run by hand): infra/prefect.sh loads and
    # checks the credentials file; plain prefect answered with a 401 traceback
    for env, code in ((stack.env, 0), (no_file, 3)):
        done = subprocess.run(["infra/prefect.sh", "work-pool", "ls"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=180)  # fmt: skip
        stack.outputs.append(done.stdout + done.stderr)
        assert done.returncode == code, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
    assert "PREFECT_API_AUTH_STRING is not set" in done.stderr


def test_pipeline_promote_rollback_and_pull_work_with_the_right_credentials(
    stack, small_data, tiny_model_dir, as_admin
):
    config = {
        "data": {k: str(v) for k, v in small_data.items()},
        "model": {"base": str(tiny_model_dir)},
        "train": {"max_steps": 3, "micro_batch_size": 8, "learning_rate": 1e-2},
        "eval": {"max_new_tokens": 8, "batch_size": 4},
        "merge": {"dtype": "fp32"},
        "registry": {"model_name": MODEL},
        # the deployed config's storage: the stack's S3, endpoint from AWS_ENDPOINT_URL
        "storage": yaml.safe_load((ROOT / "prefect.yaml").read_text())["definitions"]["config"][
            "storage"
        ],
    }
    assert config["storage"]["root"].startswith("s3://models/")
    path = stack.tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    done = cli(stack, ["run", "--config", str(path)], timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((stack.home / "last-run.json").read_text())
    assert summary["model_version"] == "1"
    v1 = as_admin.get_model_version(MODEL, "1")
    sha = v1.tags["loraflow.model_sha256"]
    assert summary["storage_uri"] == f"{config['storage']['root']}/{MODEL}/{sha}"
    assert v1.tags["loraflow.storage_endpoint"] == stack.s3.url

    # a second version (same files) by the pipeline's user, then champion moves by hand
    os.environ["MLFLOW_TRACKING_USERNAME"] = stack.pipeline["MLFLOW_TRACKING_USERNAME"]
    os.environ["MLFLOW_TRACKING_PASSWORD"] = stack.pipeline["MLFLOW_TRACKING_PASSWORD"]
    from mlflow import MlflowClient

    pipeline = MlflowClient(stack.mlflow.url)
    v2 = pipeline.create_model_version(MODEL, v1.source, v1.run_id, tags=v1.tags,
                                       model_id=v1.source.removeprefix("models:/"))  # fmt: skip
    assert cli(stack, ["promote", MODEL, "--version", "1"]).returncode == 0
    done = cli(stack, ["promote", MODEL, "--version", v2.version])
    assert done.returncode == 0 and f"champion is now v{v2.version} (was v1)" in done.stdout

    # the read-only user: may list, may not move champion
    reader = stack.env | {"LORAFLOW_CREDENTIALS_FILE": str(stack.secrets / "reader.env")}
    done = cli(stack, ["models", MODEL], env=reader)
    assert done.returncode == 0 and "champion" in done.stdout
    for args in (["promote", MODEL, "--version", "1"], ["promote", MODEL, "--rollback"]):
        done = cli(stack, args, env=reader)
        assert done.returncode == 1 and "refused user 'reader' (403" in done.stderr, done.stderr
    done = cli(stack, ["promote", MODEL, "--version", v2.version], env=reader)  # no change
    assert done.returncode == 0
    assert done.stdout == f"{MODEL}: v{v2.version} is already the champion; nothing changed\n"
    assert pipeline.get_model_version_by_alias(MODEL, "champion").version == v2.version
    answer = requests.post(
        f"{stack.mlflow.url}/api/2.0/mlflow/registered-models/alias",
        json={"name": MODEL, "alias": "champion", "version": "1"},
        headers=basic(stack.reader["MLFLOW_TRACKING_USERNAME"],
                      stack.reader["MLFLOW_TRACKING_PASSWORD"]), timeout=30,
    )  # fmt: skip
    assert answer.status_code == 403

    done = cli(stack, ["promote", MODEL, "--rollback"])
    assert done.returncode == 0 and f"rolled back from v{v2.version} to v1" in done.stdout
    assert pipeline.get_model_version_by_alias(MODEL, "champion").version == "1"

    # pull with no endpoint given: the one recorded with the version
    no_endpoint = {k: v for k, v in stack.env.items() if k != "AWS_ENDPOINT_URL"}
    done = cli(stack, ["pull", MODEL, "--dest", str(stack.tmp / "pulled")], env=no_endpoint)
    assert done.returncode == 0, done.stderr
    assert (stack.tmp / "pulled" / "manifest.json").is_file()
    dead = f"http://127.0.0.1:{free_port()}"
    done = cli(stack, ["pull", MODEL, "--dest", str(stack.tmp / "p2"), "--set",
                       f"storage.endpoint_url={dead}"], env=no_endpoint)  # fmt: skip
    assert done.returncode == 1 and f"object storage at {dead} cannot be reached" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_worker_stops_within_seconds_of_sigterm_or_sigint(stack, signum):
    """Started as `infra/worker.sh cpu &` from a script starts it: with SIGINT ignored (what a
    non-interactive shell does to background jobs), which made the worker ignore both."""
    name = signal.Signals(signum).name
    log = stack.logs / f"worker-{name}.log"
    env = stack.env | {"WORKER_NAME": f"signal-{name}", "PREFECT_WORKER_QUERY_SECONDS": "1"}
    with open(log, "ab") as out:
        worker = subprocess.Popen(
            ["infra/worker.sh", "cpu"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # noqa: PLW1509
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while "started" not in log.read_text() and time.monotonic() < deadline:
            assert worker.poll() is None, log.read_text()
            time.sleep(0.5)
        assert "started" in log.read_text(), log.read_text()
        time.sleep(2)  # polling
        sent = time.monotonic()
        worker.send_signal(signum)  # to the pid worker.sh was started as: the worker itself
        worker.wait(timeout=60)
        took = time.monotonic() - sent
        print(f"\nworker exited {took:.1f} s after {name} (code {worker.returncode})")
        assert took < 15
        assert (stack.home / "prefect").is_dir()  # its Prefect home: under LORAFLOW_HOME
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        stack.outputs.append(log.read_text())


HEARTBEAT_FLOW = """
import sys, time
from loraflow.environment import configure
configure()
from prefect import flow, tags, task
from tasks.steps import StepLog

@task
def wait(seconds: float) -> None:
    time.sleep(seconds)

@flow(name="heartbeat-check")
def check(seconds: float) -> None:
    step = StepLog()
    step(wait, seconds)  # training: one heartbeat at the start, the next due at Prefect's 180 s
    step(wait, 0)  # what registering would be: a run the server declared dead stops before it

with tags(*sys.argv[2:]):
    check(float(sys.argv[1]))
"""


def test_the_crash_automation_leaves_runs_alone_that_are_not_the_deployments(stack, tmp_path):
    """An in-process `loraflow run` against the stack was marked Crashed at +92 s while it
    trained (Prefect 3.9 heartbeats every 180 s unless told otherwise; the automation waited
    90 s) and went on to register. infra/automations.yaml, its window cut to 40 s here: an
    untagged run (in-process) that outlives the window completes; a run tagged loraflow (a
    deployment's) whose heartbeats stop is marked Crashed, and its next step stops."""
    from prefect.events.schemas.automations import AutomationCore

    spec = yaml.safe_load((ROOT / "infra" / "automations.yaml").read_text())["automations"][0]
    spec |= {"name": "crash-zombie-flow-runs-test"}
    spec["trigger"]["within"] = 40
    user, _, password = stack.pipeline["PREFECT_API_AUTH_STRING"].partition(":")
    papi, auth = f"{stack.prefect.url}/api", basic(user, password)
    body = AutomationCore.model_validate(spec).model_dump(mode="json")
    created = requests.post(f"{papi}/automations/", json=body, headers=auth, timeout=30)
    assert created.status_code == 201, created.text
    script = tmp_path / "heartbeat_check.py"
    script.write_text(HEARTBEAT_FLOW)
    try:
        runs = {
            name: subprocess.Popen(
                [sys.executable, str(script), "75", *tags], cwd=ROOT, env=stack.env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            for name, tags in (("in-process", []), ("deployment", ["loraflow"]))
        }  # fmt: skip
        output = {name: run.communicate(timeout=300)[0] for name, run in runs.items()}
    finally:
        requests.delete(f"{papi}/automations/{created.json()['id']}", headers=auth, timeout=30)
    stack.outputs.extend(output.values())
    assert runs["in-process"].returncode == 0, output["in-process"][-3000:]
    assert runs["deployment"].returncode != 0
    assert "marked this flow run Crashed (no heartbeat for 120 s" in output["deployment"]
    flow_runs = requests.post(f"{papi}/flow_runs/filter", headers=auth, timeout=30, json={
        "flows": {"name": {"any_": ["heartbeat-check"]}}}).json()  # fmt: skip
    crashed = {}
    for run in flow_runs:
        since = {"since": "2020-01-01T00:00:00Z"}
        events = requests.post(f"{papi}/events/filter", headers=auth, timeout=30, json={
            "filter": {"resource": {"id": [f"prefect.flow-run.{run['id']}"]}, "occurred": since}
        }).json()["events"]  # fmt: skip
        crashed[tuple(run["tags"])] = any(e["event"] == "prefect.flow-run.Crashed" for e in events)
    assert crashed == {(): False, ("loraflow",): True}
    # the declared-dead run raised and ended Failed; the other one completed
    assert {tuple(r["tags"]): r["state_type"] for r in flow_runs} == {
        (): "COMPLETED", ("loraflow",): "FAILED"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def registry_state(client) -> dict:
    """Every version of MODEL: its source, run, tags and aliases; and every run's data."""
    versions = {v.version: (v.source, v.run_id, v.tags, sorted(v.aliases))
                for v in client.search_model_versions(f"name='{MODEL}'")}  # fmt: skip
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              max_results=1000)  # fmt: skip
    # metrics as text: a NaN (the gate's detectable difference on a tiny test set) equals
    # nothing, not even the NaN it was restored from
    return {"versions": versions, "aliases": client.get_registered_model(MODEL).aliases,
            "runs": {r.info.run_id: (r.data.params, {k: repr(v) for k, v in r.data.metrics.items()},
                                     r.data.tags) for r in runs}}  # fmt: skip


def artifact_hashes(client, url: str, dest: Path) -> dict[str, str]:
    """The SHA-256 of every artifact of every run, downloaded through the MLflow server."""
    import mlflow

    hashes = {}
    for run_id in registry_state(client)["runs"]:
        local = Path(mlflow.artifacts.download_artifacts(
            run_id=run_id, dst_path=str(dest / run_id), tracking_uri=url))  # fmt: skip
        for file in local.rglob("*"):
            if file.is_file():
                hashes[f"{run_id}/{file.relative_to(local)}"] = sha256(file.read_bytes())
    return hashes


def object_hashes(url: str, server_env: dict[str, str]) -> dict[str, str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                      aws_access_key_id=server_env["S3_ACCESS_KEY"],
                      aws_secret_access_key=server_env["S3_SECRET_KEY"])  # fmt: skip
    return {f"{bucket}/{o['Key']}": sha256(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"]
                                           .read())
            for bucket in ("mlflow", "models", "data")
            for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}  # fmt: skip


def test_a_backup_restores_into_a_fresh_stack_with_every_version_alias_and_artifact(
    stack, as_admin, tmp_path
):
    """infra/backup.sh of the stack the pipeline ran on (two versions, champion moved and
    rolled back), restored into a fresh stack (its own home, ports and database, the same
    server.env) with RESTORE_FROM: every version with its tags and aliases, every run, every
    artifact and every object is there, byte for byte, and `loraflow pull` through it works."""
    from mlflow import MlflowClient

    before = registry_state(as_admin)
    assert len(before["versions"]) >= 2 and before["aliases"]["champion"] == "1"
    artifacts = artifact_hashes(as_admin, stack.mlflow.url, tmp_path / "before")
    objects = object_hashes(stack.s3.url, stack.server_env)
    assert any(k.endswith("manifest.json") for k in objects) and len(artifacts) > 3

    backup = stack.tmp / "backup"
    start = time.monotonic()
    done = subprocess.run(["infra/backup.sh", str(backup)], cwd=ROOT, env=stack.servers.env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    backup_s = time.monotonic() - start
    stack.outputs.append(done.stdout + done.stderr)
    assert done.returncode == 0, done.stderr
    assert f"backed up into {backup}: databases prefect, mlflow, mlflow_auth" in done.stdout
    manifest = json.loads((backup / "manifest.json").read_text())
    assert {d["kind"] for d in manifest["databases"].values()} == {DATABASE}
    assert {f"{o['bucket']}/{o['key']}": o["sha256"] for o in manifest["objects"]} == objects
    assert backup.stat().st_mode & 0o077 == 0  # the user store's hashes, every model: private

    start = time.monotonic()
    with local_stack(stack.tmp, stack.secrets, "restored", RESTORE_FROM=str(backup)) as fresh:
        restore_s = time.monotonic() - start
        said = fresh.terminal.read_text()
        assert f"restored (every SHA-256 checked) from {backup}" in said
        restored = MlflowClient(fresh.mlflow.url)  # as the admin: the same server.env
        assert registry_state(restored) == before
        assert artifact_hashes(restored, fresh.mlflow.url, tmp_path / "after") == artifacts
        assert object_hashes(fresh.s3.url, stack.server_env) == objects
        # the champion, pulled through the restored stack: every file against its SHA-256
        env = stack.env | {"MLFLOW_TRACKING_URI": fresh.mlflow.url,
                           "AWS_ENDPOINT_URL": fresh.s3.url,
                           "PREFECT_API_URL": f"{fresh.prefect.url}/api"}  # fmt: skip
        done = cli(stack, ["pull", MODEL, "--dest", str(tmp_path / "pulled")], env=env)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "pulled" / "manifest.json").is_file()
        # Prefect's record too: the same flow runs, in the same states
        user, _, password = stack.pipeline["PREFECT_API_AUTH_STRING"].partition(":")
        runs = {}
        for url in (stack.prefect.url, fresh.prefect.url):
            answer = requests.post(f"{url}/api/flow_runs/filter", json={}, timeout=30,
                                   headers=basic(user, password))  # fmt: skip
            runs[url] = {(r["id"], r["state_type"]) for r in answer.json()}
        assert runs[fresh.prefect.url] == runs[stack.prefect.url] and runs[stack.prefect.url]
        # what the restored stack wrote, for the secret scan of the last test
        stack.outputs.append(said)
        stack.outputs.extend(log.read_text(errors="replace") for log in fresh.logs.iterdir())
    print(f"\nbackup: {len(manifest['objects'])} objects, "
          f"{sum(o['bytes'] for o in manifest['objects']) / 1e6:.1f} MB, {backup_s:.1f} s; "
          f"a fresh stack restored and ready in {restore_s:.1f} s")


def test_no_secret_anywhere_after_the_authenticated_run(stack, as_admin, tmp_path):
    """Runs last in this module: everything the run above left behind, scanned."""
    import boto3
    import mlflow

    secrets = [
        v for k, v in (stack.server_env | stack.pipeline | stack.reader).items()
        if k.endswith(("PASSWORD", "SECRET_KEY", "AUTH_STRING"))
    ]  # fmt: skip
    secrets += [v.partition(":")[2] for v in secrets if ":" in v]  # the auth string's half
    secrets += [(stack.server_env["MLFLOW_AUTH_ADMIN_USERNAME"] + ":") + stack.server_env[
        "MLFLOW_AUTH_ADMIN_PASSWORD"]]  # fmt: skip
    assert len(secrets) >= 6
    found: list[str] = []

    def scan(where: str, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        for secret in secrets:
            for form in {secret.encode(), base64.b64encode(secret.encode())}:
                if form in raw:
                    found.append(f"{where}: holds {secret[:3]}…")

    assert stack.outputs, "the tests above ran and kept their output"
    for i, text in enumerate(stack.outputs):
        scan(f"command output #{i}", text)
    for log in stack.logs.iterdir():
        scan(f"server log {log.name}", log.read_bytes())
    scan("local-stack.sh's terminal", stack.terminal.read_bytes())
    # the S3 log names method, path and status: not even the access key id of a presigned URL
    assert stack.server_env["S3_ACCESS_KEY"] not in (stack.logs / "s3.log").read_text()
    # MLflow: every run's params, tags and artifacts; every version's tags
    runs = as_admin.search_runs(
        [e.experiment_id for e in as_admin.search_experiments()], max_results=1000
    )
    assert runs, "the pipeline's run is there"
    for run in runs:
        scan(f"run {run.info.run_id} params", json.dumps(run.data.params))
        scan(f"run {run.info.run_id} tags", json.dumps(run.data.tags))
        local = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, dst_path=str(tmp_path / run.info.run_id),
            tracking_uri=stack.mlflow.url,
        )  # fmt: skip
        for file in Path(local).rglob("*"):
            if file.is_file():
                scan(f"run {run.info.run_id} artifact {file.name}", file.read_bytes())
    for version in as_admin.search_model_versions(f"name='{MODEL}'"):
        scan(f"{MODEL} v{version.version} tags", json.dumps(version.tags))
    # Prefect: every flow run's parameters and every log line the server holds
    user, _, password = stack.pipeline["PREFECT_API_AUTH_STRING"].partition(":")
    papi, auth = f"{stack.prefect.url}/api", basic(user, password)
    flow_runs = requests.post(f"{papi}/flow_runs/filter", json={}, headers=auth, timeout=30).json()
    assert flow_runs, "the pipeline's flow run is recorded"
    for run in flow_runs:
        scan(f"flow run {run['name']} parameters", json.dumps(run["parameters"]))
        scan(f"flow run {run['name']} job variables", json.dumps(run.get("job_variables")))
    offset, lines = 0, 0
    while batch := requests.post(f"{papi}/logs/filter", json={"offset": offset, "limit": 200},
                                 headers=auth, timeout=30).json():  # fmt: skip
        scan("Prefect logs", json.dumps(batch))
        offset, lines = offset + len(batch), lines + len(batch)
    assert lines > 0
    # the summary JSON, the client's whole home (results, caches), the pushed objects
    scan("last-run.json", (stack.home / "last-run.json").read_bytes())
    for file in stack.home.rglob("*"):
        if file.is_file() and file.stat().st_size < 64 << 20 and "secrets" not in file.parts:
            scan(f"client home {file.relative_to(stack.home)}", file.read_bytes())
    s3 = boto3.client("s3", endpoint_url=stack.s3.url,
                      aws_access_key_id=stack.server_env["S3_ACCESS_KEY"],
                      aws_secret_access_key=stack.server_env["S3_SECRET_KEY"],
                      region_name="us-east-1")  # fmt: skip
    pushed = s3.list_objects_v2(Bucket="models").get("Contents", [])
    assert any(o["Key"].endswith("manifest.json") for o in pushed)
    for obj in pushed:
        body = s3.get_object(Bucket="models", Key=obj["Key"])["Body"].read()
        scan(f"s3://models/{obj['Key']}", body)
    assert not found, "\n".join(found)
