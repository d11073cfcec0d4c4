"""infra/: the compose stack's structure (no Docker engine runs here) and the scripts."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


def compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def test_compose_has_the_whole_stack_with_pinned_images():
    services = compose()["services"]
    assert {
        "postgres", "prefect-server", "mlflow", "minio", "worker-cpu", "worker-gpu", "watcher"
    } <= set(services)  # fmt: skip
    for name, service in services.items():
        assert "image" in service, name
        image = service["image"]
        if "build" in service:  # our own image, built from the repo
            assert (ROOT / "infra" / ".." / service["build"]["dockerfile"]).is_file(), name
            continue
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), image


def test_every_published_port_is_bound_to_loopback():
    published = [
        (name, port) for name, s in compose()["services"].items() for port in s.get("ports", [])
    ]
    assert len(published) >= 4
    for name, port in published:
        assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on all interfaces"


def test_services_are_wired_to_each_other_and_secrets_have_no_defaults():
    services = compose()["services"]
    for name in ("worker-cpu", "worker-gpu", "watcher", "deploy"):
        env = services[name]["environment"]
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api", name
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000", name
        assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
        # each client signs in: Prefect auth string, the MLflow pipeline user, the S3 user
        assert env["PREFECT_API_AUTH_STRING"].startswith("${PREFECT_SERVER_API_AUTH_STRING:?")
        assert env["MLFLOW_TRACKING_PASSWORD"].startswith("${MLFLOW_PIPELINE_PASSWORD:?")
        assert env["AWS_SECRET_ACCESS_KEY"].startswith("${S3_SECRET_KEY:?"), name
    prefect = services["prefect-server"]["environment"]
    prefect_db = prefect["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://") and "@postgres:5432/" in prefect_db
    auth = prefect["PREFECT_SERVER_API_AUTH_STRING"]
    assert auth.startswith("${PREFECT_SERVER_API_AUTH_STRING:?")
    mlflow = services["mlflow"]
    assert mlflow["command"] == "infra/mlflow-server.sh"  # the basic-auth app, as on a host
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert mlflow["environment"]["MLFLOW_AUTH_DATABASE_URI"].startswith("postgresql+psycopg2://")
    assert mlflow["environment"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://mlflow")
    assert "mlflow_auth" in (INFRA / "postgres-init.sql").read_text()
    assert services["mlflow-users"]["command"] == "python infra/mlflow-users.py"
    text = (INFRA / "compose.yaml").read_text()
    # passwords must be given by the user: ${VAR:?message}, never a default value
    for var in (
        "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "PREFECT_SERVER_API_AUTH_STRING",
        "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_PIPELINE_PASSWORD", "MLFLOW_READER_PASSWORD",
        "S3_ACCESS_KEY", "S3_SECRET_KEY",
    ):  # fmt: skip
        assert re.search(rf"\$\{{{var}:\?", text) and not re.search(rf"\$\{{{var}:-", text), var
    assert services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]


def test_new_credentials_are_random_private_and_never_overwritten(tmp_path):
    out = tmp_path / "secrets"
    subprocess.run(["infra/new-credentials.sh", str(out)], cwd=ROOT, check=True,
                   capture_output=True)  # fmt: skip
    first = {f.name: f.read_text() for f in out.iterdir()}
    assert set(first) == {"server.env", "pipeline.env", "reader.env"}
    for f in out.iterdir():
        assert f.stat().st_mode & 0o077 == 0, f"{f} is readable by others"
    server = dict(line.split("=", 1) for line in first["server.env"].splitlines() if "=" in line
                  and not line.startswith("#"))  # fmt: skip
    assert len(server["MLFLOW_AUTH_ADMIN_PASSWORD"]) >= 12  # MLflow's minimum
    assert server["MLFLOW_PIPELINE_PASSWORD"] in first["pipeline.env"]
    assert server["PREFECT_SERVER_API_AUTH_STRING"] in first["pipeline.env"]
    assert server["MLFLOW_READER_PASSWORD"] in first["reader.env"]
    assert server["MLFLOW_AUTH_ADMIN_PASSWORD"] not in first["pipeline.env"] + first["reader.env"]
    for var in ("POSTGRES_PREFECT_PASSWORD", "POSTGRES_MLFLOW_PASSWORD"):  # the servers' only
        assert len(server[var]) >= 24
        assert server[var] not in first["pipeline.env"] + first["reader.env"]
    again = subprocess.run(["infra/new-credentials.sh", str(out)], cwd=ROOT, capture_output=True,
                           text=True)  # fmt: skip
    assert again.returncode == 1 and "not overwritten" in again.stderr
    assert {f.name: f.read_text() for f in out.iterdir()} == first
    other = tmp_path / "other"
    subprocess.run(["infra/new-credentials.sh", str(other)], cwd=ROOT, check=True,
                   capture_output=True)  # fmt: skip
    assert (other / "server.env").read_text() != first["server.env"]


def test_servers_refuse_to_start_without_their_credentials(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))} | {"LORAFLOW_HOME": str(tmp_path)}
    for script, var in (
        ("infra/prefect-server.sh", "PREFECT_SERVER_API_AUTH_STRING"),
        ("infra/mlflow-server.sh", "MLFLOW_AUTH_ADMIN_USERNAME"),
        ("infra/s3-server.sh", "AWS_ACCESS_KEY_ID"),
        ("infra/postgres.sh", "POSTGRES_PREFECT_PASSWORD"),
    ):  # fmt: skip
        done = subprocess.run([script], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        assert done.returncode != 0 and var in done.stderr, (script, done.stderr)
    done = subprocess.run(["infra/local-stack.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "infra/new-credentials.sh" in done.stderr
    for script in ("mlflow-server.sh", "prefect-server.sh", "s3-server.sh"):
        text = (INFRA / script).read_text()  # loopback unless the user says otherwise
        assert re.search(r'_HOST:-127\.0\.0\.1\}', text), script
    assert "--app-name basic-auth" in (INFRA / "mlflow-server.sh").read_text()
    assert "-c listen_addresses=127.0.0.1 " in (INFRA / "postgres.sh").read_text()  # only


def test_env_sh_holds_no_secret_and_names_the_credentials_file():
    text = (INFRA / "env.sh").read_text()
    assert "LORAFLOW_CREDENTIALS_FILE" in text and "AWS_ENDPOINT_URL" in text
    for var in ("PASSWORD=", "AUTH_STRING=", "SECRET_ACCESS_KEY="):
        assert not re.search(rf"^export \w*{var}", text, re.M), var


def test_commands_the_stack_runs_exist():
    services = compose()["services"]
    for name in ("worker-cpu", "worker-gpu", "deploy", "mlflow"):
        script = ROOT / services[name]["command"].split()[0]
        assert script.is_file() and os.access(script, os.X_OK), script
    for line in (INFRA / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            assert (ROOT / line.split()[1]).exists(), line


def test_scripts_parse_and_refuse_to_run_without_a_server():
    for script in INFRA.glob("*.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    for args in (["infra/deploy.sh"], ["infra/worker.sh", "gpu"]):
        done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode != 0 and "PREFECT_API_URL" in done.stderr
    done = subprocess.run(
        ["infra/worker.sh", "tpu"], cwd=ROOT, env=env | {"PREFECT_API_URL": "http://x/api"},
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2 and "cpu or gpu" in done.stderr
    worker = (INFRA / "worker.sh").read_text()  # one training run per gpu worker
    assert re.search(r"gpu\) limit=1 ", worker) and '--limit "$limit"' in worker

    assert re.search(r"exec python -m loraflow.credentials --wait \S+ -- \\\n  prefect", worker)
    assert 'PREFECT_HOME="${PREFECT_HOME:-$LORAFLOW_HOME/prefect}"' in worker


def test_new_credentials_runs_nothing_that_its_files_hold(tmp_path):
    """Its files' comments name commands in backticks (`loraflow models`): written through an
    unquoted heredoc, the shell ran them (a registry error and a stray mlflow.db)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ran = tmp_path / "ran"
    for command in ("loraflow", "mlflow", "prefect"):
        (bin_dir / command).write_text(f"#!/bin/sh\necho {command} >> {ran}\n")
        (bin_dir / command).chmod(0o755)
    env = os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    subprocess.run(["infra/new-credentials.sh", str(tmp_path / "secrets")], cwd=ROOT, env=env,
                   check=True, capture_output=True)  # fmt: skip
    assert not ran.exists(), f"new-credentials.sh ran {ran.read_text()}"
    assert "(dashboards, `loraflow models`)" in (tmp_path / "secrets" / "reader.env").read_text()
    for script in INFRA.glob("*.sh"):  # no script writes through a heredoc the shell expands
        for line in script.read_text().splitlines():
            if "<<" in line and not line.lstrip().startswith("#"):
                assert re.search(r"<<-?\s*'\w+'", line), f"{script.name}: {line.strip()}"


