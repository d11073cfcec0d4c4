"""infra/: the compose stack's structure (no Docker engine runs here) and the scripts."""

import os
import re
import subprocess
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
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert mlflow["environment"]["MLFLOW_AUTH_DATABASE_URI"].startswith("postgresql://")
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

    assert "exec python -m loraflow.credentials -- \\\n  prefect" in worker  # the same pid
    assert 'PREFECT_HOME="${PREFECT_HOME:-$LORAFLOW_HOME/prefect}"' in worker
