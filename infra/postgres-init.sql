-- The MLflow backend store beside Prefect's database in the same PostgreSQL server.
CREATE DATABASE mlflow OWNER loraflow;
