"""Thin Prefect tasks: cache policy, retry policy, MLflow glue around loraflow functions."""
