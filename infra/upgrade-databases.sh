#!/usr/bin/env bash
# After an upgrade of MLflow or Prefect (a new constraints.txt, then `make .venv/bin/loraflow`):
# bring the stack's databases to the new versions' schemas, with the stack stopped
# (infra/stop.sh). The MLflow server refuses to start on an older tracking schema ("Detected
# out-of-date database schema"): this runs `mlflow db upgrade` on it. Prefect's server would
# migrate its database at its next start anyway; this runs `prefect server database upgrade`
# now, so a failure shows here and not as a server that does not come up. MLflow's user store
# upgrades itself when the server starts. With STACK_DATABASE=postgresql (the default) it starts
# PostgreSQL alone for the while (its output in $LORAFLOW_HOME/logs/postgres.log) and stops it.
# Back up first (infra/backup.sh, while the stack still runs): a migration may not be undone.
set -euo pipefail
cd "$(dirname "$0")/.."
. infra/stack-env.sh
logs="$LORAFLOW_HOME/logs"
mkdir -p "$logs" "$LORAFLOW_HOME/prefect"
if [ "$STACK_DATABASE" = postgresql ]; then
  from="$(stat -c %s "$logs/postgres.log" 2>/dev/null || echo 0)"
  setsid infra/postgres.sh >>"$logs/postgres.log" 2>&1 </dev/null &
  db=$!
  trap 'kill -TERM -- "-$db" 2>/dev/null || true; wait "$db" 2>/dev/null || true' EXIT
  until tail -c "+$((from + 1))" "$logs/postgres.log" | grep -qF "PostgreSQL ready at"; do
    if ! kill -0 "$db" 2>/dev/null; then
      echo "infra/upgrade-databases.sh: PostgreSQL did not start; the end of $logs/postgres.log:" >&2
      tail -n 20 "$logs/postgres.log" >&2
      exit 1
    fi
    sleep 0.5
  done
fi
echo "upgrading the MLflow tracking store (mlflow db upgrade) ..."
# the URL given in-process: on a command line every user of the machine could read its password
python -c 'import os, mlflow.db
mlflow.db.upgrade.main([os.environ["MLFLOW_BACKEND_STORE_URI"]], standalone_mode=False)'
echo "upgrading the Prefect database (prefect server database upgrade) ..."
PREFECT_HOME="$LORAFLOW_HOME/prefect" prefect server database upgrade --yes
echo "databases upgraded; start the stack again: infra/local-stack.sh &"
