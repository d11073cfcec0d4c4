#!/usr/bin/env bash
# Stop what infra/README.md started, in the order that loses nothing: the watcher (no new
# pipeline starts), then it waits until no flow run is in flight (infra/drain.py: up to
# STOP_DRAIN_SECONDS, 3600, saying which runs it waits for; Ctrl-C stops the waiting), because
# a Prefect worker's SIGTERM cuts off the runs it started; then the workers, and only once they
# are gone the servers (infra/local-stack.sh; PostgreSQL after the servers that use it), so no
# worker is left talking to a server that went away. Finds them by the pid files under
# $LORAFLOW_HOME/run; a file whose process is gone (or is something else now) is removed and
# skipped. A worker still running STOP_WAIT_SECONDS (60) after its SIGTERM gets a second one.
# The wait needs PREFECT_API_URL (. infra/env.sh) and the credentials file; without them the
# workers are stopped at once, with a warning.
set -euo pipefail
cd "$(dirname "$0")/.."
run="${LORAFLOW_HOME:-$PWD/.loraflow}/run"
wait_s="${STOP_WAIT_SECONDS:-60}"
drain_s="${STOP_DRAIN_SECONDS:-3600}"

running() {  # running PID: the process exists and has not ended (a zombie has)
  local state
  state="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

alive() {  # alive PIDFILE WORD: the pid in PIDFILE runs, and its command line holds WORD
  local pid
  pid="$(cat "$1" 2>/dev/null)" || return 1
  [ -n "$pid" ] && running "$pid" \
    && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$2"
}

stop() {  # stop WHAT WORD PIDFILE...: SIGTERM to each, wait until all are gone
  local what="$1" word="$2"; shift 2
  local pids=() file
  for file in "$@"; do
    [ -e "$file" ] || continue
    if alive "$file" "$word"; then pids+=("$(cat "$file")"); else rm -f "$file"; fi
  done
  [ "${#pids[@]}" -gt 0 ] || return 0
  echo "stopping $what (pid ${pids[*]}) ..."
  kill -TERM "${pids[@]}" 2>/dev/null || true
  local waited=0 signalled_again=0 left
  while :; do
    left=()
    for pid in "${pids[@]}"; do running "$pid" && left+=("$pid"); done
    [ "${#left[@]}" -eq 0 ] && break
    if [ "$waited" -ge "$((wait_s * 5))" ] && [ "$signalled_again" = 0 ]; then
      echo "$what still running after ${wait_s} s (pid ${left[*]}): a second signal stops" \
        "their runs" >&2
      kill -TERM "${left[@]}" 2>/dev/null || true
      signalled_again=1
    fi
    sleep 0.2
    waited=$((waited + 1))
  done
  rm -f "$@"
  echo "$what stopped"
}

drain() {  # wait for the flow runs in flight, if any worker is up to finish them
  local file busy=0
  for file in "$run"/worker-*.pid; do alive "$file" "worker" && busy=1; done
  [ "$busy" = 1 ] || return 0
  if [ -z "${PREFECT_API_URL:-}" ]; then
    echo "PREFECT_API_URL is not set (. infra/env.sh): cannot see the runs in flight; the" \
      "workers stop now and cut off any run they have" >&2
    return 0
  fi
  trap ':' INT  # Ctrl-C ends the waiting (drain.py says so), not this script
  python -m loraflow.credentials --no-mlflow -- python infra/drain.py --timeout "$drain_s" \
    || echo "stopping the workers without waiting further" >&2
  trap - INT
}

stop "the watcher" "watch" "$run/watch.pid"
shopt -s nullglob
drain
stop "the workers" "worker" "$run"/worker-*.pid
stop "the stack (MLflow, Prefect, S3, then PostgreSQL)" "local-stack.sh" "$run/stack.pid"
