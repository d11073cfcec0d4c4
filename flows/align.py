"""The preference (align) stage, after SFT or on its own from the current champion:

    validate preference data -> tokenize (the SFT adapter's prompt template) -> train a new
    adapter with dpo/orpo/kto on the merged SFT model (its reference: the same model with the
    new adapter off) -> score held-out pairs for base, SFT and aligned -> merge, and score the
    merged model on the task metrics in its serving dtype (what the gate reads) -> register
    (lineage: SFT parent version + adapter hash, preference data hash) -> push -> promote if
    it beats the champion on align.gate_metric

Why the merged SFT model as the align stage's base rather than the SFT adapter loaded under
the new one: the pipeline has it already (the SFT stage merged and registered it, and an
align-only run starts from the champion, which is a merged model), the reference needs no
second copy of any weights (the align adapter switched off is exactly the SFT model), and the
engine needs no two-adapter bookkeeping; the cost is that the align adapter applies to that
merged model only, which its lineage states.

Every step is cached on content: new preference data re-runs only these steps; the SFT steps
before them are cached on the SFT data.

`align` is also a flow of its own (deployment `align`, started by loraflow.feedback.landed
events from `loraflow watch --feedback`): an align-only run from the current champion.
"""

from __future__ import annotations

import time
from typing import Any

import mlflow
from prefect import flow, get_run_logger

from loraflow.artifacts import (
    AlignedOn,
    EvaluateRequest,
    Evaluation,
    HeldoutSplit,
    MergeRequest,
    SftModel,
    TrainRequest,
)
from loraflow.base_model import BaseModelRef
from loraflow.config import AlignConfig, PipelineConfig
from loraflow.environment import configure
from loraflow.release.registry import champion_files, champion_to_align
from loraflow.summary import render, write_summary
from tasks.align import (
    child_run,
    decide_aligned,
    evaluate_preferences,
    kind_of,
    parent_tags,
    tag_parent_metrics,
    tokenize_preferences,
    validate_preferences,
    with_preference,
)
from tasks.data import heldout_split, validate_data
from tasks.model import evaluate_model, merge_adapter, prepare_base_model, train_adapter
from tasks.release import export_model, release
from tasks.steps import StepLog
from tasks.tracking import fetch, pipeline_run

train_aligned = train_adapter.with_options(name="train_aligned")
merge_aligned = merge_adapter.with_options(name="merge_aligned")
evaluate_sft = evaluate_model.with_options(name="evaluate_champion")
export_aligned = export_model.with_options(name="export_aligned")


class AlignError(ValueError):
    """The align stage cannot start: the message says which setting to give."""


def align_stage(
    cfg: PipelineConfig, step: StepLog, run_id: str, base: BaseModelRef, sft: SftModel,
    test: HeldoutSplit, champion: Evaluation | None = None,
) -> dict[str, Any]:
    """Train, evaluate, register and gate the aligned model on top of `sft` (a merged SFT
    model: the SFT stage's, or the champion's), in an MLflow run nested in `run_id`;
    `champion`: another champion's answers in this run, the gate's reference then."""
    align = cfg.align
    if align is None:
        raise AlignError("the align stage needs the `align` section of the config (see "
                         "configs/preference.yaml)")
    with child_run(run_id, "align") as align_run:
        return {"run_id": align_run} | _align(cfg, align, step, align_run, base, sft, test,
                                              champion)


