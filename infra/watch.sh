#!/usr/bin/env bash
# Watch where new training data lands (a directory or s3://bucket/prefix, WATCH_LOCATION) and
# emit loraflow.data.landed per new file; prefect.yaml's trigger then starts `finetune` on it.
set -euo pipefail
: "${PREFECT_API_URL:?set PREFECT_API_URL (. infra/env.sh) to a running Prefect server}"
exec loraflow watch "${1:-${WATCH_LOCATION:?usage: infra/watch.sh DIR|s3://bucket/prefix}}" \
  --interval "${WATCH_INTERVAL:-10}"
