"""Real servers for integration tests, each in its own process group on 127.0.0.1 and a free
port: moto's S3-protocol server, `mlflow server` (SQLite backend, artifacts proxied to S3) and
PostgreSQL (infra/postgres.sh). `stop()` ends the whole group (mlflow server runs uvicorn as a
child), whatever happened."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

# The servers' database in the opt-in stack and reliability suites: postgresql (infra/postgres.sh,
# as in production; .ci/run) or sqlite (LORAFLOW_TEST_DATABASE=sqlite, without PostgreSQL)
DATABASE = os.environ.get("LORAFLOW_TEST_DATABASE", "postgresql")
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, args: list[str], port: int, env: dict[str, str], log: Path):
        self.name, self.args, self.port, self.env, self.log = name, args, port, env, log
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready_path: str = "/", timeout: float = 180.0) -> Server:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.args,
                env=os.environ | self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, ended as one in stop()
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited early; see {self.log}")
            try:
                urllib.request.urlopen(self.url + ready_path, timeout=1)
                return self
            except OSError as exc:
                if getattr(exc, "code", None):  # an HTTP error status: it answers
                    return self
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer on {self.url} in {timeout:.0f} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=5)  # uvicorn waits on keep-alive clients
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def moto(log_dir: Path, **env: str) -> Server:
    port = free_port()
    args = [sys.executable, "-c", "from moto.server import main; main()", "-p", str(port)]
    return Server("moto S3 server", args, port, env, log_dir / f"moto-{port}.log")


def mlflow_server(log_dir: Path, db: Path, artifacts: str, s3_endpoint: str) -> Server:
    port = free_port()
    args = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{db}",
        "--artifacts-destination", artifacts,
    ]  # fmt: skip
    env = {"MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "MLFLOW_DISABLE_TELEMETRY": "true"}
    return Server("mlflow server", args, port, env, log_dir / f"mlflow-{port}.log")


@contextlib.contextmanager
def prefect_database(log: Path) -> Iterator[dict[str, str]]:
    """The Prefect server's database setting for DATABASE: a PostgreSQL of its own (a new
    cluster, fresh passwords, data in a folder of /tmp: started by root, the server runs as
    user postgres, which cannot enter pytest's folders), stopped and removed afterwards; or
    nothing, for the Prefect server's own SQLite file."""
    if DATABASE == "sqlite":
        yield {}
        return
    port, password = free_port(), secrets.token_urlsafe(24)
    data = Path(tempfile.mkdtemp(prefix="loraflow-test-postgres-"))
    env = os.environ | {"POSTGRES_DATA": str(data), "POSTGRES_PORT": str(port),
                        "POSTGRES_PREFECT_PASSWORD": password,
                        "POSTGRES_MLFLOW_PASSWORD": secrets.token_urlsafe(24),
                        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # fmt: skip
    with open(log, "ab") as out:
        process = subprocess.Popen([str(ROOT / "infra" / "postgres.sh")], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "PostgreSQL ready at" not in log.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start; see {log}")
            time.sleep(0.2)
        url = f"postgresql+asyncpg://prefect:{password}@127.0.0.1:{port}/prefect"
        yield {"PREFECT_API_DATABASE_CONNECTION_URL": url}
    finally:
        stop_session(process, 60)  # SIGTERM: PostgreSQL's fast shutdown
        shutil.rmtree(data, ignore_errors=True)


def stop_session(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to a script started in its own session (it stops what it started), and its
    whole process group killed if it has not ended within `timeout` seconds."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
