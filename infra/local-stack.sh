#!/usr/bin/env bash
# The production-like stack on one machine, all on 127.0.0.1: S3 (moto, port 9000), an MLflow
# tracking server (port 5000, SQLite, artifacts in s3://mlflow/artifacts) and, unless
# WITH_PREFECT=0, a Prefect server (port 4200). Ctrl-C stops them all. Then, in another shell:
#   . infra/env.sh
#   loraflow run storage.root=s3://models/loraflow storage.endpoint_url=http://127.0.0.1:9000
set -euo pipefail
cd "$(dirname "$0")/.."
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-local}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-local-secret}"
export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT
S3_PORT=9000 infra/s3-server.sh & pids+=($!)
until curl -sf -o /dev/null "http://127.0.0.1:9000/mlflow" 2>/dev/null; do sleep 0.5; done
MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:9000 \
MLFLOW_ARTIFACTS_DESTINATION=s3://mlflow/artifacts infra/mlflow-server.sh & pids+=($!)
if [ "${WITH_PREFECT:-1}" = 1 ]; then infra/prefect-server.sh & pids+=($!); fi
wait -n
