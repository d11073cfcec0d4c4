"""The loraflow pipeline, one Prefect flow:

    validate_data -> tokenize -> train (LoRA) -> evaluate base -> merge (base + adapter and
    the merged model answer the test sets: the merged model's score is the tuned one) ->
    export (GGUF, vLLM bundle: each answers the test sets in another runtime) -> evaluate the
    current champion -> decide -> report (figures + HTML) -> register (alias challenger) ->
    push to object storage -> promote (alias champion, if the gate passes)
    (everything after training is release_stage, which a sweep's winner goes through too)
    [-> with an `align` section: the preference stage on top of that SFT model, flows/align.py]

As a deployment (prefect.yaml) this flow runs on the cpu pool and every step that loads the
full model (train, evaluate base, merge, evaluate champion) runs on the gpu pool through a
deployment of its own: the same task, told where (tasks/deployments.py). With
skip_trained_data a run on data already trained on, or claimed by another run training it now
(two watchers, an event sent again), stops after validation, in a Completed state named Skipped.

Every step logs to one MLflow run and hands the next a reference (artifact URI + SHA-256);
every step is cached on the content it reads, so a re-run with nothing changed re-executes
nothing; register and promote read the registry as it is now, every time.
"""

from __future__ import annotations

import time
from typing import Any

import mlflow
from prefect import flow, get_run_logger
from prefect.runtime import deployment
from prefect.states import State

from flows.align import align_stage
from loraflow.artifacts import (
    Adapter,
    EvaluateRequest,
    MergeRequest,
    SftModel,
    SftParent,
    TokenizedData,
    TrainRequest,
    ValidatedData,
)
from loraflow.base_model import BaseModelRef
from loraflow.config import PipelineConfig
from loraflow.credentials import check_mlflow
from loraflow.data.sources import check_splits
from loraflow.data.watch import check_data_uri
from loraflow.environment import configure
from loraflow.evaluation.gate import detectable_note
from loraflow.search import SweepOutcome
from loraflow.summary import render, write_summary
from tasks.data import heldout_split, tokenize_data, validate_data
from tasks.deployments import Where, claim_data, record_trained_data, skip_run
from tasks.evaluation import decide_promotion, evaluate_champion, report_evaluation
from tasks.model import evaluate_base, merge_adapter, prepare_base_model, train_adapter
from tasks.release import export_model, open_configured_store, release
from tasks.steps import StepLog
from tasks.tracking import pipeline_run

DEFAULT_CONFIG = PipelineConfig()


