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
    for name in ("worker-cpu", "worker-gpu", "watcher"):
        env = services[name]["environment"]
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api", name
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000", name
        assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    prefect_db = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://") and "@postgres:5432/" in prefect_db
    assert "postgresql://" in services["mlflow"]["command"]
    assert "s3://mlflow" in services["mlflow"]["command"]
    text = (INFRA / "compose.yaml").read_text()
    # passwords must be given by the user: ${VAR:?message}, never a default value
    for var in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD"):
        assert re.search(rf"\$\{{{var}:\?", text) and not re.search(rf"\$\{{{var}:-", text)
    assert services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]


def test_commands_the_stack_runs_exist():
    services = compose()["services"]
    for name in ("worker-cpu", "worker-gpu", "deploy"):
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
