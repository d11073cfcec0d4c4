-- The MLflow backend store beside Prefect's database in the same PostgreSQL server.
CREATE DATABASE mlflow OWNER loraflow;
-- The MLflow auth app's users and permissions (infra/mlflow-server.sh, MLFLOW_AUTH_DATABASE_URI).
CREATE DATABASE mlflow_auth OWNER loraflow;
