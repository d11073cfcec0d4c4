"""Credentials for the servers loraflow talks to, and a check that they work, before any work.

Every credential comes from the environment, or from a file that the environment names
(LORAFLOW_CREDENTIALS_FILE: KEY=VALUE lines, `#` comments, as in a Docker env file), never
from a config file, a flow parameter or a command line:

  MLflow tracking server   MLFLOW_TRACKING_USERNAME + MLFLOW_TRACKING_PASSWORD (basic auth)
                           or MLFLOW_TRACKING_TOKEN (a bearer token)
  Prefect server           PREFECT_API_AUTH_STRING ("user:password"; PREFECT_API_KEY for Cloud)
  S3 object storage        AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY (or the rest of the AWS
                           chain: AWS_PROFILE, ~/.aws, instance roles)

`check_services()` asks each configured server one cheap authenticated question and turns a
refusal into CredentialsError naming the variables to fix. No message here ever holds a secret
value: only variable names, user names and URLs (with any user:password part removed).
No Prefect or MLflow import: this runs before either reads its settings.
"""

from __future__ import annotations

import base64
import os
import signal
import stat
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

CREDENTIALS_FILE = "LORAFLOW_CREDENTIALS_FILE"
# the variables a credentials file may set: the secrets and the names that go with them
ALLOWED = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "PREFECT_API_AUTH_STRING",
    "PREFECT_API_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)
SECRETS = (
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "PREFECT_API_AUTH_STRING",
    "PREFECT_API_KEY",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)
TIMEOUT = 15.0  # seconds for each check: a loaded server still answers, a dead one fails


class CredentialsError(RuntimeError):
    """Credentials are missing, unreadable or refused; the message names what to set."""


class UnreachableError(CredentialsError):
    """A server did not answer at all (not started yet, or the URL is wrong)."""


def load_credentials(env: MutableMapping[str, str] | None = None) -> Path | None:
    """Read the file LORAFLOW_CREDENTIALS_FILE names (if set) into env (os.environ by default).
    A variable already set in the environment wins over the file, so one can be overridden
    for one command. Returns the file read, or None."""
    env = os.environ if env is None else env
    name = env.get(CREDENTIALS_FILE)
    if not name:
        return None
    path = Path(name).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CredentialsError(
            f"{CREDENTIALS_FILE}={path}: cannot read it ({exc.strerror}). Fix: point "
            f"{CREDENTIALS_FILE} at a readable file of KEY=VALUE lines, or unset it and export "
            "the variables themselves."
        ) from None
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO) and os.name == "posix":
        print(
            f"loraflow: warning: {path} can be read by other users; `chmod 600 {path}`",
            file=sys.stderr,
        )
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        key = key.strip()
        if not sep or key not in ALLOWED:
            raise CredentialsError(
                f"{path}:{number}: expected KEY=VALUE with KEY one of {', '.join(ALLOWED)}; "
                f"got {key!r}{'' if sep else ' without ='}. (Other settings belong in the "
                "environment or the run config, not in the credentials file.)"
            )
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env.setdefault(key, value)
    return path


def secret_values(env: MutableMapping[str, str] | None = None) -> list[str]:
    """The secret values configured now (for redaction and leak checks), longest first."""
    env = os.environ if env is None else env
    found = {env[k] for k in SECRETS if env.get(k)}
    auth = env.get("PREFECT_API_AUTH_STRING", "")
    if ":" in auth:  # the password half alone must not leak either
        found.add(auth.partition(":")[2])
    return sorted((s for s in found if len(s) >= 4), key=len, reverse=True)


def redact(text: str, env: MutableMapping[str, str] | None = None) -> str:
    for secret in secret_values(env):
        text = text.replace(secret, "***")
    return text


