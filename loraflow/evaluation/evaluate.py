"""Evaluation: any number of named models answer the same test sets with the same template and
decoding; each answer is scored by the set's metrics (loraflow.metrics).

A result holds metrics per set and per example. Its flat `metrics` are what MLflow and the
promotion gate see: `<set>.<metric>` for every set, and the primary (first) set's metrics also
without the prefix (`exact_match`, `json_valid`, ...), plus `thresholds_met` when
eval.thresholds is set.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

from peft import PeftModel
from pydantic import BaseModel

from loraflow.base_model import (
    dtype_name,
    inference_device,
    inference_dtype,
    load_model,
    load_tokenizer,
)
from loraflow.config import LOWER_IS_BETTER, EvalConfig, EvalSetConfig
from loraflow.data.prompts import PromptTemplate
from loraflow.data.records import DataError, read_records
from loraflow.evaluation.generation import (
    BatchSize,
    Decoding,
    Prompt,
    answer_losses,
    answers_of,
    batch_size_for,
    encode_answers,
    encode_prompts,
    generate_ids,
    progress_bar,
)
from loraflow.evaluation.metrics import Scorer, summarise


class EvalExample(BaseModel):
    instruction: str
    input: str = ""
    output: str
    keywords: list[str] = []  # checks of this example's own, beside the set's
    regex: str | None = None


class EvalSet(BaseModel):
    cfg: EvalSetConfig
    source: Path
    examples: list[EvalExample]


class ModelSource(BaseModel):
    """A model to evaluate: a transformers directory, optionally with a LoRA adapter on top."""

    path: Path
    adapter: Path | None = None


class EvalResult(BaseModel):
    label: str
    metrics: dict[str, float]
    sets: dict[str, dict[str, float]]
    examples: dict[str, list[dict[str, Any]]]
    failed_thresholds: list[str] = []
    seconds: float = 0.0
    dtype: str = ""  # the weights' dtype as answered (bf16 on a GPU, fp32 on CPU)
    device: str = ""


def read_test_set(path: Path) -> list[EvalExample]:
    """Every line of a JSONL test set; all bad lines are reported at once with file:line."""
    examples = read_records(
        path, EvalExample, "test set",
        '{"instruction": "...", "input": "...", "output": "..."}, optionally with '
        '"keywords": [...] and "regex": "..."',
        fix="eval.sets[].path=<a JSONL file>",
    )  # fmt: skip
    if not examples:
        raise DataError(f"test set {path} holds no examples")
    return examples


def load_sets(cfg: EvalConfig, heldout: Path) -> list[EvalSet]:
    """The configured test sets; a set without a path is the held-out test split."""
    sets = []
    for set_cfg in cfg.sets:
        source = set_cfg.path or heldout
        examples = read_test_set(source)[: cfg.limit]
        sets.append(EvalSet(cfg=set_cfg, source=source, examples=examples))
    return sets


def evaluation_device() -> tuple[Any, str]:
    """bfloat16 on a GPU that has it (what training computes in; half the bytes a decode step
    reads), else float32: (dtype, device), the choice of base_model.inference_dtype."""
    device = inference_device()
    return inference_dtype(device), device


class SetTokens(NamedTuple):
    """A test set as token ids, tokenized once for generation, the batch size and the loss."""

    prompts: list[list[int]]
    answers: list[list[int]] | None  # the expected answers + EOS where the set scores loss


def encode_sets(
    tokenizer: Any, template: PromptTemplate, sets: list[EvalSet]
) -> dict[str, SetTokens]:
    """Every set's prompts and, where it scores loss, its expected answers as token ids."""
    tokens = {}
    for s in sets:
        prompts = [Prompt(instruction=e.instruction, input=e.input) for e in s.examples]
        expected = [e.output for e in s.examples]
        tokens[s.cfg.name] = SetTokens(
            prompts=encode_prompts(tokenizer, template, prompts),
            answers=encode_answers(tokenizer, expected) if "loss" in s.cfg.metrics else None,
        )
    return tokens


def vllm_answers(
    model: ModelSource, tokens: dict[str, SetTokens], cfg: EvalConfig
) -> dict[str, list[str]]:
    """Every set's answers from vLLM (eval.backend=vllm), before transformers loads the model
    for the loss, so the two never hold GPU memory at once."""
    from loraflow.evaluation import vllm_backend

    prompts = {name: t.prompts for name, t in tokens.items()}
    return vllm_backend.generate_sets(model.path, model.adapter, prompts, Decoding.of(cfg))


