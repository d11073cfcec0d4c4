"""Align-stage tasks: validate and tokenize the preference data, score held-out pairs, gate and
tag the aligned version with its lineage. Training, merging, evaluation on the task metrics,
registration and pushing reuse the SFT stage's tasks (tasks/model.py, tasks/release.py)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE, CacheKeyFnPolicy

from loraflow.artifacts import (
    Adapter,
    AlignedOn,
    Evaluation,
    Exports,
    SftModel,
    TokenizedData,
    ValidatedData,
)
from loraflow.base_model import BaseModelRef, load_tokenizer
from loraflow.config import AlignConfig, DataConfig, EvalConfig, RegistryConfig, loraflow_home
from loraflow.data.preference import PREFERENCE_KINDS, tokenize_preference_cached
from loraflow.data.prompts import PromptTemplate
from loraflow.data.records import SPLITS
from loraflow.data.tokenization import TokenizeReport, TokenizeSettings
from loraflow.data.validation import validate_splits
from loraflow.evaluation import evaluate, gate
from loraflow.evaluation.gate import GateDecision
from loraflow.evaluation.preference import evaluate_pairs
from loraflow.hashing import sha256_file, sha256_tree, tokenizer_sha256
from loraflow.release import registry
from tasks.caching import CONTENT
from tasks.data import split_sources_key
from tasks.evaluation import log_decision
from tasks.release import NETWORK_RETRIES
from tasks.tracking import fetch, log_dir, log_metrics, log_params

PARENT_TAGS = ("loraflow.sft_parent_version", "loraflow.sft_parent_adapter_sha256",
               "loraflow.sft_parent_model_sha256", "loraflow.preference_data_sha256",
               "loraflow.align_objective")


@contextmanager
def child_run(parent_run_id: str, name: str) -> Iterator[str]:
    """An MLflow run nested in the pipeline's run for the align stage: its training curve,
    evaluations, merged model and registry params stand apart from the SFT stage's."""
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    run = client.create_run(parent.info.experiment_id, run_name=name,
                            tags={"mlflow.parentRunId": parent_run_id})
    try:
        yield run.info.run_id
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")


def kind_of(align: AlignConfig) -> str:
    return "kto" if align.objective == "kto" else "pairs"


preference_bytes = split_sources_key("align")  # align.train/validation/test


@task(cache_policy=CONTENT + CacheKeyFnPolicy(cache_key_fn=preference_bytes))
def validate_preferences(align: AlignConfig, data: DataConfig, run_id: str) -> ValidatedData:
    """Validate and clean every preference line; log cleaned data, quarantine and report under
    align/data; stop before training on too few usable lines or on SFT lines."""
    sources = {split: list(getattr(align, split)) for split in SPLITS}
    with tempfile.TemporaryDirectory() as tmp:
        report = validate_splits(sources, Path(tmp), data, kind=PREFERENCE_KINDS[kind_of(align)])
        (Path(tmp) / "report.json").write_text(
            json.dumps(report.model_dump() | {"totals": report.totals()}, indent=2))
        split_sha256 = {split: sha256_file(Path(tmp) / f"{split}.jsonl") for split in sources
                        if (Path(tmp) / f"{split}.jsonl").is_file()}
        uri = log_dir(run_id, Path(tmp), "align/data")
    metrics: dict[str, float] = {}
    for split, c in report.splits.items():
        for key in ("read", "blank", "kept", "cleaned", "quarantined"):
            metrics[f"align.data.{split}.{key}"] = getattr(c, key)
        metrics |= {f"align.data.{split}.reason.{r}": n for r, n in c.reasons.items()}
    log_metrics(run_id, metrics)
    report.check(uri)
    return ValidatedData(uri=uri, sha256=report.sha256, counts=report.counts,
                         source_sha256=report.source_sha256, split_sha256=split_sha256)


@task(cache_policy=CONTENT)
def tokenize_preferences(
    data: ValidatedData, base: BaseModelRef, cfg: DataConfig, template: PromptTemplate,
    kind: str, run_id: str,
) -> TokenizedData:
    """Prompt + chosen + rejected (or completion) ids as Parquet, rendered with `template`:
    the prompt template the SFT adapter recorded."""
    tokenizer = load_tokenizer(base.path)
    settings = TokenizeSettings(max_length=cfg.max_length, truncation=cfg.truncation)
    folder, report, _ = tokenize_preference_cached(
        cache_root=loraflow_home() / "tokenized", data_dir=fetch(data.uri),
        data_sha256=data.sha256, tokenizer=tokenizer, tokenizer_sha=tokenizer_sha256(base.path),
        template=template, settings=settings, kind=kind)  # type: ignore[arg-type]
    if report.counts["train"] == 0:
        raise ValueError(f"no preference record fits data.max_length={cfg.max_length} tokens "
                         f"({report.too_long['train']} are longer). Fix: raise "
                         "data.max_length.")
    uri = log_dir(run_id, folder, "align/tokenized")
    log_metrics(run_id, {f"align.tokens.{s}": n for s, n in report.tokens.items()})
    zeros = dict.fromkeys(report.counts, 0)
    summary = TokenizeReport(  # the SFT report's fields: records for examples, no label split
        counts=report.counts, too_long=report.too_long, truncated=report.truncated,
        completion_truncated_away=zeros, tokens=report.tokens, label_tokens=zeros,
        rows=report.counts, settings=report.settings)
    return TokenizedData(uri=uri, sha256=sha256_tree(folder), template=template,
                         data_sha256=data.sha256, tokenizer_sha256=tokenizer_sha256(base.path),
                         report=summary)


