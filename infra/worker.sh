#!/usr/bin/env bash
# Start one process worker: `infra/worker.sh cpu` (pipelines) or `infra/worker.sh gpu`
# (every step that loads the model: training, evaluation, merge; one run at a time per
# worker: start one per GPU machine, or one per GPU with
# CUDA_VISIBLE_DEVICES=i). Run from the repo root with the env of infra/env.sh, so its flow
# runs reach the same Prefect server, MLflow tracking server and object storage.
# Credentials (PREFECT_API_AUTH_STRING, MLFLOW_TRACKING_USERNAME/PASSWORD, AWS_ACCESS_KEY_ID/
# AWS_SECRET_ACCESS_KEY) come from the environment or the file $LORAFLOW_CREDENTIALS_FILE
# names; they are checked against the servers first (a server still starting is waited for, up
# to STACK_WAIT_SECONDS, 300), and the worker does not start if one is missing or refused. The
# worker replaces this shell (same process): SIGTERM/SIGINT reach it; infra/stop.sh finds it by
# $LORAFLOW_HOME/run/worker-NAME.pid.
set -euo pipefail
cd "$(dirname "$0")/.."
pool="${1:?usage: infra/worker.sh cpu|gpu}"
: "${PREFECT_API_URL:?set PREFECT_API_URL (. infra/env.sh) to a running Prefect server}"
case "$pool" in
  cpu) limit="${CPU_WORKER_LIMIT:-2}" ;;
  gpu) limit=1 ;;  # one run (training, evaluation or merge) per GPU worker
  *) echo "infra/worker.sh: pool must be cpu or gpu, not '$pool'" >&2; exit 2 ;;
esac
export LORAFLOW_HOME="${LORAFLOW_HOME:-$PWD/.loraflow}"
# the worker's and its flow runs' Prefect home (task results, settings): under the loraflow
# home, so `make clean` removes them too
export PREFECT_HOME="${PREFECT_HOME:-$LORAFLOW_HOME/prefect}"
export DO_NOT_TRACK="${DO_NOT_TRACK:-1}"  # no Prefect telemetry (nor its first-run notice)
name="${WORKER_NAME:-$pool-$(hostname)${CUDA_VISIBLE_DEVICES:+-gpu$CUDA_VISIBLE_DEVICES}}"
mkdir -p "$LORAFLOW_HOME/run"
echo "$$" > "$LORAFLOW_HOME/run/worker-$name.pid"  # this pid becomes the worker's (exec)
exec python -m loraflow.credentials --wait "${STACK_WAIT_SECONDS:-300}" -- \
  prefect --no-prompt worker start --pool "$pool" --type process --limit "$limit" \
  --name "$name"
