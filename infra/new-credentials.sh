#!/usr/bin/env bash
# Create fresh random credentials for the stack (never commit them; nothing here has a default):
#   infra/new-credentials.sh [DIR]        (DIR: $LORAFLOW_HOME/secrets)
# writes, each readable by you only:
#   DIR/server.env    what the servers start with: PREFECT_SERVER_API_AUTH_STRING, the MLflow
#                     admin (MLFLOW_AUTH_ADMIN_*), the users infra/mlflow-users.py creates
#                     (MLFLOW_PIPELINE_*, MLFLOW_READER_*), the S3 keys (S3_ACCESS_KEY/SECRET),
#                     the PostgreSQL roles' passwords (POSTGRES_PREFECT_PASSWORD,
#                     POSTGRES_MLFLOW_PASSWORD: infra/postgres.sh)
#   DIR/pipeline.env  what workers, the watcher and the CLI use (LORAFLOW_CREDENTIALS_FILE):
#                     MLFLOW_TRACKING_USERNAME/PASSWORD (user "pipeline"),
#                     PREFECT_API_AUTH_STRING, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY
#   DIR/reader.env    the read-only MLflow user for dashboards (MLFLOW_TRACKING_*)
# Refuses to overwrite existing files: to rotate, edit them as infra/README.md says ("Users,
# permissions, rotation").
set -euo pipefail
dir="${1:-${LORAFLOW_HOME:-$PWD/.loraflow}/secrets}"
for f in server.env pipeline.env reader.env; do
  if [ -e "$dir/$f" ]; then
    echo "infra/new-credentials.sh: $dir/$f exists; not overwritten (to rotate a credential:" \
      "infra/README.md, \"Users, permissions, rotation\")" >&2
    exit 1
  fi
done
umask 077
mkdir -p "$dir"
secret() { python -c 'import secrets; print(secrets.token_urlsafe(24))'; }
prefect_auth="loraflow:$(secret)"
admin_pw="$(secret)" pipeline_pw="$(secret)" reader_pw="$(secret)"
s3_key="loraflow-$(python -c 'import secrets; print(secrets.token_hex(6))')" s3_secret="$(secret)"
pg_prefect_pw="$(secret)" pg_mlflow_pw="$(secret)"
# Each file is written with printf: nothing in its text is ever run by the shell (an unquoted
# heredoc runs what its comments hold between backticks).
printf '%s\n' \
  "# Server-side credentials (infra/local-stack.sh, docker compose --env-file). Keep private." \
  "PREFECT_SERVER_API_AUTH_STRING=$prefect_auth" \
  "MLFLOW_AUTH_ADMIN_USERNAME=admin" \
  "MLFLOW_AUTH_ADMIN_PASSWORD=$admin_pw" \
  "MLFLOW_PIPELINE_USERNAME=pipeline" \
  "MLFLOW_PIPELINE_PASSWORD=$pipeline_pw" \
  "MLFLOW_READER_USERNAME=reader" \
  "MLFLOW_READER_PASSWORD=$reader_pw" \
  "S3_ACCESS_KEY=$s3_key" \
  "S3_SECRET_KEY=$s3_secret" \
  "POSTGRES_PREFECT_PASSWORD=$pg_prefect_pw" \
  "POSTGRES_MLFLOW_PASSWORD=$pg_mlflow_pw" > "$dir/server.env"
printf '%s\n' \
  "# Client credentials of workers, the watcher and the loraflow CLI (LORAFLOW_CREDENTIALS_FILE)." \
  "MLFLOW_TRACKING_USERNAME=pipeline" \
  "MLFLOW_TRACKING_PASSWORD=$pipeline_pw" \
  "PREFECT_API_AUTH_STRING=$prefect_auth" \
  "AWS_ACCESS_KEY_ID=$s3_key" \
  "AWS_SECRET_ACCESS_KEY=$s3_secret" > "$dir/pipeline.env"
printf '%s\n' \
  '# Read-only MLflow user (dashboards, `loraflow models`): may read, may not move aliases.' \
  "MLFLOW_TRACKING_USERNAME=reader" \
  "MLFLOW_TRACKING_PASSWORD=$reader_pw" > "$dir/reader.env"
echo "credentials written to $dir (server.env, pipeline.env, reader.env; mode 600)"
