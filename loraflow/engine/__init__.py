"""The training engine, a plain process (`python -m loraflow.engine`): no Prefect or MLflow
inside; metrics as JSON lines, checkpoints to a directory."""
