# The environment that wires loraflow to long-running services instead of the embedded defaults.
# Source it (`. infra/env.sh`) after editing; unset variables fall back to the embedded default.
export LORAFLOW_HOME="${LORAFLOW_HOME:-$PWD/.loraflow}"
# Prefect: a running server (infra/prefect-server.sh). Unset -> a temporary server per run.
export PREFECT_API_URL="${PREFECT_API_URL:-http://127.0.0.1:4200/api}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
# MLflow: a tracking server (infra/mlflow-server.sh). Unset -> sqlite:///$LORAFLOW_HOME/mlflow.db
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-http://127.0.0.1:5000}"
export MLFLOW_DISABLE_TELEMETRY=true
# Object storage for pushed models: set storage.root=s3://bucket/prefix in the run config, and
# storage.endpoint_url for MinIO/Ceph. Credentials come from the usual AWS chain
# (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, instance roles); loraflow never logs them.
# Retraining when data lands (infra/watch.sh): where new training JSONL files arrive.
export WATCH_LOCATION="${WATCH_LOCATION:-$LORAFLOW_HOME/incoming}"
# The gpu pool's total concurrent training runs (infra/deploy.sh); unset: no pool-wide cap.
# export GPU_SLOTS=4