def safe_url(url: str) -> str:
    """url without a user:password@ part."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def _get(  # noqa: ANN202 - a requests.Response
    base: str, path: str, headers: dict[str, str], what: str, variable: str,
    verify: bool | str = True,
):  # fmt: skip
    import requests  # MLflow's and Prefect's dependency; imported only for a check

    try:
        return requests.get(base.rstrip("/") + path, headers=headers, timeout=TIMEOUT,
                            verify=verify)  # fmt: skip
    except requests.exceptions.SSLError as exc:
        raise CredentialsError(
            f"{what} at {safe_url(base)}: the TLS certificate was not accepted "
            f"({type(exc).__name__}). Fix: use the proxy's trusted certificate (for MLflow "
            "MLFLOW_TRACKING_SERVER_CERT_PATH, for Prefect SSL_CERT_FILE)."
        ) from None
    except requests.exceptions.RequestException as exc:
        raise UnreachableError(
            f"{what} at {variable}={safe_url(base)} cannot be reached ({type(exc).__name__}). "
            f"Fix: start the server (infra/README.md) or correct {variable}."
        ) from None


def mlflow_headers(env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    env = os.environ if env is None else env
    if env.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {env['MLFLOW_TRACKING_TOKEN']}"}
    user, password = env.get("MLFLOW_TRACKING_USERNAME"), env.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}
    return {}


def check_mlflow(uri: str | None = None, env: MutableMapping[str, str] | None = None) -> None:
    """An http(s) tracking server answers an authenticated read; a local store needs nothing."""
    env = os.environ if env is None else env
    uri = uri or env.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return
    user, password = env.get("MLFLOW_TRACKING_USERNAME"), env.get("MLFLOW_TRACKING_PASSWORD")
    if bool(user) != bool(password):
        missing = "MLFLOW_TRACKING_PASSWORD" if user else "MLFLOW_TRACKING_USERNAME"
        raise CredentialsError(f"MLflow at {safe_url(uri)}: {missing} is not set. {_FIX_MLFLOW}")
    verify: bool | str = env.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or (
        env.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() != "true"
    )
    response = _get(
        uri, "/api/2.0/mlflow/experiments/search?max_results=1", mlflow_headers(env),
        "the MLflow tracking server", "MLFLOW_TRACKING_URI", verify,
    )  # fmt: skip
    if response.status_code == 401:
        given = "MLFLOW_TRACKING_TOKEN" if env.get("MLFLOW_TRACKING_TOKEN") else (
            f"MLFLOW_TRACKING_USERNAME={user!r} / MLFLOW_TRACKING_PASSWORD" if user else None
        )
        why = f"refused {given} (401: wrong or expired)" if given else (
            "asks for credentials and MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD are "
            "not set (401)"
        )
        raise CredentialsError(f"MLflow at {safe_url(uri)} {why}. {_FIX_MLFLOW}")
    if response.status_code == 403:
        raise CredentialsError(
            f"MLflow at {safe_url(uri)}: user {user!r} may not read experiments (403). Fix: "
            "grant the user READ or more (infra/mlflow-users.py) or use the pipeline's user."
        )
    if response.status_code >= 400:
        raise CredentialsError(
            f"MLflow at {safe_url(uri)} answered {response.status_code} to a read; is "
            "MLFLOW_TRACKING_URI the tracking server's address?"
        )


_FIX_MLFLOW = (
    "Fix: export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or put them in the file "
    f"${CREDENTIALS_FILE} names); infra/README.md says how users are created and rotated."
)


def check_prefect(api_url: str | None = None, env: MutableMapping[str, str] | None = None) -> None:
    """A Prefect server at PREFECT_API_URL answers an authenticated request (no URL: the
    embedded temporary server, nothing to check)."""
    env = os.environ if env is None else env
    api_url = api_url or env.get("PREFECT_API_URL", "")
    if not api_url:
        return
    headers = {}
    if env.get("PREFECT_API_AUTH_STRING"):
        token = base64.b64encode(env["PREFECT_API_AUTH_STRING"].encode()).decode()
        headers = {"Authorization": f"Basic {token}"}
    elif env.get("PREFECT_API_KEY"):
        headers = {"Authorization": f"Bearer {env['PREFECT_API_KEY']}"}
    response = _get(api_url, "/admin/version", headers, "the Prefect server", "PREFECT_API_URL")
    if response.status_code in (401, 403):
        why = (
            f"refused PREFECT_API_AUTH_STRING ({response.status_code}: wrong or rotated)"
            if headers
            else f"asks for credentials and PREFECT_API_AUTH_STRING is not set "
            f"({response.status_code})"
        )
        raise CredentialsError(
            f"Prefect at {safe_url(api_url)} {why}. Fix: export PREFECT_API_AUTH_STRING="
            f"user:password as the server's PREFECT_SERVER_API_AUTH_STRING (or put it in the "
            f"file ${CREDENTIALS_FILE} names)."
        )
    if response.status_code >= 400:
        raise CredentialsError(
            f"Prefect at {safe_url(api_url)} answered {response.status_code}; PREFECT_API_URL "
            "must end in /api (e.g. http://127.0.0.1:4200/api)."
        )


def check_services(mlflow: bool = True, prefect: bool = True) -> None:
    """Load the credentials file, then check each configured server; CredentialsError if one
    refuses."""
    load_credentials()
    if prefect:
        check_prefect()
    if mlflow:
        check_mlflow()


def main(argv: list[str] | None = None) -> int:
    """`python -m loraflow.credentials [--no-mlflow] [--no-prefect] [--wait S] [-- COMMAND ...]`:
    check, then (if given) replace this process with COMMAND, the credentials file loaded into
    its environment (infra/worker.sh starts the Prefect worker so). --wait S: a server that does
    not answer yet (a stack still starting) is asked again for up to S seconds."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[args.index("--") + 1 :] if "--" in args else []
    flags = args[: args.index("--")] if "--" in args else args
    wait = float(flags[flags.index("--wait") + 1]) if "--wait" in flags else 0.0
    deadline, waiting = time.monotonic() + wait, False
    while True:
        try:
            check_services(mlflow="--no-mlflow" not in flags, prefect="--no-prefect" not in flags)
            break
        except UnreachableError as exc:
            if time.monotonic() >= deadline:
                waited = f" (asked for {wait:g} s)" if wait else ""
                print(f"loraflow: {exc}{waited}", file=sys.stderr)
                return 3
            if not waiting:
                print(f"loraflow: waiting up to {wait:g} s for the servers to answer "
                      f"({str(exc).split(' cannot be reached')[0]} does not yet)",
                      file=sys.stderr, flush=True)  # fmt: skip
                waiting = True
            time.sleep(2)
        except CredentialsError as exc:
            print(f"loraflow: {exc}", file=sys.stderr)
            return 3
    if command:
        sys.stdout.flush()
        # A job started with `&` from a script inherits SIGINT ignored, and a Python program
        # started so installs no KeyboardInterrupt handler: the Prefect worker turns SIGTERM
        # into SIGINT to itself, so it then ignored both. Default dispositions for the command.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.execvp(command[0], command)  # same pid: signals reach the command itself
    return 0


if __name__ == "__main__":
    sys.exit(main())
