"""loraflow: LoRA fine-tuning of LLaMA-family models as a Prefect pipeline tracked in MLflow."""
