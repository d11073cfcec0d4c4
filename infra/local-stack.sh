#!/usr/bin/env bash
# The production-like stack on one machine, all on 127.0.0.1 and all with authentication:
# PostgreSQL (infra/postgres.sh, port POSTGRES_PORT=5432: the databases of both servers; with
# STACK_DATABASE=sqlite, SQLite files instead: infra/stack-env.sh), S3 (infra/s3-server.sh:
# signed requests only, port S3_PORT=9000, buckets mlflow/models/data), an MLflow tracking
# server with its basic-auth app (port MLFLOW_PORT=5000, artifacts in s3://mlflow/artifacts), its
# users (admin, pipeline, reader: infra/mlflow-users.py) and, unless WITH_PREFECT=0, a Prefect
# server with API auth (port PREFECT_PORT=4200). Credentials: $LORAFLOW_HOME/secrets/server.env,
# made once by infra/new-credentials.sh (this script refuses to start without it). The servers
# write to $LORAFLOW_HOME/logs/*.log, not to this terminal. RESTORE_FROM=DIR first restores the
# backup infra/backup.sh made in DIR into this stack, which must be a fresh one (its databases
# and buckets empty), before MLflow and Prefect start. Prints `stack ready: ...` once every
# server answers. Stops them all on Ctrl-C, SIGTERM or infra/stop.sh (which stops the watcher
# and the workers first), or when one of them exits; PostgreSQL last.
set -euo pipefail
if [ -n "${RESTORE_FROM:-}" ]; then RESTORE_FROM="$(realpath "$RESTORE_FROM")"; fi
cd "$(dirname "$0")/.."
. infra/stack-env.sh
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true
unset MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD PREFECT_API_URL PREFECT_API_AUTH_STRING
s3_port="${S3_PORT:-9000}" mlflow_port="${MLFLOW_PORT:-5000}" prefect_port="${PREFECT_PORT:-4200}"
postgres_port="${POSTGRES_PORT:-5432}"
ports=("$s3_port" "$mlflow_port")
if [ "${WITH_PREFECT:-1}" = 1 ]; then ports+=("$prefect_port"); fi
if [ "$STACK_DATABASE" = postgresql ]; then ports+=("$postgres_port"); fi
for port in "${ports[@]}"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "infra/local-stack.sh: port $port on 127.0.0.1 is taken (another stack?); stop it" \
      "or choose other ports: S3_PORT, MLFLOW_PORT, PREFECT_PORT, POSTGRES_PORT (and" \
      "infra/env.sh reads them)" >&2
    exit 2
  fi
done
logs="$LORAFLOW_HOME/logs"
run="$LORAFLOW_HOME/run"
mkdir -p "$logs" "$run"
echo "$$" > "$run/stack.pid"  # infra/stop.sh stops the watcher and workers, then this

