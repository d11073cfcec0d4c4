"""Evaluation: generation, scoring and the report."""
