"""Data: records and their sources, cleaning, validation, prompt templates and tokenization."""