@flow(name="finetune", log_prints=True)
def finetune(
    config: PipelineConfig = DEFAULT_CONFIG,
    data_uri: str | None = None,
    skip_trained_data: bool = False,
    allowed_data_prefixes: list[str] | None = None,
) -> dict[str, Any] | State:
    """Fine-tune, evaluate, register, push and (maybe) promote; return the run summary.

    data_uri: training data to use instead of config.data.train (what a data-landing trigger
    passes); skip_trained_data: stop early if this model was already trained on the same data;
    allowed_data_prefixes: the only directories / s3:// prefixes a data_uri may lie under (a
    deployment run with a data_uri and none allowed is refused; in-process, None allows any)."""
    cfg, step, start = config, StepLog(), time.perf_counter()
    if data_uri:
        if allowed_data_prefixes is not None or deployment.id:
            check_data_uri(data_uri, allowed_data_prefixes or [])  # before any work is done
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": [data_uri]})})
    home = configure()  # MLflow, models and caches under LORAFLOW_HOME unless set otherwise
    check_mlflow()  # missing or refused credentials fail here, not after training
    open_configured_store(cfg.storage).check()  # the bucket answers these S3 keys
    check_splits(cfg.data)  # every data file exists and is what its name says: before any step
    # A deployment run: the steps that load the model go to the gpu pool, results via MLflow.
    where: Where = "gpu_pool" if deployment.id else "here"
    with pipeline_run(cfg) as run_id:
        base = step(prepare_base_model, source=cfg.model.base)
        data = step(validate_data, data=cfg.data, base=base, run_id=run_id)
        earlier = record_trained_data(data, cfg.registry.model_name, run_id=run_id)
        if skip_trained_data:  # a schedule or trigger: data trained on, or another run's now
            held = (f"trained on by run {earlier}" if earlier
                    else claim_data(data, cfg.registry.model_name, run_id=run_id))
            if held:
                return skip_run(run_id, cfg.registry.model_name, data, held)
        print(f"loraflow: {detectable_note(data.counts['test'], cfg.registry)}")
        tokens = step(tokenize_data, data=data, base=base, cfg=cfg.data, run_id=run_id)
        training = TrainRequest(tokens=tokens, base=base, lora=cfg.lora, train=cfg.train,
                                launch=cfg.launch)
        adapter = step(train_adapter, request=training, run_id=run_id, where=where)
        release = release_stage(cfg, step, run_id, base, data, tokens, adapter, where)

    summary = {
        "run_id": run_id, "tracking_uri": mlflow.get_tracking_uri(),
        "model_name": cfg.registry.model_name, **release, "tasks": step.steps,
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_summary(summary, home)
    get_run_logger().info("%s", render(summary))
    return summary


def release_stage(
    cfg: PipelineConfig, step: StepLog, run_id: str, base: BaseModelRef, data: ValidatedData,
    tokens: TokenizedData, adapter: Adapter, where: Where, sweep: SweepOutcome | None = None,
) -> dict[str, Any]:
    """Everything after training, for a retraining and a sweep's winner alike: the test split
    is read here only (base, merged model, champion), the gate decides, and the model is
    registered, pushed and maybe promoted; the summary's part for it. `sweep`: the trials the
    adapter won among, which the report plots."""
    test, template, name = heldout_split(data), tokens.template, cfg.registry.model_name
    base_eval = step(evaluate_base, request=EvaluateRequest(
        model=base, test=test, template=template, cfg=cfg.eval), run_id=run_id, where=where)
    merged = step(merge_adapter, request=MergeRequest(
        base=base, adapter=adapter, test=test, template=template, eval_cfg=cfg.eval,
        cfg=cfg.merge), run_id=run_id, where=where)
    model, tuned_eval = merged.model, merged.evaluation
    exports = step(export_model, model=model, adapter=adapter, tuned=tuned_eval, test=test,
                   cfg=cfg.export, eval_cfg=cfg.eval, model_name=name, run_id=run_id)
    rival = step(evaluate_champion, model_name=name, candidate=model, test=test,
                 template=template, cfg=cfg.eval, run_id=run_id, where=where)
    evals = [base_eval, tuned_eval, rival]  # rival: None when there is no other champion
    decision = step(decide_promotion, model=model, tuned=tuned_eval, base=base_eval,
                    champion=rival, model_name=name, registry=cfg.registry, cfg=cfg.eval,
                    run_id=run_id, exports=exports)
    report = step(report_evaluation, evaluations=evals, cfg=cfg.eval, adapter=adapter,
                  run_id=run_id, decision=decision, sweep=sweep)
    after = tuned_eval.metrics
    released = release(step, "sft", model, adapter, after, decision, cfg.registry, cfg.storage,
                       run_id, exports)
    version = released["model_version"]
    aligned = None
    if cfg.align is not None:  # preference tuning on top of this SFT model
        parent = SftParent(version=version, adapter_sha256=adapter.sha256,
                           model_sha256=model.sha256)
        sft = SftModel(model=model, parent=parent, metrics=after, template=template,
                       evaluation=tuned_eval)
        aligned = align_stage(cfg, step, run_id, base, sft, test, champion=rival)
    return released | {  # aliases: read from the registry after the gate, never cached
        "decision": decision.primary and decision.primary.model_dump(),
        "metrics": {e.label: e.metrics for e in evals if e is not None},
        "report_uri": report,
        "exports": [c.model_dump() for c in exports.checks], "export_notes": exports.notes,
    } | ({"align": aligned} if aligned is not None else {})
