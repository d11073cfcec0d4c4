#!/usr/bin/env bash
# Start a Prefect server on 127.0.0.1 with API authentication: every API request must carry
# PREFECT_SERVER_API_AUTH_STRING ("user:password"; no default: infra/new-credentials.sh), which
# clients send as PREFECT_API_AUTH_STRING. SQLite under $LORAFLOW_HOME/prefect by default; for
# PostgreSQL give the URL: `infra/prefect-server.sh postgresql+asyncpg://user:pw@host/db`, or set
# PREFECT_API_DATABASE_CONNECTION_URL. Plain HTTP on loopback: for other machines put a TLS proxy
# in front (infra/README.md).
set -euo pipefail
if [ -n "${1:-}" ]; then export PREFECT_API_DATABASE_CONNECTION_URL="$1"; fi
: "${PREFECT_SERVER_API_AUTH_STRING:?set PREFECT_SERVER_API_AUTH_STRING=user:password (infra/new-credentials.sh; source server.env)}"
case "$PREFECT_SERVER_API_AUTH_STRING" in
  *:*) ;;
  *) echo "infra/prefect-server.sh: PREFECT_SERVER_API_AUTH_STRING must be user:password" >&2; exit 2 ;;
esac
export PREFECT_SERVER_API_AUTH_STRING
export PREFECT_HOME="${PREFECT_HOME:-${LORAFLOW_HOME:-$PWD/.loraflow}/prefect}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
# the server is itself: no client settings (the UI asks for the auth string in the browser)
unset PREFECT_API_URL PREFECT_API_AUTH_STRING
exec prefect server start --host "${PREFECT_HOST:-127.0.0.1}" --port "${PREFECT_PORT:-4200}"
