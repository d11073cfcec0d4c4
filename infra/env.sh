# The environment that wires loraflow to long-running services instead of the embedded defaults.
# Source it (`. infra/env.sh`) after editing; unset variables fall back to the embedded default.
# No secret lives here: credentials come from the file LORAFLOW_CREDENTIALS_FILE names.
export LORAFLOW_HOME="${LORAFLOW_HOME:-$PWD/.loraflow}"
# Credentials of workers, the watcher and the CLI (infra/new-credentials.sh writes the file):
# MLFLOW_TRACKING_USERNAME/PASSWORD, PREFECT_API_AUTH_STRING, AWS_ACCESS_KEY_ID/SECRET_ACCESS_KEY.
export LORAFLOW_CREDENTIALS_FILE="${LORAFLOW_CREDENTIALS_FILE:-$LORAFLOW_HOME/secrets/pipeline.env}"
# Prefect: a running server (infra/prefect-server.sh). Unset -> a temporary server per run.
# The ports are infra/local-stack.sh's (PREFECT_PORT, MLFLOW_PORT, S3_PORT if you moved them).
export PREFECT_API_URL="${PREFECT_API_URL:-http://127.0.0.1:${PREFECT_PORT:-4200}/api}"
# The Prefect CLI's and the workers' settings and task results: in the home (make clean).
export PREFECT_HOME="${PREFECT_HOME:-$LORAFLOW_HOME/prefect}"
# No usage data from the Prefect server, the Prefect client and CLI (its first-run notice
# included: DO_NOT_TRACK), or MLflow.
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
# MLflow: a tracking server (infra/mlflow-server.sh). Unset -> sqlite:///$LORAFLOW_HOME/mlflow.db
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-http://127.0.0.1:${MLFLOW_PORT:-5000}}"
export MLFLOW_DISABLE_TELEMETRY=true
# Object storage (pushed models, data on s3://): the deployed config pushes to
# s3://models/loraflow (prefect.yaml); AWS_ENDPOINT_URL is the S3 server for boto3 (infra's
# moto or MinIO; unset it for AWS itself). The version records it for `loraflow pull`.
export AWS_ENDPOINT_URL="${AWS_ENDPOINT_URL:-http://127.0.0.1:${S3_PORT:-9000}}"
export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
# Retraining when data lands (infra/watch.sh): where new training JSONL files arrive (created
# by the watcher); infra/deploy.sh allows the pipeline's data_uri only under it.
export WATCH_LOCATION="${WATCH_LOCATION:-$LORAFLOW_HOME/incoming}"
# The gpu pool's total concurrent training runs (infra/deploy.sh); unset: no pool-wide cap.
# export GPU_SLOTS=4
