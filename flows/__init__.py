"""Prefect flows: the pipeline stories."""
