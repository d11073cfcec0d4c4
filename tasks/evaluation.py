"""Evaluation tasks beyond base and tuned: the current champion on the same prompts, and the
report (figures + HTML) that puts them side by side."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from prefect import task
from prefect.cache_policies import TASK_SOURCE, CacheKeyFnPolicy

from loraflow.artifacts import (
    Adapter,
    EvaluateRequest,
    Evaluation,
    Exports,
    HeldoutSplit,
    MergedModel,
)
from loraflow.config import EvalConfig, RegistryConfig
from loraflow.data.prompts import PromptTemplate
from loraflow.evaluation import evaluate, gate, report
from loraflow.release.registry import rival
from loraflow.search import SweepOutcome
from tasks.caching import CONTENT, ContentInputs
from tasks.deployments import Where
from tasks.model import evaluate_model
from tasks.tracking import fetch, log_dir, log_metrics, log_params

RUN_IN_URI = re.compile(r"/([0-9a-f]{32})/artifacts/")  # MLflow's <run id>/artifacts layout


def current_champion(context: Any, inputs: dict[str, Any]) -> str:
    """The model that holds the alias now (the candidate only tells whether the champion is
    the very model just trained, so it does not count otherwise)."""
    found = rival(inputs["model_name"], inputs["candidate"])
    return found.sha256 if found else "no other champion"


CHAMPION_CACHE = (
    TASK_SOURCE
    + ContentInputs(exclude=("candidate",))
    + CacheKeyFnPolicy(cache_key_fn=current_champion)
)


@task(cache_policy=CHAMPION_CACHE)
def evaluate_champion(
    model_name: str,
    candidate: MergedModel,
    test: HeldoutSplit,
    template: PromptTemplate,
    cfg: EvalConfig,
    run_id: str,
    where: Where = "here",
) -> Evaluation | None:
    """The current champion (looked up here) answers the same test sets, here or on the gpu
    pool; None when it is not compared (eval.compare_champion, or no other champion), and then
    nothing is started."""
    champion = rival(model_name, candidate) if cfg.compare_champion else None
    if champion is None:
        return None
    log_params(run_id, {"eval.champion_version": champion.version})
    request = EvaluateRequest(model=champion, test=test, template=template, cfg=cfg)
    return evaluate_model.fn(request=request, run_id=run_id, where=where)


def other_champion(context: Any, inputs: dict[str, Any]) -> str:
    """The champion the decision is made against (none, or the candidate itself: the base)."""
    found = rival(inputs["model_name"], inputs["model"])
    return found.sha256 if found else "no other champion"


@task(cache_policy=TASK_SOURCE + ContentInputs() + CacheKeyFnPolicy(cache_key_fn=other_champion))
def decide_promotion(
    model: MergedModel,
    tuned: Evaluation,
    base: Evaluation,
    champion: Evaluation | None,
    model_name: str,
    registry: RegistryConfig,
    cfg: EvalConfig,
    run_id: str,
    exports: Exports | None = None,
) -> gate.GateDecision:
    """The paired decision: the merged model's answers against the champion's in this run
    (against the base model's when there is no other champion), and every export answering as
    the merged model did (export.min_agreement); logged as gate.* and eval/decision.json.
    promote_model applies it."""
    other = rival(model_name, model)
    reference, name = (base, "base model") if other is None else (
        champion, f"champion v{other.version}")  # champion: None when not compared
    decision = gate.decide(
        evaluate.read_result(fetch(tuned.uri)),
        evaluate.read_result(fetch(reference.uri)) if reference is not None else None,
        name, registry, cfg, reference_version=other and other.version)
    decision = gate.with_exports(decision, exports.checks if exports else [])
    log_decision(decision, run_id)
    return decision


def log_decision(decision: gate.GateDecision, run_id: str, prefix: str = "gate") -> None:
    """The decision's words as params, its numbers as metrics, all of it as decision.json."""
    log_params(run_id, {f"{prefix}.verdict": decision.verdict[:6000],
                        f"{prefix}.reference": decision.reference_name})
    if decision.primary is not None:
        p = decision.primary
        log_metrics(run_id, {f"{prefix}.{k}": float(v) for k, v in {
            "estimate": p.estimate, "lower": p.lower, "upper": p.upper, "p_value": p.p_value,
            "wins": p.wins, "losses": p.losses, "ties": p.ties, "confidence": p.confidence,
            "failed_guards": len(decision.failed_guards),
            "detectable": decision.detectable if decision.detectable is not None else -1.0,
        }.items()})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "decision.json").write_text(decision.model_dump_json(indent=2))
        log_dir(run_id, Path(tmp), f"eval/{prefix}")


@task(cache_policy=CONTENT)
def report_evaluation(
    evaluations: list[Evaluation | None], cfg: EvalConfig, adapter: Adapter, run_id: str,
    decision: gate.GateDecision | None = None, sweep: SweepOutcome | None = None,
) -> str:
    """Loss curves, metric bars and the side-by-side table as one HTML page, logged to the run;
    a sweep's trials (parallel coordinates, importances) open it when given."""
    results, parity = {}, None
    for ref in evaluations:
        if ref is not None:
            folder = fetch(ref.uri)
            results[ref.label] = evaluate.read_result(folder)
            checked = folder / "parity.json"  # the merge's check, beside the tuned answers
            if checked.is_file():
                parity = evaluate.AnswerParity.model_validate_json(checked.read_text())
    curves = training_curves(adapter)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report"
        report.build_report(results, curves, out, side_by_side=cfg.side_by_side, parity=parity,
                            decision=decision, sweep=sweep)
        uri = log_dir(run_id, out, "report")
        MlflowClient().log_table(run_id, side_by_side_table(results), "eval/side_by_side.json")
    return f"{uri}/report.html"


def training_curves(adapter: Adapter) -> dict[str, list[tuple[int, float]]]:
    """train.loss and train.val_loss per step, from the run that trained the adapter (which is
    an earlier run when training was cached)."""
    match = RUN_IN_URI.search(adapter.uri)
    if match is None:
        return {}
    client = MlflowClient()
    return {
        # step 0 holds the end-of-training summary values, not a point of the curve
        name: [(m.step, m.value) for m in client.get_metric_history(match[1], name) if m.step]
        for name in ("train.loss", "train.val_loss")
    }


def side_by_side_table(results: dict[str, evaluate.EvalResult]) -> dict[str, list[Any]]:
    """Every example of every set, one column per model's answer and score (MLflow table)."""
    first = next(iter(results.values()))
    table: dict[str, list[Any]] = {"set": [], "input": [], "expected": []}
    for label in results:
        table |= {f"{label}_answer": [], f"{label}_exact_match": [], f"{label}_fuzzy": []}
    for set_name, rows in first.examples.items():
        for i, row in enumerate(rows):
            table["set"].append(set_name)
            table["input"].append(row["input"] or row["instruction"])
            table["expected"].append(row["expected"])
            for label, result in results.items():
                other = result.examples[set_name][i]
                table[f"{label}_answer"].append(other["answer"])
                table[f"{label}_exact_match"].append(other["scores"].get("exact_match"))
                table[f"{label}_fuzzy"].append(other["scores"].get("fuzzy"))
    return table
