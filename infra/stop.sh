#!/usr/bin/env bash
# Stop what infra/README.md started, in the order that loses nothing: the watcher, then the
# workers (each finishes or hands back the runs it started), and only once they are gone the
# servers (infra/local-stack.sh), so no worker is left talking to a server that went away.
# Finds them by the pid files under $LORAFLOW_HOME/run; a file whose process is gone (or is
# something else now) is removed and skipped. A worker still busy after STOP_WAIT_SECONDS (60)
# gets a second signal, which stops the flow runs it started.
set -euo pipefail
cd "$(dirname "$0")/.."
run="${LORAFLOW_HOME:-$PWD/.loraflow}/run"
wait_s="${STOP_WAIT_SECONDS:-60}"

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

stop "the watcher" "watch" "$run/watch.pid"
shopt -s nullglob
stop "the workers" "worker" "$run"/worker-*.pid
stop "the stack (S3, MLflow, Prefect)" "local-stack.sh" "$run/stack.pid"
