#!/usr/bin/env bash
# Back up the running stack into a new folder: `infra/backup.sh DIR`. Its databases (pg_dump of
# prefect, mlflow and mlflow_auth, or SQLite copies with STACK_DATABASE=sqlite), then every
# object of its buckets (BACKUP_BUCKETS: mlflow models data), each with its SHA-256 in
# DIR/manifest.json (infra/backup.py). The servers may keep running: the dumps are consistent
# snapshots, and the objects are copied after them. The same variables as infra/local-stack.sh
# (LORAFLOW_HOME, STACK_DATABASE, POSTGRES_PORT, S3_PORT). Restore into a fresh stack started
# with the same server.env: `RESTORE_FROM=DIR infra/local-stack.sh` (infra/README.md).
set -euo pipefail
if [ "$#" -ne 1 ]; then echo "usage: infra/backup.sh DIR (a new folder)" >&2; exit 2; fi
dir="$(realpath -m "$1")"
cd "$(dirname "$0")/.."
. infra/stack-env.sh
export AWS_ENDPOINT_URL="${AWS_ENDPOINT_URL:-http://127.0.0.1:${S3_PORT:-9000}}"
umask 077
exec python infra/backup.py backup "$dir"
