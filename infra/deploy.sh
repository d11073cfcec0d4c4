#!/usr/bin/env bash
# Create the two process work pools and deploy everything in prefect.yaml (from the repo root).
# Needs PREFECT_API_URL (infra/env.sh) pointing at a running server (infra/prefect-server.sh).
# GPU_SLOTS=N caps the gpu pool at N concurrent training runs in all (e.g. the GPUs you have);
# each gpu worker also takes one run at a time (infra/worker.sh gpu). Safe to run again.
# PREFECT_API_AUTH_STRING from the environment or $LORAFLOW_CREDENTIALS_FILE, checked first.
set -euo pipefail
: "${PREFECT_API_URL:?set PREFECT_API_URL (. infra/env.sh) to a running Prefect server}"
if [ -z "${_LORAFLOW_CREDENTIALS_CHECKED:-}" ]; then  # once: load + check, then run this again
  export _LORAFLOW_CREDENTIALS_CHECKED=1
  exec python -m loraflow.credentials --no-mlflow -- bash "$0" "$@"
fi
cd "$(dirname "$0")/.."
# The finetune deployment accepts data_uri only under the watched location (prefect.yaml's
# allowed_data_prefixes: "{{ $WATCH_LOCATION }}", filled in now).
WATCH_LOCATION="${WATCH_LOCATION:-${LORAFLOW_HOME:-$PWD/.loraflow}/incoming}"
case "$WATCH_LOCATION" in s3://* | /*) ;; *) WATCH_LOCATION="$PWD/$WATCH_LOCATION" ;; esac
export WATCH_LOCATION
echo "deploy: data_uri allowed under $WATCH_LOCATION"
for pool in cpu gpu; do
  prefect --no-prompt work-pool inspect "$pool" >/dev/null 2>&1 \
    || prefect --no-prompt work-pool create "$pool" --type process
done
if [ -n "${GPU_SLOTS:-}" ]; then
  prefect --no-prompt work-pool set-concurrency-limit gpu "$GPU_SLOTS"
fi
prefect --no-prompt deploy --all --prefect-file "${PREFECT_FILE:-prefect.yaml}"
# Runs whose machine died are marked Crashed (and training is started again): see the file.
COLUMNS=250 prefect --no-prompt automation ls | grep -q crash-zombie-flow-runs \
  || prefect --no-prompt automation create --from-file infra/automations.yaml