def _align(
    cfg: PipelineConfig, align: AlignConfig, step: StepLog, run_id: str, base: BaseModelRef,
    sft: SftModel, test: HeldoutSplit, champion: Evaluation | None,
) -> dict[str, Any]:
    name, parent, template = cfg.registry.model_name, sft.parent, sft.template
    sft_base = BaseModelRef(name=f"{name}-v{parent.version}", path=fetch(sft.model.uri),
                            sha256=sft.model.sha256, source=f"models:/{name}/{parent.version}")
    preferences = step(validate_preferences, align=align, data=cfg.data, run_id=run_id)
    tokens = step(tokenize_preferences, data=preferences, base=sft_base, cfg=cfg.data,
                  template=template, kind=kind_of(align), run_id=run_id)
    aligned_on = AlignedOn(sft_parent=parent, preference_data_sha256=preferences.sha256,
                           align_objective=align.objective)
    training = align.train_config(cfg.train)
    adapter = step(train_aligned, request=TrainRequest(
        tokens=tokens, base=sft_base, lora=cfg.lora, train=training, launch=cfg.launch,
        aligned_on=aligned_on), run_id=run_id)
    scores = step(evaluate_preferences, base=base, sft=sft_base, adapter=adapter, tokens=tokens,
                  beta=training.preference.beta, run_id=run_id)
    # the gate reads the merged model in its serving dtype, as the SFT stage's does
    merged = step(merge_aligned, request=MergeRequest(
        base=sft_base, adapter=adapter, test=test, template=template, eval_cfg=cfg.eval,
        cfg=cfg.merge), run_id=run_id)
    model, aligned = merged.model, with_preference(merged.evaluation.metrics, scores["aligned"])
    exports = step(export_aligned, model=model, adapter=adapter, tuned=merged.evaluation,
                   test=test, cfg=cfg.export, eval_cfg=cfg.eval, model_name=name, run_id=run_id)
    sft_metrics = with_preference(sft.metrics, scores["sft"])
    step(tag_parent_metrics, name=name, version=parent.version,
         metrics={k: v for k, v in sft_metrics.items() if k.startswith("pref_")})
    decision = step(decide_aligned, aligned=merged.evaluation, sft=sft, champion=champion,
                    pairs=scores["pairs"], align=align, registry_cfg=cfg.registry, cfg=cfg.eval,
                    run_id=run_id, exports=exports)
    released = release(step, "aligned", model, adapter, aligned, decision, cfg.registry,
                       cfg.storage, run_id, exports, tags=parent_tags(aligned_on, run_id))
    return released | {"parent_version": parent.version,
                       "metrics": {"base": scores["base"], "sft": sft_metrics, "aligned": aligned},
                       "preference_data_sha256": preferences.sha256,
                       "exports": [c.model_dump() for c in exports.checks],
                       "export_notes": exports.notes}


DEFAULT_CONFIG = PipelineConfig()


@flow(name="align", log_prints=True)
def align(config: PipelineConfig = DEFAULT_CONFIG, feedback_uri: str | None = None) -> dict:
    """Align-only: a preference adapter on the current champion; feedback_uri (what a
    loraflow.feedback.landed trigger passes) replaces align.train."""
    cfg, step, start = config, StepLog(), time.perf_counter()
    if cfg.align is None:
        raise AlignError("an align-only run needs the `align` section of the config (see "
                         "configs/preference.yaml)")
    if feedback_uri:
        cfg = cfg.model_copy(update={"align": cfg.align.model_copy(
            update={"train": [feedback_uri]})})
    home = configure()
    name = cfg.registry.model_name
    with pipeline_run(cfg) as run_id:
        sft = champion_to_align(name)
        if sft is None:
            raise AlignError(f"no champion of {name!r} to align from: an align-only run starts "
                             "from the registered champion. Fix: run the SFT pipeline first "
                             "(`loraflow run`), or set registry.model_name to a model that has "
                             "one")
        base = step(prepare_base_model, source=cfg.model.base)
        data = step(validate_data, data=cfg.data, base=base, run_id=run_id)
        test = heldout_split(data)
        # the champion answers the test sets in this run: the gate's paired reference
        sft_eval = step(evaluate_sft, request=EvaluateRequest(
            model=champion_files(name), test=test, template=sft.template, cfg=cfg.eval),
            run_id=run_id)
        sft = sft.model_copy(update={"evaluation": sft_eval})
        aligned = align_stage(cfg, step, run_id, base, sft, test)
    summary = {"run_id": run_id, "tracking_uri": mlflow.get_tracking_uri(),
               "model_name": name, "align": aligned, "tasks": step.steps,
               "seconds": round(time.perf_counter() - start, 3)}
    write_summary(summary, home)
    get_run_logger().info("%s", render(summary))
    return summary