@task(cache_policy=CONTENT)
def evaluate_preferences(
    base: BaseModelRef, sft: BaseModelRef, adapter: Adapter, tokens: TokenizedData,
    beta: float, run_id: str,
) -> dict[str, dict[str, float]]:
    """Held-out pairs scored for base, SFT and aligned (SFT + the align adapter, the SFT model
    its reference); logged as <label>.pref_<metric>."""
    pad_id = load_tokenizer(sft.path).pad_token_id
    data = fetch(tokens.uri)
    base_scores = evaluate_pairs(base.path, data, pad_id)["model"]
    scores = evaluate_pairs(sft.path, data, pad_id, adapter=fetch(adapter.uri), beta=beta)
    result = {"base": base_scores, "sft": scores["model"], "aligned": scores["adapted"]}
    log_metrics(run_id, {f"{label}.pref_{k}": v for label, m in result.items()
                         for k, v in m.items()})
    # each pair's own scores, for a paired gate on a pref_ metric (none for kto records)
    return result | {"pairs": {"sft": scores.get("model_pairs", []),
                               "aligned": scores.get("adapted_pairs", [])}}


def with_preference(metrics: dict[str, float], scores: dict[str, float]) -> dict[str, float]:
    """Task metrics plus the held-out preference metrics under their pref_ names."""
    return metrics | {f"pref_{k}": v for k, v in scores.items() if k != "pairs"}


def parent_tags(aligned_on: AlignedOn, run_id: str) -> dict[str, str]:
    """The aligned version's tags naming its SFT parent (version, adapter and model hashes)
    and the preference data it was aligned on: registered with it, in the same call."""
    parent = aligned_on.sft_parent
    values = (parent.version, parent.adapter_sha256, parent.model_sha256,
              aligned_on.preference_data_sha256, aligned_on.align_objective)
    log_params(run_id, {"align.sft_parent_version": parent.version,
                        "align.preference_data_sha256": aligned_on.preference_data_sha256})
    return dict(zip(PARENT_TAGS, values, strict=True))


@task(**NETWORK_RETRIES)
def tag_parent_metrics(name: str, version: str, metrics: dict[str, float]) -> None:
    """The SFT parent's held-out preference metrics as its version tags, so a gate on a pref_
    metric compares the aligned model with the champion on the same scale."""
    client = MlflowClient()
    for key, value in registry.metric_tags(metrics).items():
        client.set_model_version_tag(name, version, key, value)


@task(cache_policy=NO_CACHE)
def decide_aligned(
    aligned: Evaluation, sft: SftModel, champion: Evaluation | None,
    pairs: dict[str, list[dict[str, float]]], align: AlignConfig, registry_cfg: RegistryConfig,
    cfg: EvalConfig, run_id: str, exports: Exports | None = None,
) -> GateDecision:
    """The paired decision for the aligned model: against the champion's answers in this run
    (the SFT model's when it is the champion or there is none), on align.gate_metric: a task
    metric of the test sets, or a held-out pair metric (pref_win_rate, pref_logp_margin)
    compared pair by pair with the SFT model; an export below its export.min_agreement blocks
    it, as in the SFT stage's gate."""
    current = registry.champion_files(registry_cfg.model_name)
    if current is None:
        reference, name, version = sft.evaluation, f"SFT model v{sft.parent.version}", None
    else:
        version, name = current.version, f"champion v{current.version}"
        reference = sft.evaluation if current.sha256 == sft.model.sha256 else champion
    candidate = evaluate.read_result(fetch(aligned.uri))
    known = evaluate.read_result(fetch(reference.uri)) if reference is not None else None
    pref = align.gate_metric.startswith("pref_")
    if pref:
        candidate = with_pairs(candidate, pairs["aligned"])
        ours = reference is not None and reference == sft.evaluation and pairs["sft"]
        known = with_pairs(known, pairs["sft"]) if ours else None
    decision = gate.decide(candidate, known, name, registry_cfg, cfg, metric=align.gate_metric,
                           margin=align.min_improvement, set_name="pairs" if pref else None,
                           reference_version=version)
    decision = gate.with_exports(decision, exports.checks if exports else [])
    log_decision(decision, run_id)
    return decision


def with_pairs(result: evaluate.EvalResult, rows: list[dict[str, float]]
               ) -> evaluate.EvalResult:
    """An evaluation with the held-out preference pairs as one more set, "pairs", each pair a
    row (its id: its position in the shipped test split)."""
    examples = [{"id": i, "instruction": "", "input": f"pair {i + 1}", "expected": "",
                 "answer": "", "scores": scores} for i, scores in enumerate(rows)]
    means = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} if rows else {}
    return result.model_copy(update={"sets": result.sets | {"pairs": means},
                                     "examples": result.examples | {"pairs": examples}})

