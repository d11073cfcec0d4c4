"""The loraflow pipeline, one Prefect flow:

    validate_data -> tokenize -> train (LoRA) -> evaluate base and tuned -> merge ->
    register (alias challenger) -> push to object storage -> promote (alias champion, if the
    gate passes)

Every step logs to one MLflow run and hands the next a reference (artifact URI + SHA-256);
every step is cached on the content it depends on, so a re-run with nothing changed re-executes
nothing.
"""

from __future__ import annotations

import time
from typing import Any

import mlflow
from prefect import flow

from loraflow.config import PipelineConfig, loraflow_home
from loraflow.summary import render, write_summary
from tasks.data import tokenize_data, validate_data
from tasks.model import evaluate_model, merge_adapter, prepare_base_model, train_adapter
from tasks.release import discard_version, promote_model, push_model, register_model
from tasks.steps import StepLog
from tasks.tracking import pipeline_run

DEFAULT_CONFIG = PipelineConfig()


@flow(name="finetune")
def finetune(config: PipelineConfig = DEFAULT_CONFIG) -> dict[str, Any]:
    """Fine-tune, evaluate, register, push and (maybe) promote; return the run summary."""
    cfg, step, start = config, StepLog(), time.perf_counter()
    with pipeline_run(cfg) as run_id:
        base = step(prepare_base_model, cfg.model.base)
        data = step(validate_data, cfg.data, run_id=run_id)
        tokens = step(
            tokenize_data, data, base, cfg.data.template, cfg.data.max_length, run_id=run_id
        )
        adapter = step(train_adapter, tokens, base, cfg.lora, cfg.train, run_id=run_id)
        base_metrics = step(
            evaluate_model,
            base,
            None,
            data,
            cfg.data.template,
            cfg.eval,
            "base",
            run_id=run_id,
            step="evaluate_base",
        )
        tuned_metrics = step(
            evaluate_model,
            base,
            adapter,
            data,
            cfg.data.template,
            cfg.eval,
            "tuned",
            run_id=run_id,
            step="evaluate_tuned",
        )
        model = step(merge_adapter, base, adapter, cfg.merge, run_id=run_id)
        version = step(register_model, model, adapter, tuned_metrics, cfg.registry, run_id=run_id)
        try:
            storage_uri = step(
                push_model,
                version,
                model,
                adapter,
                cfg.storage,
                cfg.registry.model_name,
                run_id=run_id,
            )
        except Exception:
            if step.steps["register_model"]["state"] != "Cached":
                discard_version(cfg.registry, version)  # no new version without its files
            raise
        gate = step(
            promote_model, version, tuned_metrics, base_metrics, cfg.registry, run_id=run_id
        )

    summary = {
        "run_id": run_id,
        "tracking_uri": mlflow.get_tracking_uri(),
        "model_name": cfg.registry.model_name,
        "model_version": version,
        "aliases": gate["aliases"],
        "gate": gate["reason"],
        "metrics": {"base": base_metrics, "tuned": tuned_metrics},
        "storage_uri": storage_uri,
        "tasks": step.steps,
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_summary(summary, loraflow_home())
    print(render(summary))
    return summary
