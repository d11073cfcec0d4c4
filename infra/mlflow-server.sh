#!/usr/bin/env bash
# Start an MLflow tracking server on 127.0.0.1 with its basic-auth app: every request needs a
# user and password (MLFLOW_TRACKING_USERNAME/PASSWORD on the client side), users and their
# permissions live in the auth database (SQLite under $LORAFLOW_HOME by default,
# MLFLOW_AUTH_DATABASE_URI=postgresql://... for production). On the first start the server
# creates the admin from MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD (no defaults;
# infra/new-credentials.sh makes them); infra/mlflow-users.py then creates the pipeline and
# read-only users. Tracking data: SQLite under $LORAFLOW_HOME by default
# (MLFLOW_BACKEND_STORE_URI=postgresql://... for production); artifacts proxied to
# MLFLOW_ARTIFACTS_DESTINATION (a local folder by default, s3://bucket/prefix in production; for
# a non-AWS S3 set MLFLOW_S3_ENDPOINT_URL and the server's own AWS_ACCESS_KEY_ID/SECRET), so
# clients need no S3 credentials for MLflow. Plain HTTP on loopback: for other machines put a
# TLS proxy in front (infra/README.md), never bind 0.0.0.0 without one.
set -euo pipefail
home="${LORAFLOW_HOME:-$PWD/.loraflow}"
mkdir -p "$home"
auth_db="${MLFLOW_AUTH_DATABASE_URI:-sqlite:///$home/mlflow-auth.db}"
if [[ "$auth_db" != sqlite:///* ]] || [ ! -s "${auth_db#sqlite:///}" ]; then
  # a new user store: the admin must be given (MLflow refuses to start without it too)
  : "${MLFLOW_AUTH_ADMIN_USERNAME:?set MLFLOW_AUTH_ADMIN_USERNAME (infra/new-credentials.sh; source server.env)}"
  : "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD (12+ characters; infra/new-credentials.sh)}"
fi
# the CSRF secret of the auth app: the same across workers and restarts, private to the server
# MLflow before 3.16.1 reads the admin only from the ini file below, never from
# MLFLOW_AUTH_ADMIN_*: it stops at its start with KeyError 'admin_username' (seen with 3.1.4)
python - <<'PY' || exit 2
import importlib.metadata
import sys

from packaging.version import Version

version = importlib.metadata.version("mlflow")
if Version(version) < Version("3.16.1"):
    sys.exit(f"infra/mlflow-server.sh: MLflow {version} reads its admin only from an ini file;"
             " the stack needs MLflow 3.16.1 or later (constraints.txt pins the tested one)")
PY
secret_file="$home/mlflow-flask-secret"
if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
  [ -s "$secret_file" ] || (umask 077; python -c 'import secrets; print(secrets.token_hex(32))' > "$secret_file")
  MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$secret_file")"
  export MLFLOW_FLASK_SERVER_SECRET_KEY
fi
config="$home/mlflow-auth.ini"
(umask 077; printf '%s\n' \
  "[mlflow]" \
  "# Every signed-in user may read (dashboards); writing needs a grant or ownership: a user" \
  "# owns (MANAGE) what it creates, the admin everything. Anonymous requests are refused (401)." \
  "default_permission = READ" \
  "database_uri = $auth_db" \
  "authorization_function = mlflow.server.auth:authenticate_request_basic_auth" \
  "grant_default_workspace_access = false" > "$config")
export MLFLOW_AUTH_CONFIG_PATH="$config"
# the store by its variable, not an argument: a PostgreSQL URL holds a password, and every user
# of the machine can read a command line
export MLFLOW_BACKEND_STORE_URI="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$home/mlflow-server.db}"
exec mlflow server --app-name basic-auth \
  --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-2}" \
  --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-$home/mlflow-server-artifacts}"
