#!/usr/bin/env bash
# Start an MLflow tracking server on 127.0.0.1: SQLite backend under $LORAFLOW_HOME by default
# (MLFLOW_BACKEND_STORE_URI=postgresql://... for production), artifacts proxied to
# MLFLOW_ARTIFACTS_DESTINATION (a local folder by default, s3://bucket/prefix in production;
# with a non-AWS S3 endpoint set MLFLOW_S3_ENDPOINT_URL, e.g. http://127.0.0.1:9000 for
# infra/s3-server.sh). Clients then need no S3 credentials for MLflow artifacts: the server
# proxies them.
set -euo pipefail
home="${LORAFLOW_HOME:-$PWD/.loraflow}"
mkdir -p "$home"
exec mlflow server --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" \
  --backend-store-uri "${MLFLOW_BACKEND_STORE_URI:-sqlite:///$home/mlflow-server.db}" \
  --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-$home/mlflow-server-artifacts}"
