#!/usr/bin/env bash
# The production-like stack on one machine, all on 127.0.0.1 and all with authentication:
# S3 (moto, port 9000, buckets mlflow/models/data), an MLflow tracking server with its
# basic-auth app (port 5000, SQLite, artifacts in s3://mlflow/artifacts), its users (admin,
# pipeline, reader: infra/mlflow-users.py) and, unless WITH_PREFECT=0, a Prefect server with API
# auth (port 4200). Credentials: $LORAFLOW_HOME/secrets/server.env, made once by
# infra/new-credentials.sh (this script refuses to start without it). Ctrl-C stops them all.
# Then, in another shell: `. infra/env.sh` and infra/README.md "The stack, end to end".
set -euo pipefail
cd "$(dirname "$0")/.."
export LORAFLOW_HOME="${LORAFLOW_HOME:-$PWD/.loraflow}"
secrets="${LORAFLOW_SECRETS:-$LORAFLOW_HOME/secrets}"
if [ ! -s "$secrets/server.env" ]; then
  echo "infra/local-stack.sh: no $secrets/server.env; run infra/new-credentials.sh first" >&2
  exit 2
fi
set -a; . "$secrets/server.env"; set +a
# the servers' own S3 keys (moto accepts any key; MinIO and AWS check them)
export AWS_ACCESS_KEY_ID="$S3_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$S3_SECRET_KEY"
export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
unset MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD PREFECT_API_URL PREFECT_API_AUTH_STRING
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT
S3_PORT=9000 S3_BUCKETS="mlflow models data" infra/s3-server.sh & pids+=($!)
until curl -sf -o /dev/null "http://127.0.0.1:9000/data" 2>/dev/null; do sleep 0.5; done
MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:9000 \
MLFLOW_ARTIFACTS_DESTINATION=s3://mlflow/artifacts infra/mlflow-server.sh & pids+=($!)
until curl -sf -o /dev/null "http://127.0.0.1:${MLFLOW_PORT:-5000}/health"; do sleep 1; done
MLFLOW_TRACKING_URI="http://127.0.0.1:${MLFLOW_PORT:-5000}" python infra/mlflow-users.py
if [ "${WITH_PREFECT:-1}" = 1 ]; then infra/prefect-server.sh & pids+=($!); fi
wait -n
