"""Credentials: the file LORAFLOW_CREDENTIALS_FILE names, and the checks that stop a command at
once, naming the variable and never the value, when a server refuses (a stub server on
loopback answers as MLflow's basic auth and Prefect's API auth do; tests/test_auth.py runs the
real ones)."""

from __future__ import annotations

import base64
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from loraflow.credentials import (
    CredentialsError,
    check_mlflow,
    check_prefect,
    load_credentials,
    main,
    redact,
    safe_url,
    secret_values,
)

GOOD = "Basic " + base64.b64encode(b"pipeline:right-password-123").decode()


@pytest.fixture
def stub():
    """A server that wants GOOD on every path (401 otherwise), 403 for user `reader` on MLflow."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            auth = self.headers.get("Authorization", "")
            seen.append(self.path)
            reader = "Basic " + base64.b64encode(b"reader:reader-password-1").decode()
            code = 200 if auth == GOOD else 403 if auth == reader else 401
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_the_file_fills_what_the_environment_lacks_and_the_environment_wins(tmp_path):
    path = tmp_path / "pipeline.env"
    path.write_text(
        "# comment\n\nMLFLOW_TRACKING_USERNAME=pipeline\nexport MLFLOW_TRACKING_PASSWORD='a=b c'\n"
        'PREFECT_API_AUTH_STRING="u:p"\n'
    )
    path.chmod(0o600)
    env = {"LORAFLOW_CREDENTIALS_FILE": str(path), "MLFLOW_TRACKING_USERNAME": "operator"}
    assert load_credentials(env) == path
    assert env["MLFLOW_TRACKING_USERNAME"] == "operator"  # set before: kept
    assert env["MLFLOW_TRACKING_PASSWORD"] == "a=b c" and env["PREFECT_API_AUTH_STRING"] == "u:p"
    assert load_credentials({}) is None


def test_a_bad_file_is_an_error_naming_the_line_and_not_the_value(tmp_path, capsys):
    path = tmp_path / "c.env"
    path.write_text("MLFLOW_TRACKING_PASSWORD=fine\nDATABASE_PASSWORD=hunter2-secret\n")
    with pytest.raises(CredentialsError, match=r"c\.env:2: expected KEY=VALUE") as err:
        load_credentials({"LORAFLOW_CREDENTIALS_FILE": str(path)})
    assert "hunter2-secret" not in str(err.value)
    assert "can be read by other users" in capsys.readouterr().err  # mode 644 here
    with pytest.raises(CredentialsError, match="cannot read it"):
        load_credentials({"LORAFLOW_CREDENTIALS_FILE": str(tmp_path / "missing.env")})


def test_secrets_are_found_and_redacted_and_urls_lose_their_password():
    env = {"PREFECT_API_AUTH_STRING": "user:half-secret", "AWS_SECRET_ACCESS_KEY": "s3-secret",
           "MLFLOW_TRACKING_USERNAME": "pipeline"}  # fmt: skip
    assert set(secret_values(env)) == {"user:half-secret", "half-secret", "s3-secret"}
    assert redact("a half-secret and s3-secret", env) == "a *** and ***"
    assert safe_url("http://u:pw@host:9000/x") == "http://host:9000/x"
    assert safe_url("http://host/x") == "http://host/x"


def test_mlflow_check_names_the_variables_and_never_the_password(stub):
    url, seen = stub
    check_mlflow(url, {"MLFLOW_TRACKING_USERNAME": "pipeline",
                       "MLFLOW_TRACKING_PASSWORD": "right-password-123"})  # fmt: skip
    assert seen == ["/api/2.0/mlflow/experiments/search?max_results=1"]
    with pytest.raises(CredentialsError, match="MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD are not set"):  # noqa: E501
        check_mlflow(url, {})
    with pytest.raises(CredentialsError, match="MLFLOW_TRACKING_PASSWORD is not set"):
        check_mlflow(url, {"MLFLOW_TRACKING_USERNAME": "pipeline"})
    env = {"MLFLOW_TRACKING_USERNAME": "pipeline", "MLFLOW_TRACKING_PASSWORD": "wrong-one-xyz"}
    with pytest.raises(CredentialsError, match="refused MLFLOW_TRACKING_USERNAME='pipeline'") as e:
        check_mlflow(url, env)
    assert "wrong-one-xyz" not in str(e.value)
    env = {"MLFLOW_TRACKING_USERNAME": "reader", "MLFLOW_TRACKING_PASSWORD": "reader-password-1"}
    with pytest.raises(CredentialsError, match="user 'reader' may not read"):
        check_mlflow(url, env)
    check_mlflow("sqlite:///x.db", {})  # a local store: nothing to check


def test_prefect_check_names_the_auth_string_and_never_its_value(stub):
    url, seen = stub
    check_prefect(f"{url}/api", {"PREFECT_API_AUTH_STRING": "pipeline:right-password-123"})
    assert seen[-1] == "/api/admin/version"
    with pytest.raises(CredentialsError, match="PREFECT_API_AUTH_STRING is not set"):
        check_prefect(f"{url}/api", {})
    with pytest.raises(CredentialsError, match="refused PREFECT_API_AUTH_STRING") as err:
        check_prefect(f"{url}/api", {"PREFECT_API_AUTH_STRING": "pipeline:nope-nope"})
    assert "nope-nope" not in str(err.value)
    check_prefect(None, {})  # no server: the embedded one, nothing to check


def test_unreachable_servers_are_named(unused_port):
    dead = f"http://user:pw@127.0.0.1:{unused_port}"
    expected = f"MLFLOW_TRACKING_URI=http://127.0.0.1:{unused_port} cannot be reached"
    with pytest.raises(CredentialsError, match=expected) as e:
        check_mlflow(dead, {})
    assert "pw@" not in str(e.value)
    with pytest.raises(CredentialsError, match="cannot be reached"):
        check_prefect(f"http://127.0.0.1:{unused_port}/api", {})


def test_the_check_command_exits_3_with_the_message(stub, monkeypatch, capsys):
    url, _ = stub
    monkeypatch.delenv("LORAFLOW_CREDENTIALS_FILE", raising=False)
    monkeypatch.setenv("PREFECT_API_URL", f"{url}/api")
    monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
    assert main(["--no-mlflow"]) == 3
    assert "PREFECT_API_AUTH_STRING is not set" in capsys.readouterr().err
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "pipeline:right-password-123")
    assert main(["--no-mlflow"]) == 0


def test_the_command_it_becomes_gets_sigint_back_from_a_background_shell(tmp_path, monkeypatch):
    """A script's `worker.sh &` starts the worker with SIGINT ignored; a Python program then has
    no KeyboardInterrupt, and the Prefect worker (SIGTERM -> SIGINT to itself) ignored both."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    child = tmp_path / "child.py"
    child.write_text(
        "import os, signal, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: os.kill(os.getpid(), signal.SIGINT))\n"
        "try:\n    print('ready', flush=True)\n    time.sleep(60)\n"
        "except KeyboardInterrupt:\n    raise SystemExit(7)\n"
    )
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    root = Path(__file__).resolve().parents[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "loraflow.credentials", "--no-mlflow", "--no-prefect", "--",
         sys.executable, str(child)],
        cwd=root, env=os.environ | {"PYTHONPATH": str(root)}, stdout=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # noqa: PLW1509
    )  # fmt: skip
    try:
        assert process.stdout.readline().strip() == "ready"
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)  # the same pid: exec'd, not a child
        assert process.wait(timeout=20) == 7 and time.monotonic() - sent < 10
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