def test_every_infra_file_the_docs_and_scripts_name_exists():
    """new-credentials.sh pointed at an infra/rotate-credentials.sh that never existed."""
    texts = [*INFRA.glob("*.sh"), *INFRA.glob("*.py"), INFRA / "README.md", INFRA / "compose.yaml",
             ROOT / "README.md", ROOT / "prefect.yaml", ROOT / "Makefile"]  # fmt: skip
    named = {(t.name, m) for t in texts for m in re.findall(r"\binfra/[\w.-]*\w", t.read_text())}
    assert len(named) > 20
    missing = sorted((where, m) for where, m in named if not (ROOT / m).exists())
    assert not missing, missing


def test_the_stack_environment_turns_prefect_telemetry_off_for_the_cli_too():
    """env.sh set PREFECT_SERVER_ANALYTICS_ENABLED=false, which the Prefect CLI and client do
    not read: their first-run telemetry notice still printed. DO_NOT_TRACK is theirs."""
    code = ("from prefect._internal.analytics.enabled import is_telemetry_enabled; "
            "print(is_telemetry_enabled())")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("DO_NOT_TRACK", "CI")}
    command = f'. infra/env.sh && {sys.executable} -c "{code}"'
    done = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=True)  # fmt: skip
    assert done.stdout.split()[-1] == "False"
    for script in ("deploy.sh", "worker.sh", "watch.sh", "prefect.sh", "local-stack.sh"):
        assert "DO_NOT_TRACK" in (INFRA / script).read_text(), script


