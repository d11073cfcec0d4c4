"""Evaluation: the same prompts, template and greedy decoding for the base and the tuned model.

Metrics (each in 0..1): json_valid, the share of answers that parse as JSON; exact_match, the
share equal to the expected answer (as JSON values when both parse, else as stripped text).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from pydantic import BaseModel
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from loraflow.config import EvalConfig
from loraflow.data import Example, read_jsonl
from loraflow.model import load_model, load_tokenizer
from loraflow.prompts import encode_prompt, render_example


class EvalResult(BaseModel):
    metrics: dict[str, float]
    examples: list[dict[str, Any]]


def parse_json(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(text)
    except json.JSONDecodeError:
        return False, None


def score(prediction: str, expected: str) -> dict[str, bool]:
    valid, value = parse_json(prediction)
    expected_valid, expected_value = parse_json(expected)
    same = (
        value == expected_value
        if valid and expected_valid
        else prediction.strip() == expected.strip()
    )
    return {"json_valid": valid, "exact_match": same}


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    examples: list[Example],
    max_new_tokens: int,
    batch_size: int,
    desc: str = "generate",
) -> list[str]:
    """Greedy answers, batched with left padding so every prompt ends where generation starts."""
    model.eval()
    device = next(model.parameters()).device
    answers: list[str] = []
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, unit="batch"):
        batch = examples[start : start + batch_size]
        prompts = [
            encode_prompt(tokenizer, template, render_example(tokenizer, template, e))
            for e in batch
        ]
        width = max(map(len, prompts))
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        answers += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return [a.strip() for a in answers]


def evaluate(
    base_path: Path,
    adapter_path: Path | None,
    test_file: Path,
    template: str,
    cfg: EvalConfig,
    label: str = "model",
) -> EvalResult:
    """Generate for every test example and score the answers."""
    tokenizer = load_tokenizer(base_path)
    model = load_model(base_path)
    if adapter_path is not None:
        model = PeftModel.from_pretrained(model, adapter_path)
    examples = list(read_jsonl(test_file))[: cfg.limit]
    answers = generate(
        model,
        tokenizer,
        template,
        examples,
        cfg.max_new_tokens,
        cfg.batch_size,
        desc=f"generate ({label})",
    )
    rows = [
        {"input": e.input, "expected": e.output, "answer": a, **score(a, e.output)}
        for e, a in zip(examples, answers, strict=True)
    ]
    n = len(rows)
    metrics = {
        "json_valid": sum(r["json_valid"] for r in rows) / n,
        "exact_match": sum(r["exact_match"] for r in rows) / n,
        "examples": float(n),
    }
    return EvalResult(metrics=metrics, examples=rows)
