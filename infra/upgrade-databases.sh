#!/usr/bin/env bash
# After an upgrade of MLflow or Prefect (a new constraints.txt, then `make .venv/bin/loraflow`):
# bring the stack's databases to the new versions' schemas, with the stack stopped
# (infra/stop.sh). The MLflow server refuses to start on an older tracking schema ("Detected
# out-of-date database schema"): this runs `mlflow db upgrade` on it. Prefect's server would
# migrate its database at its next start anyway; this runs `prefect server database upgrade`
# now, so a failure shows here and not as a server that does not come up. MLflow's user store
# (basic auth) would migrate itself at the server's start too, but in each of its workers at
# once: it is upgraded here, alone. Each store's schema revision is printed before and after.
# With STACK_DATABASE=postgresql (the default) it starts PostgreSQL alone for the while (its
# output in $LORAFLOW_HOME/logs/postgres.log) and stops it.
# Back up first (infra/backup.sh, while the stack still runs): a migration may not be undone.
set -euo pipefail
cd "$(dirname "$0")/.."
. infra/stack-env.sh
logs="$LORAFLOW_HOME/logs"
mkdir -p "$logs" "$LORAFLOW_HOME/prefect"
if [ "$STACK_DATABASE" = postgresql ]; then
  touch "$logs/postgres.log"  # before the wait below reads it
  from="$(stat -c %s "$logs/postgres.log")"
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
# the URLs stay in-process: on a command line every user of the machine could read a password
revisions() {  # the alembic revision of each store, one line each (no URL, no password)
  python - <<'PY'
import os

import sqlalchemy

# MLflow before 3.6 kept the user store's revision in alembic_version, later in
# alembic_version_auth (and leaves the old table behind): the first table found is read
for name, var, tables in [
    ("MLflow tracking store", "MLFLOW_BACKEND_STORE_URI", ["alembic_version"]),
    ("MLflow user store", "MLFLOW_AUTH_DATABASE_URI", ["alembic_version_auth", "alembic_version"]),
    ("Prefect database", "PREFECT_API_DATABASE_CONNECTION_URL", ["alembic_version"]),
]:
    url = os.environ[var].replace("+asyncpg", "+psycopg2").replace("+aiosqlite", "")
    if url.startswith("sqlite:///") and not os.path.exists(url[len("sqlite:///"):]):
        print(f"  {name}: none (no database yet)")
        continue
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            found = [t for t in tables if sqlalchemy.inspect(conn).has_table(t)]
            revision = "none (no schema yet)"
            if found:
                revision = conn.execute(sqlalchemy.text(f"SELECT version_num FROM {found[0]}")).scalar()
    finally:
        engine.dispose()
    print(f"  {name}: {revision}")
PY
}
echo "schema revisions before:"
revisions
echo "upgrading the MLflow tracking store (mlflow db upgrade) ..."
python -c 'import os, mlflow.db
mlflow.db.upgrade.main([os.environ["MLFLOW_BACKEND_STORE_URI"]], standalone_mode=False)'
echo "upgrading the MLflow user store (basic auth) ..."
# -W ignore: importing mlflow.server prints a Starlette deprecation notice, not ours to act on
python -W ignore -c 'import os, sqlalchemy
from mlflow.server.auth.db import utils
engine = sqlalchemy.create_engine(os.environ["MLFLOW_AUTH_DATABASE_URI"])
utils.migrate(engine, "head")
engine.dispose()'
echo "upgrading the Prefect database (prefect server database upgrade) ..."
PREFECT_HOME="$LORAFLOW_HOME/prefect" prefect server database upgrade --yes
echo "schema revisions after:"
revisions
echo "databases upgraded; start the stack again: infra/local-stack.sh &"
