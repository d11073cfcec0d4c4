#!/usr/bin/env bash
# Create the two process work pools and deploy everything in prefect.yaml (from the repo root).
# Needs PREFECT_API_URL (infra/env.sh) pointing at a Prefect server (infra/local-stack.sh or
# infra/prefect-server.sh); one still starting is waited for, up to STACK_WAIT_SECONDS (300).
# GPU_SLOTS=N caps the gpu pool at N concurrent training runs in all (e.g. the GPUs you have);
# each gpu worker also takes one run at a time (infra/worker.sh gpu). Safe to run again.
# GPU_POOL_TYPE=kubernetes makes the gpu pool a Kubernetes one (infra/kubernetes/gpu-job-template.json).
# PREFECT_API_AUTH_STRING from the environment or $LORAFLOW_CREDENTIALS_FILE, checked first.
set -euo pipefail
: "${PREFECT_API_URL:?set PREFECT_API_URL (. infra/env.sh) to a running Prefect server}"
export DO_NOT_TRACK="${DO_NOT_TRACK:-1}"  # no Prefect telemetry (nor its first-run notice)
if [ -z "${_LORAFLOW_CREDENTIALS_CHECKED:-}" ]; then  # once: load + check, then run this again
  export _LORAFLOW_CREDENTIALS_CHECKED=1
  exec python -m loraflow.credentials --no-mlflow --wait "${STACK_WAIT_SECONDS:-300}" \
    -- bash "$0" "$@"
fi
cd "$(dirname "$0")/.."
# The finetune deployment accepts data_uri only under the watched location (prefect.yaml's
# allowed_data_prefixes: "{{ $WATCH_LOCATION }}", filled in now).
WATCH_LOCATION="${WATCH_LOCATION:-${LORAFLOW_HOME:-$PWD/.loraflow}/incoming}"
case "$WATCH_LOCATION" in s3://* | /*) ;; *) WATCH_LOCATION="$PWD/$WATCH_LOCATION" ;; esac
export WATCH_LOCATION
# a local one now, so files may land before the watcher's first poll (best effort: in compose
# the deploy container does not hold the watched folder)
case "$WATCH_LOCATION" in s3://*) ;; *) mkdir -p "$WATCH_LOCATION" 2>/dev/null || true ;; esac
echo "deploy: data_uri allowed under $WATCH_LOCATION"
# Prefect's own output (and its hints, which lack the credentials) goes to a log file; shown
# when a step fails.
log="${LORAFLOW_HOME:-$PWD/.loraflow}/logs/deploy.log"
mkdir -p "$(dirname "$log")"
: > "$log"
step() {  # step PREFECT-ARGS...: prefect, its output to the log; on failure the log, exit 1
  if ! COLUMNS=250 prefect --no-prompt "$@" >>"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "infra/deploy.sh: \`prefect $*\` failed (its output above and in $log)" >&2
    exit 1
  fi
}
for pool in cpu gpu; do
  type=process options=()
  # GPU_POOL_TYPE=kubernetes: the gpu steps as Kubernetes jobs (infra/kubernetes/, README there)
  if [ "$pool" = gpu ] && [ "${GPU_POOL_TYPE:-process}" = kubernetes ]; then
    type=kubernetes options=(--base-job-template infra/kubernetes/gpu-job-template.json)
  fi
  if prefect --no-prompt work-pool inspect "$pool" >/dev/null 2>&1; then
    echo "deploy: work pool $pool exists"
  else
    step work-pool create "$pool" --type "$type" "${options[@]}"
    echo "deploy: work pool $pool created ($type)"
  fi
done
if [ -n "${GPU_SLOTS:-}" ]; then
  step work-pool set-concurrency-limit gpu "$GPU_SLOTS"
  echo "deploy: the gpu pool runs at most $GPU_SLOTS at once"
fi
step deploy --all --prefect-file "${PREFECT_FILE:-prefect.yaml}"
sed -n "s/.*Deployment '\([^']*\)' successfully \([a-z]*\).*/deploy: deployment \1 \2/p" "$log"
# Runs whose machine died are marked Crashed (and training is started again): see the file.
# Replaced on every deploy (any of that name), so a changed file takes effect.
python - <<'PY' >>"$log" 2>&1 || { tail -n 20 "$log" >&2; exit 1; }
from prefect.client.orchestration import get_client

with get_client(sync_client=True) as client:
    for old in client.read_automations_by_name("crash-zombie-flow-runs"):
        client.delete_automation(old.id)
        print(f"deleted automation {old.id}")
PY
step automation create --from-file infra/automations.yaml
echo "deploy: automation crash-zombie-flow-runs (infra/automations.yaml)"
echo "deployed. Next: the workers (infra/worker.sh cpu &, infra/worker.sh gpu &), then a run by"
echo "hand: infra/prefect.sh deployment run finetune/finetune --watch"