def evaluate(
    model: ModelSource,
    sets: list[EvalSet],
    template: PromptTemplate,
    cfg: EvalConfig,
    label: str = "model",
) -> EvalResult:
    """Load one model, answer and score every test set."""
    start = time.perf_counter()
    scorers = {s.cfg.name: Scorer(s.cfg) for s in sets}  # a broken metric fails before loading
    tokenizer = load_tokenizer(model.path)
    tokens = encode_sets(tokenizer, template, sets)
    answers_by_set = vllm_answers(model, tokens, cfg) if cfg.backend == "vllm" else {}
    loaded = load_model(model.path, *evaluation_device())
    if model.adapter is not None:
        loaded = PeftModel.from_pretrained(loaded, model.adapter)
    result = answer_and_score(
        loaded, tokenizer, sets, tokens, cfg, label, scorers=scorers, answers_by_set=answers_by_set
    )
    return result.model_copy(update={"seconds": time.perf_counter() - start})


def evaluate_loaded(
    loaded: Any,
    tokenizer: Any,
    sets: list[EvalSet],
    template: PromptTemplate,
    cfg: EvalConfig,
    label: str = "model",
) -> EvalResult:
    """Answer and score every test set with a model already loaded (merge evaluates the model
    it just merged, without loading it again)."""
    start = time.perf_counter()
    scorers = {s.cfg.name: Scorer(s.cfg) for s in sets}
    tokens = encode_sets(tokenizer, template, sets)
    result = answer_and_score(
        loaded, tokenizer, sets, tokens, cfg, label, scorers=scorers, answers_by_set={}
    )
    return result.model_copy(update={"seconds": time.perf_counter() - start})


def answer_and_score(
    loaded: Any,
    tokenizer: Any,
    sets: list[EvalSet],
    tokens: dict[str, SetTokens],
    cfg: EvalConfig,
    label: str,
    *,
    scorers: dict[str, Scorer],
    answers_by_set: dict[str, list[str]],
) -> EvalResult:
    """Every set answered (by generation, unless answers_by_set holds vLLM's) and scored; the
    result's seconds are the caller's to set."""
    decoding = Decoding.of(cfg)
    per_set: dict[str, dict[str, float]] = {}
    rows_per_set: dict[str, list[dict[str, Any]]] = {}
    for test_set in sets:
        name, encoded = test_set.cfg.name, tokens[test_set.cfg.name]
        what = "answers + loss" if encoded.answers is not None else "answers"
        answers, losses = answer_set(
            loaded, tokenizer, encoded, decoding, cfg.batch_size,
            desc=f"{label} {what} {name}", answers=answers_by_set.get(name),
        )  # fmt: skip
        per_set[name], rows_per_set[name] = score_set(test_set, scorers[name], answers, losses)
    metrics = flat_metrics(per_set, sets[0].cfg.name)
    failed = check_thresholds(metrics, cfg.thresholds)
    if cfg.thresholds:
        metrics["thresholds_met"] = float(not failed)
    return EvalResult(
        label=label,
        metrics=metrics,
        sets=per_set,
        examples=rows_per_set,
        failed_thresholds=failed,
        dtype=dtype_name(next(loaded.parameters()).dtype),
        device=str(next(loaded.parameters()).device.type),
    )


def answer_set(
    loaded: Any,
    tokenizer: Any,
    tokens: SetTokens,
    decoding: Decoding,
    batch_size: BatchSize,
    desc: str,
    answers: list[str] | None,
) -> tuple[list[str], list[tuple[float, int]] | None]:
    """The set's answers (`answers`: vLLM's, else generated here) and, where the set scores
    loss, each expected answer's (summed NLL, tokens); in batches of eval.batch_size, auto
    sized here, where the model and the prompts are known."""
    size = batch_size_for(batch_size, loaded, tokens.prompts, decoding)
    if answers is not None:
        if tokens.answers is None:
            return answers, None
        return answers, answer_losses(loaded, tokenizer, tokens.prompts, tokens.answers, size)
    with progress_bar(len(tokens.prompts), desc) as update:
        ids, losses = generate_ids(
            loaded, tokenizer, tokens.prompts, decoding, size, progress=update,
            targets=tokens.answers,
        )  # fmt: skip
    return answers_of(tokenizer, ids, decoding), losses


