"""The loraflow pipeline, one Prefect flow:

    validate_data -> tokenize -> train (LoRA) -> evaluate base and tuned -> merge ->
    evaluate the current champion -> report (figures + HTML) -> register (alias challenger) ->
    push to object storage -> promote (alias champion, if the gate passes)
    [-> with an `align` section: the preference stage on top of that SFT model, flows/align.py]

As a deployment (prefect.yaml) training runs on the gpu pool through the `train` deployment,
and with skip_trained_data a run on data already trained on stops after validation.

Every step logs to one MLflow run and hands the next a reference (artifact URI + SHA-256);
every step is cached on the content it depends on, so a re-run with nothing changed re-executes
nothing.
"""

from __future__ import annotations

import time
from typing import Any

import mlflow
from prefect import flow
from prefect.runtime import deployment

from flows.align import align_stage
from loraflow.config import PipelineConfig
from loraflow.environment import configure
from loraflow.summary import render, write_summary
from tasks.data import tokenize_data, validate_data
from tasks.deployments import record_trained_data, skip_run, train_on_gpu_pool
from tasks.evaluation import evaluate_champion, report_evaluation
from tasks.model import (
    evaluate_base,
    evaluate_tuned,
    merge_adapter,
    prepare_base_model,
    train_adapter,
)
from tasks.release import discard_version, promote_model, push_model, register_model
from tasks.steps import StepLog
from tasks.tracking import pipeline_run

DEFAULT_CONFIG = PipelineConfig()


@flow(name="finetune")
def finetune(
    config: PipelineConfig = DEFAULT_CONFIG,
    data_uri: str | None = None,
    skip_trained_data: bool = False,
) -> dict[str, Any]:
    """Fine-tune, evaluate, register, push and (maybe) promote; return the run summary.

    data_uri: training data to use instead of config.data.train (what a data-landing trigger
    passes); skip_trained_data: stop early if this model was already trained on the same data."""
    cfg, step, start = config, StepLog(), time.perf_counter()
    if data_uri:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": [data_uri]})})
    home = configure()  # MLflow, models and caches under LORAFLOW_HOME unless set otherwise
    with pipeline_run(cfg) as run_id:
        base = step(prepare_base_model, source=cfg.model.base)
        data = step(validate_data, data=cfg.data, base=base, run_id=run_id)
        earlier = record_trained_data(data, cfg.registry.model_name, run_id=run_id)
        if earlier and skip_trained_data:  # a schedule or trigger on data already trained on
            return skip_run(run_id, cfg.registry.model_name, data, earlier)
        tokens = step(tokenize_data, data=data, base=base, cfg=cfg.data, run_id=run_id)
        if deployment.id:  # a deployment run: train on the gpu pool; the adapter comes via MLflow
            adapter = step(train_on_gpu_pool, tokens=tokens, base=base, lora=cfg.lora,
                           train=cfg.train, base_source=cfg.model.base, run_id=run_id)
        else:
            adapter = step(train_adapter, tokens=tokens, base=base, lora=cfg.lora,
                           train=cfg.train, run_id=run_id)
        template, name = tokens.template, cfg.registry.model_name
        base_eval = step(evaluate_base, model=base, adapter=None, data=data, template=template,
                         cfg=cfg.eval, run_id=run_id)
        tuned_eval = step(evaluate_tuned, model=base, adapter=adapter, data=data,
                          template=template, cfg=cfg.eval, run_id=run_id)
        model = step(merge_adapter, base=base, adapter=adapter, cfg=cfg.merge, run_id=run_id)
        rival = step(evaluate_champion, model_name=name, candidate=model, data=data,
                     template=template, cfg=cfg.eval, run_id=run_id)
        evals = [base_eval, tuned_eval, rival]  # rival: None when there is no other champion
        report = step(report_evaluation, evaluations=evals, cfg=cfg.eval, adapter=adapter,
                      run_id=run_id)
        before, after = base_eval.metrics, tuned_eval.metrics
        version = step(register_model, model=model, adapter=adapter, metrics=after,
                       cfg=cfg.registry, run_id=run_id)
        try:
            storage_uri = step(push_model, version=version, model=model, adapter=adapter,
                               cfg=cfg.storage, model_name=name, run_id=run_id)
        except Exception:
            if step.steps["register_model"]["state"] != "Cached":
                discard_version(cfg.registry, version)  # no new version without its files
            raise
        gate = step(promote_model, version=version, tuned=after, base=before, cfg=cfg.registry,
                    run_id=run_id)
        aligned = None
        if cfg.align is not None:  # preference tuning on top of this SFT model
            parent = {"version": version, "adapter_sha256": adapter.sha256,
                      "model_sha256": model.sha256}
            aligned = align_stage(cfg, step, run_id, base, model, parent, template, data, after)

    summary = {
        "run_id": run_id,
        "tracking_uri": mlflow.get_tracking_uri(),
        "model_name": cfg.registry.model_name,
        "model_version": version,
        "aliases": gate["aliases"],
        "gate": gate["reason"],
        "metrics": {e.label: e.metrics for e in evals if e is not None},
        "report_uri": report,
        "storage_uri": storage_uri,
        "tasks": step.steps,
        "seconds": round(time.perf_counter() - start, 3),
    }
    if aligned is not None:
        summary["align"] = aligned
    write_summary(summary, home)
    print(render(summary))
    return summary
