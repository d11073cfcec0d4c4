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

from loraflow.artifacts import Adapter, EvaluateRequest, Evaluation, HeldoutSplit, MergedModel
from loraflow.config import EvalConfig
from loraflow.data.prompts import PromptTemplate
from loraflow.evaluation import evaluate, report
from loraflow.release.registry import rival
from tasks.caching import CONTENT, ContentInputs
from tasks.deployments import Where
from tasks.model import evaluate_model
from tasks.tracking import fetch, log_dir, log_params

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


@task(cache_policy=CONTENT)
def report_evaluation(
    evaluations: list[Evaluation | None], cfg: EvalConfig, adapter: Adapter, run_id: str
) -> str:
    """Loss curves, metric bars and the side-by-side table as one HTML page, logged to the run."""
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
        report.build_report(results, curves, out, side_by_side=cfg.side_by_side, parity=parity)
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