def score_set(
    test_set: EvalSet,
    scorer: Scorer,
    answers: list[str],
    losses: list[tuple[float, int]] | None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The set's summary metrics and its rows (prompt, expected, answer, scores)."""
    examples = test_set.examples
    scores = [
        scorer.score(a, e.output, tuple(e.keywords), e.regex)
        for a, e in zip(answers, examples, strict=True)
    ]
    summary = summarise(scores)  # before the rows' loss: the set's is per token, not per row
    if losses is not None:
        for row, (nll, n) in zip(scores, losses, strict=True):
            row["loss"] = nll / n
        summary["loss"] = sum(nll for nll, _ in losses) / sum(n for _, n in losses)
        summary["perplexity"] = math.exp(min(summary["loss"], 50.0))
    summary["examples"] = float(len(examples))
    rows = [
        {"instruction": e.instruction, "input": e.input, "expected": e.output, "answer": a,
         "scores": s}
        for e, a, s in zip(examples, answers, scores, strict=True)
    ]  # fmt: skip
    return summary, rows


def evaluate_models(
    models: dict[str, ModelSource], sets: list[EvalSet], template: PromptTemplate, cfg: EvalConfig
) -> dict[str, EvalResult]:
    """Several named models (base, tuned, champion, ...) on the same prompts and decoding."""
    return {label: evaluate(m, sets, template, cfg, label=label) for label, m in models.items()}


def flat_metrics(per_set: dict[str, dict[str, float]], primary: str) -> dict[str, float]:
    flat = dict(per_set[primary])
    for name, metrics in per_set.items():
        flat |= {f"{name}.{k}": v for k, v in metrics.items()}
    return flat


def check_thresholds(metrics: dict[str, float], thresholds: dict[str, float]) -> list[str]:
    """One line per threshold the metrics miss (loss and perplexity are ceilings)."""
    failed = []
    for key, bound in thresholds.items():
        value = metrics.get(key)
        lower = key.rpartition(".")[2] in LOWER_IS_BETTER
        if value is None or (value > bound if lower else value < bound):
            relation = "at most" if lower else "at least"
            failed.append(f"{key} = {value} (must be {relation} {bound})")
    return failed


class AnswerParity(BaseModel):
    """One model's test-set answers against another's, prompt by prompt: the merged model
    against base + adapter (loraflow.release.merge)."""

    answers: int
    differing: int
    max_differing: float  # the fraction of answers allowed to differ (merge.max_differing)
    passed: bool
    reference_dtype: str  # the reference answered in this dtype
    examples: list[dict[str, str]]  # the differing answers (the first PARITY_EXAMPLES)


PARITY_EXAMPLES = 50


def compare_answers(
    reference: EvalResult, merged: EvalResult, max_differing: float
) -> AnswerParity:
    """Count the prompts whose answers differ between two results of the same test sets."""
    answers, differing = 0, []
    for set_name, rows in reference.examples.items():
        for index, (ref, new) in enumerate(zip(rows, merged.examples[set_name], strict=True)):
            answers += 1
            if ref["answer"] != new["answer"]:
                differing.append({"set": set_name, "index": str(index),
                                  "prompt": ref["input"] or ref["instruction"],
                                  "adapter": ref["answer"], "merged": new["answer"]})
    return AnswerParity(
        answers=answers,
        differing=len(differing),
        max_differing=max_differing,
        passed=len(differing) <= max_differing * answers,
        reference_dtype=reference.dtype,
        examples=differing[:PARITY_EXAMPLES],
    )


def write_result(result: EvalResult, out_dir: Path) -> Path:
    """metrics.json, and <set>.jsonl with every example's prompt, answer and scores."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = result.model_dump(exclude={"examples"})
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    for name, rows in result.examples.items():
        with open(out_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return out_dir


def read_result(out_dir: Path) -> EvalResult:
    summary = json.loads((out_dir / "metrics.json").read_text())
    examples = {}
    for name in summary["sets"]:
        with open(out_dir / f"{name}.jsonl", encoding="utf-8") as f:
            examples[name] = [json.loads(line) for line in f]
    return EvalResult(**summary, examples=examples)