def _stub_prefect(port: int, delay: float):
    """After `delay` s, a server on `port` that answers like Prefect with API auth: /health
    200, everything else 401 without credentials."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200 if self.path.endswith("/health") else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    servers = []

    def serve() -> None:
        time.sleep(delay)
        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        servers.append(server)
        server.serve_forever()

    threading.Thread(target=serve, daemon=True).start()
    return servers


def test_deploy_waits_for_a_prefect_server_that_is_still_starting(unused_port):
    """Run right after `infra/local-stack.sh &`, deploy.sh failed at once ("cannot be
    reached"): it now waits for the server, then goes on (here to the credential check)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "LORAFLOW_CREDENTIALS"))} | {
        "PREFECT_API_URL": f"http://127.0.0.1:{unused_port}/api"}  # fmt: skip
    servers = _stub_prefect(unused_port, delay=4)
    try:
        start = time.monotonic()
        done = subprocess.run(["infra/deploy.sh"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        took = time.monotonic() - start
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert "waiting up to 300 s for the servers to answer" in done.stderr
    assert done.returncode == 3 and "PREFECT_API_AUTH_STRING is not set" in done.stderr, (
        done.stderr)
    assert took >= 3
    done = subprocess.run(["infra/deploy.sh"], cwd=ROOT, env=env | {"STACK_WAIT_SECONDS": "1"},
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 3 and "cannot be reached" in done.stderr
    assert "(asked for 1 s)" in done.stderr


def test_stop_stops_the_watcher_then_the_workers_and_only_then_the_stack(tmp_path):
    """The documented `kill %4 %3 %2; kill %1` signalled the servers before the workers had
    stopped, and they logged connection errors on their way out. infra/stop.sh waits for each
    group to end before it signals the next."""
    home = tmp_path / "home"
    (home / "run").mkdir(parents=True)
    log = tmp_path / "events"
    stand_in = tmp_path / "stand_in.py"  # records when it got SIGTERM and when it ended
    stand_in.write_text(
        "import signal, sys, time\n"
        "name, linger = sys.argv[1], float(sys.argv[2])\n"  # argv[3:]: names for stop.sh
        "def note(what):\n"
        f"    open({str(log)!r}, 'a').write(f'{{time.monotonic():.3f}} {{name}} {{what}}\\n')\n"
        "def stop(*_):\n"
        "    note('term'); time.sleep(linger); note('exit'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('ready', flush=True)\n"
        "while True: time.sleep(1)\n"
    )
    stack_script = tmp_path / "local-stack.sh"  # its command line names local-stack.sh
    stack_script.write_text(f'#!/bin/sh\nexec {sys.executable} {stand_in} "$@" local-stack.sh\n')
    stack_script.chmod(0o755)
    started = {
        "watch": [sys.executable, str(stand_in), "watch", "0.5"],
        "worker-cpu": [sys.executable, str(stand_in), "worker-cpu", "2"],
        "worker-gpu": [sys.executable, str(stand_in), "worker-gpu", "1"],
        "stack": [str(stack_script), "stack", "0.5"],
    }
    processes = {}
    try:
        for name, args in started.items():
            processes[name] = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
            assert processes[name].stdout.readline().strip() == "ready"
            (home / "run" / f"{name}.pid").write_text(f"{processes[name].pid}\n")
        (home / "run" / "worker-gone.pid").write_text("999999\n")  # stale: skipped
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        done = subprocess.run(["infra/stop.sh"], cwd=ROOT, capture_output=True, text=True,
                              env=env | {"LORAFLOW_HOME": str(home)}, timeout=60)
        assert done.returncode == 0, done.stderr
        # no server to ask which runs are in flight: said, not waited for
        assert "PREFECT_API_URL is not set (. infra/env.sh): cannot see the runs" in done.stderr
    finally:
        for process in processes.values():
            process.kill()
            process.wait()
            process.stdout.close()
    events = [line.split() for line in log.read_text().splitlines()]
    when = {(name, what): float(t) for t, name, what in events}
    assert when["watch", "exit"] <= when["worker-cpu", "term"]
    assert max(when["worker-cpu", "exit"], when["worker-gpu", "exit"]) <= when["stack", "term"]
    assert ("stack", "exit") in when
    assert list((home / "run").iterdir()) == []
    assert done.stdout.index("the watcher stopped") < done.stdout.index("the workers stopped") \
        < done.stdout.index("the stack (MLflow, Prefect, S3, then PostgreSQL) stopped")


def test_stop_waits_for_the_flow_runs_in_flight_before_it_stops_the_workers(prefect_server):
    """A newcomer's trial: infra/stop.sh signalled the workers while one trained, and a Prefect
    worker's SIGTERM cuts off the runs it started. stop.sh now waits (infra/drain.py) until no
    flow run is pending, running or cancelling, up to a limit, and says which runs it waits for."""
    import threading

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Running

    from tasks.deployments import wait_for_runs_in_flight

    @flow(name="stand-in-training")
    def training() -> None:
        pass

    with get_client(sync_client=True) as client:
        finishing = client.create_flow_run(training, name="finishing", state=Running())
        said: list[str] = []
        threading.Timer(2.0, lambda: client.set_flow_run_state(
            finishing.id, Completed(), force=True)).start()
        start = time.monotonic()
        left = wait_for_runs_in_flight(60, poll_s=0.5, report_s=1, say=said.append)
        took = time.monotonic() - start
        assert left == [] and 2.0 <= took < 30, (left, took)
        assert said[0].startswith("waiting up to 60 s for 1 flow run: finishing (Running)"), said
        assert any("still in flight: 1 flow run: finishing" in line for line in said), said

        stuck = client.create_flow_run(training, name="stuck", state=Running())
        try:
            start = time.monotonic()
            left = wait_for_runs_in_flight(1.5, poll_s=0.5, say=said.append)
            assert [run.id for run in left] == [stuck.id]
            assert 1.5 <= time.monotonic() - start < 15
        finally:
            client.set_flow_run_state(stuck.id, Completed(), force=True)
        assert wait_for_runs_in_flight(1, say=said.append) == []


def test_the_local_s3_server_takes_only_requests_signed_with_the_stacks_key(tmp_path, unused_port):
    """moto alone took anonymous writes (PUT 200 with no credentials), and its request log
    printed every presigned URL with the access key id in it."""
    import boto3
    import botocore.config
    import requests
    from botocore.exceptions import ClientError

    key, secret = "loraflow-test-key", "test-secret-never-logged"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {
        "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "S3_PORT": str(unused_port),
        "S3_BUCKETS": "models data", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }  # fmt: skip
    log = tmp_path / "s3.log"
    with open(log, "w") as out:
        server = subprocess.Popen(["infra/s3-server.sh"], cwd=ROOT, env=env, stdout=out,
                                  stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{unused_port}"
    try:
        deadline = time.monotonic() + 60
        while "S3 ready at" not in log.read_text():
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)

        def client(key_id: str, key_secret: str):
            return boto3.client(
                "s3", endpoint_url=url, aws_access_key_id=key_id,
                aws_secret_access_key=key_secret, region_name="us-east-1",
                config=botocore.config.Config(signature_version="s3v4",
                                              retries={"max_attempts": 1}),
            )  # fmt: skip

        stack = client(key, secret)
        stack.put_object(Bucket="models", Key="a/b c.txt", Body=b"hello")
        assert stack.get_object(Bucket="models", Key="a/b c.txt")["Body"].read() == b"hello"
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(12 << 20))  # multipart with boto3's defaults
        stack.upload_file(str(big), "data", "big.bin")
        assert stack.head_object(Bucket="data", Key="big.bin")["ContentLength"] == 12 << 20
        signed = stack.generate_presigned_url("get_object", ExpiresIn=60,
                                              Params={"Bucket": "models", "Key": "a/b c.txt"})
        assert requests.get(signed, timeout=30).content == b"hello"
        assert requests.get(signed.replace("/models/", "/data/"), timeout=30).status_code == 403

        for method in ("put", "get", "delete"):  # anonymous, not even moto's own API
            assert requests.request(method, f"{url}/models/anon", data=b"x",
                                    timeout=30).status_code == 403  # fmt: skip
        assert requests.post(f"{url}/moto-api/reset", timeout=30).status_code == 403
        for key_id, key_secret, code in ((key, "wrong-secret", "SignatureDoesNotMatch"),
                                         ("someone-else", secret, "InvalidAccessKeyId")):
            try:
                client(key_id, key_secret).put_object(Bucket="models", Key="x", Body=b"1")
                raise AssertionError(f"{key_id} may write")
            except ClientError as exc:
                assert exc.response["Error"]["Code"] == code
        assert [o["Key"] for o in stack.list_objects_v2(Bucket="models")["Contents"]] == \
            ["a/b c.txt"]  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
    text = log.read_text()
    assert '"PUT /models/anon" 403' in text  # method, path, status ...
    assert key not in text and secret not in text and "X-Amz-" not in text  # ... nothing else


def test_a_backup_restores_byte_for_byte_and_refuses_a_damaged_one_or_a_stack_with_data(
    tmp_path, s3_env
):
    """infra/backup.py on SQLite stores and S3 (moto): restored into empty ones, every row and
    object comes back; a backup with a changed file restores nothing, and a stack that holds
    data is refused. (tests/test_auth.py restores a whole stack on PostgreSQL.)"""
    import sqlite3

    import boto3

    def stores(name: str) -> dict[str, str]:
        folder = tmp_path / name
        return {"PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{folder}/prefect.db",
                "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{folder}/mlflow.db",
                "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{folder}/auth.db"}  # fmt: skip

    def rows(env: dict[str, str]) -> dict[str, list]:
        return {var: sqlite3.connect(url.split(":///")[1]).execute("SELECT * FROM t").fetchall()
                for var, url in env.items()}  # fmt: skip

    def backup_py(action: str, folder: Path, env: dict[str, str]):
        return subprocess.run(
            [sys.executable, "infra/backup.py", action, str(folder)], cwd=ROOT, text=True,
            capture_output=True, timeout=120,
            env=os.environ | env | {"AWS_ENDPOINT_URL": s3_env, "BACKUP_BUCKETS": "models"},
        )  # fmt: skip

    old = stores("old")
    (tmp_path / "old").mkdir()
    for i, url in enumerate(old.values()):
        db = sqlite3.connect(url.split(":///")[1])
        db.execute("CREATE TABLE t (k TEXT, v TEXT)")
        db.executemany("INSERT INTO t VALUES (?, ?)", [(f"k{i}", "x" * 100), ("n", str(i))])
        db.commit()
    s3 = boto3.client("s3", endpoint_url=s3_env)
    weights = os.urandom(3 << 20)
    s3.put_object(Bucket="models", Key="m/1/model.safetensors", Body=weights)
    s3.put_object(Bucket="models", Key="m/2/model.safetensors", Body=weights)  # the same bytes
    backup = tmp_path / "backup"
    done = backup_py("backup", backup, old)
    assert done.returncode == 0, done.stderr
    assert "databases prefect, mlflow, mlflow_auth, 2 objects (6.3 MB)" in done.stdout
    assert len(list((backup / "objects").iterdir())) == 1  # one file per content
    assert backup.stat().st_mode & 0o077 == 0

    s3.delete_objects(Bucket="models", Delete={"Objects": [
        {"Key": "m/1/model.safetensors"}, {"Key": "m/2/model.safetensors"}]})  # fmt: skip
    done = backup_py("restore", backup, old)  # the old stores hold data: refused
    assert done.returncode == 1 and "prefect database is not empty" in done.stderr

    (object_file,) = (backup / "objects").iterdir()
    intact = object_file.read_bytes()
    object_file.write_bytes(intact[:-1] + b"\0")
    done = backup_py("restore", backup, stores("damaged"))
    assert done.returncode == 1
    assert f"{object_file} is missing or changed since the backup" in done.stderr
    assert not (tmp_path / "damaged").exists() and "Contents" not in s3.list_objects_v2(
        Bucket="models")  # fmt: skip

    object_file.write_bytes(intact)
    new = stores("new")
    done = backup_py("restore", backup, new)
    assert done.returncode == 0, done.stderr
    assert "restored (every SHA-256 checked)" in done.stdout
    assert rows(new) == rows(old)
    for key in ("m/1/model.safetensors", "m/2/model.safetensors"):
        assert s3.get_object(Bucket="models", Key=key)["Body"].read() == weights
    done = backup_py("restore", backup, stores("other"))  # the bucket holds them now: refused
    assert done.returncode == 1 and "bucket models is not empty" in done.stderr


def test_upgrade_databases_migrates_every_store_and_prints_their_revisions(tmp_path):
    """infra/upgrade-databases.sh on the SQLite stack (the PostgreSQL one, from MLflow 3.1.4 and
    Prefect 3.4.25 databases, is tried by hand: infra/README.md, "Upgrading MLflow or Prefect"):
    all three stores, the MLflow user store included, end at a revision, printed before/after."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env |= {"LORAFLOW_HOME": str(tmp_path), "STACK_DATABASE": "sqlite", "DO_NOT_TRACK": "1",
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # the venv's python
    subprocess.run(["infra/new-credentials.sh"], cwd=ROOT, env=env, check=True,
                   capture_output=True)  # fmt: skip
    done = subprocess.run(["infra/upgrade-databases.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    before, after = done.stdout.split("schema revisions before:\n")[1].split(
        "schema revisions after:\n")
    stores = ("MLflow tracking store", "MLflow user store", "Prefect database")
    for store in stores:
        assert f"  {store}: none (no database yet)" in before
        assert re.search(rf"^  {store}: [0-9a-f]{{12}}$", after, re.M), after
    assert "Warning" not in done.stderr, done.stderr