pids=()  # the servers
db_pid=""  # PostgreSQL: stopped after them, so none of them loses its database mid-request
stop_group() {  # stop_group SECONDS PID...: SIGTERM to each process group, SIGKILL after SECONDS
  local seconds="$1" pid alive; shift
  for pid in "$@"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for _ in $(seq "$((seconds * 5))"); do
    alive=0
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.2
  done
  for pid in "$@"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
stop_servers() {
  # each server is its own process group (setsid): MLflow's and Prefect's children stop too
  if [ "${#pids[@]}" -gt 0 ]; then stop_group 10 "${pids[@]}"; fi
  if [ -n "$db_pid" ]; then stop_group 60 "$db_pid"; fi  # a fast shutdown: a checkpoint
  wait 2>/dev/null || true
  rm -f "$run/stack.pid"
  echo "stack stopped"
}
trap stop_servers EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

start() {  # start NAME COMMAND...: in its own process group, its output to logs/NAME.log
  local name="$1"; shift
  touch "$logs/$name.log"  # now: a wait_for_line right after must not find it missing
  setsid "$@" >>"$logs/$name.log" 2>&1 < /dev/null &
  if [ "$name" = postgres ]; then db_pid=$!; else pids+=($!); fi
}

wait_for() {  # wait_for NAME PID URL WANT: until URL answers (WANT: any HTTP status, or 200)
  local name="$1" pid="$2" url="$3" want="$4" code
  for _ in $(seq "${STACK_START_SECONDS:-300}"); do
    code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" || true)"
    if [ "$want" = any ] && [ "$code" != 000 ]; then return 0; fi
    if [ "$code" = "$want" ]; then return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "infra/local-stack.sh: the $name server exited; the end of $logs/$name.log:" >&2
      tail -n 20 "$logs/$name.log" >&2
      exit 1
    fi
    sleep 1
  done
  echo "infra/local-stack.sh: the $name server did not answer at $url in" \
    "${STACK_START_SECONDS:-300} s; see $logs/$name.log" >&2
  exit 1
}

wait_for_line() {  # wait_for_line NAME PID TEXT FROM: until logs/NAME.log past byte FROM has TEXT
  local name="$1" pid="$2" text="$3" from="$4"
  for _ in $(seq "$((${STACK_START_SECONDS:-300} * 2))"); do
    tail -c "+$((from + 1))" "$logs/$name.log" | grep -qF -- "$text" && return 0
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "infra/local-stack.sh: $name exited; the end of $logs/$name.log:" >&2
      tail -n 20 "$logs/$name.log" >&2
      exit 1
    fi
    sleep 0.5
  done
  echo "infra/local-stack.sh: $name was not ready in ${STACK_START_SECONDS:-300} s; see" \
    "$logs/$name.log" >&2
  exit 1
}

echo "starting the stack on 127.0.0.1 (logs: $logs/{postgres,s3,mlflow,prefect}.log) ..."
if [ "$STACK_DATABASE" = postgresql ]; then
  from="$(stat -c %s "$logs/postgres.log" 2>/dev/null || echo 0)"
  POSTGRES_PORT="$postgres_port" start postgres infra/postgres.sh
  wait_for_line postgres "$db_pid" "PostgreSQL ready at" "$from"
else
  mkdir -p "$LORAFLOW_HOME/prefect"
fi
S3_PORT="$s3_port" S3_BUCKETS="mlflow models data" start s3 infra/s3-server.sh
wait_for s3 $! "http://127.0.0.1:$s3_port/" any  # anonymous: 403, i.e. it answers
if [ -n "${RESTORE_FROM:-}" ]; then
  echo "restoring the backup in $RESTORE_FROM ..."
  AWS_ENDPOINT_URL="http://127.0.0.1:$s3_port" python infra/backup.py restore "$RESTORE_FROM"
fi
MLFLOW_PORT="$mlflow_port" MLFLOW_S3_ENDPOINT_URL="http://127.0.0.1:$s3_port" \
MLFLOW_ARTIFACTS_DESTINATION=s3://mlflow/artifacts start mlflow infra/mlflow-server.sh
wait_for mlflow $! "http://127.0.0.1:$mlflow_port/health" 200
MLFLOW_TRACKING_URI="http://127.0.0.1:$mlflow_port" python infra/mlflow-users.py \
  >>"$logs/mlflow.log" 2>&1 || { echo "infra/local-stack.sh: infra/mlflow-users.py failed;" \
    "see $logs/mlflow.log" >&2; exit 1; }
ready="S3 http://127.0.0.1:$s3_port, MLflow http://127.0.0.1:$mlflow_port (users admin,"
ready+=" pipeline, reader)"
# Prefect last: once it answers, everything is ready (deploy.sh and the workers wait for it,
# and the workers' MLflow user exists by then)
if [ "${WITH_PREFECT:-1}" = 1 ]; then
  PREFECT_PORT="$prefect_port" start prefect infra/prefect-server.sh
  wait_for prefect $! "http://127.0.0.1:$prefect_port/api/health" 200
  ready+=", Prefect http://127.0.0.1:$prefect_port/api"
fi
echo "stack ready: $ready"
ports=""
for name in S3_PORT MLFLOW_PORT PREFECT_PORT POSTGRES_PORT; do
  [ -n "${!name:-}" ] && ports+="$name=${!name} "
done
# another shell reads the ports from its own environment: the non-default ones are named
echo "next, in this shell or another: ${ports:+export $ports; }. infra/env.sh; infra/deploy.sh (infra/README.md)"
set +e
wait -n "${pids[@]}" ${db_pid:+"$db_pid"}
echo "infra/local-stack.sh: a server exited; stopping the others (see $logs)" >&2
exit 1
