# The servers' side of the stack, sourced by infra/local-stack.sh and infra/backup.sh, so that a
# backup and a restore (RESTORE_FROM) find the same databases and buckets as the servers: the
# credentials of $LORAFLOW_HOME/secrets/server.env (LORAFLOW_SECRETS elsewhere), the servers'
# own S3 keys, and the database URLs of STACK_DATABASE:
#   postgresql (the default)  infra/postgres.sh on 127.0.0.1:POSTGRES_PORT (5432): databases
#                             prefect, mlflow and mlflow_auth, each server with its own role
#   sqlite                    files under $LORAFLOW_HOME, unless MLFLOW_BACKEND_STORE_URI,
#                             MLFLOW_AUTH_DATABASE_URI or PREFECT_API_DATABASE_CONNECTION_URL
#                             point elsewhere (e.g. a PostgreSQL you run yourself)
# Nothing here is printed; the URLs carry passwords and live only in the servers' environment.
export LORAFLOW_HOME="${LORAFLOW_HOME:-$PWD/.loraflow}"
secrets="${LORAFLOW_SECRETS:-$LORAFLOW_HOME/secrets}"
if [ ! -s "$secrets/server.env" ]; then
  echo "$0: no $secrets/server.env; run infra/new-credentials.sh first" >&2
  exit 2
fi
set -a; . "$secrets/server.env"; set +a
# the servers' own S3 keys: the S3 server accepts only these, the MLflow server signs with them
export AWS_ACCESS_KEY_ID="$S3_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$S3_SECRET_KEY"
export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
export STACK_DATABASE="${STACK_DATABASE:-postgresql}"
case "$STACK_DATABASE" in
  postgresql)
    for var in POSTGRES_PREFECT_PASSWORD POSTGRES_MLFLOW_PASSWORD; do
      if [ -z "${!var:-}" ]; then
        echo "$0: $secrets/server.env has no $var (it was made before the stack ran on" \
          "PostgreSQL). Add one: printf '$var=%s\\n' \"\$(python -c 'import secrets;" \
          "print(secrets.token_urlsafe(24))')\" >> $secrets/server.env" \
          "(or STACK_DATABASE=sqlite)" >&2
        exit 2
      fi
      if [[ ! "${!var}" =~ ^[A-Za-z0-9._~-]+$ ]]; then  # it goes into URLs and an ini file as is
        echo "$0: $var in $secrets/server.env may hold only letters, digits and . _ ~ -" \
          "(infra/new-credentials.sh makes such)" >&2
        exit 2
      fi
    done
    # the drivers by name: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, which the
    # project does not install (psycopg2 is MLflow's, asyncpg Prefect's)
    db="127.0.0.1:${POSTGRES_PORT:-5432}"
    export PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://prefect:$POSTGRES_PREFECT_PASSWORD@$db/prefect"
    export MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://mlflow:$POSTGRES_MLFLOW_PASSWORD@$db/mlflow"
    export MLFLOW_AUTH_DATABASE_URI="postgresql+psycopg2://mlflow:$POSTGRES_MLFLOW_PASSWORD@$db/mlflow_auth"
    unset db ;;
  sqlite)
    export MLFLOW_BACKEND_STORE_URI="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$LORAFLOW_HOME/mlflow-server.db}"
    export MLFLOW_AUTH_DATABASE_URI="${MLFLOW_AUTH_DATABASE_URI:-sqlite:///$LORAFLOW_HOME/mlflow-auth.db}"
    export PREFECT_API_DATABASE_CONNECTION_URL="${PREFECT_API_DATABASE_CONNECTION_URL:-sqlite+aiosqlite:///$LORAFLOW_HOME/prefect/prefect.db}" ;;
  *)
    echo "$0: STACK_DATABASE=$STACK_DATABASE; it is postgresql (the default) or sqlite" >&2
    exit 2 ;;
esac
