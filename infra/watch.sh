#!/usr/bin/env bash
# Watch where new training data lands (a directory or s3://bucket/prefix, WATCH_LOCATION) and
# emit loraflow.data.landed per new file; prefect.yaml's trigger then starts `finetune` on it.
# Replaces this shell (same pid, in $LORAFLOW_HOME/run/watch.pid for infra/stop.sh).
set -euo pipefail
: "${PREFECT_API_URL:?set PREFECT_API_URL (. infra/env.sh) to a running Prefect server}"
location="${1:-${WATCH_LOCATION:?usage: infra/watch.sh DIR|s3://bucket/prefix}}"
export LORAFLOW_HOME="${LORAFLOW_HOME:-$PWD/.loraflow}" DO_NOT_TRACK="${DO_NOT_TRACK:-1}"
mkdir -p "$LORAFLOW_HOME/run"
echo "$$" > "$LORAFLOW_HOME/run/watch.pid"
exec loraflow watch "$location" --interval "${WATCH_INTERVAL:-10}"
