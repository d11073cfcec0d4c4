#!/usr/bin/env bash
# Start a Prefect server on 127.0.0.1 (SQLite under $LORAFLOW_HOME/prefect by default; for
# PostgreSQL give the URL: `infra/prefect-server.sh postgresql+asyncpg://user:pw@host/db`, or set
# PREFECT_API_DATABASE_CONNECTION_URL).
set -euo pipefail
if [ -n "${1:-}" ]; then export PREFECT_API_DATABASE_CONNECTION_URL="$1"; fi
export PREFECT_HOME="${PREFECT_HOME:-${LORAFLOW_HOME:-$PWD/.loraflow}/prefect}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
exec prefect server start --host "${PREFECT_HOST:-127.0.0.1}" --port "${PREFECT_PORT:-4200}"
