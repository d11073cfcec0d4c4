#!/usr/bin/env bash
# Start a Prefect server on 127.0.0.1 (SQLite under $LORAFLOW_HOME/prefect by default; set
# PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://... for PostgreSQL).
set -euo pipefail
export PREFECT_HOME="${PREFECT_HOME:-${LORAFLOW_HOME:-$PWD/.loraflow}/prefect}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
exec prefect server start --host "${PREFECT_HOST:-127.0.0.1}" --port "${PREFECT_PORT:-4200}"
