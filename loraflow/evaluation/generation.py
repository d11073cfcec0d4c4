"""Batched generation, shared by evaluation and inference: one prompt template and one decoding
configuration, whatever model answers, so base, tuned and champion are asked the same way."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from loraflow.data.prompts import PromptTemplate, encode_prompt, render_prompt
from loraflow.data.tokenization import IGNORE_INDEX


class Prompt(BaseModel):
    instruction: str
    input: str = ""


class Decoding(BaseModel):
    """How answers are decoded; every field is part of an evaluation's cache key."""

    max_new_tokens: int = 96
    decoding: Literal["greedy", "beam"] = "greedy"
    num_beams: int = 4
    stop: list[str] = []


def generation_config(decoding: Decoding, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """An explicit config, so a model's own generation_config.json (sampling, temperature)
    never changes how it is evaluated."""
    return GenerationConfig(
        max_new_tokens=decoding.max_new_tokens,
        do_sample=False,
        num_beams=decoding.num_beams if decoding.decoding == "beam" else 1,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        stop_strings=decoding.stop or None,
    )


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The answer up to the first stop string."""
    cuts = [text.find(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: PromptTemplate,
    prompts: list[Prompt],
    decoding: Decoding,
    batch_size: int,
    desc: str = "generate",
) -> list[str]:
    """Answers in the order of `prompts`.

    Prompts are batched longest first (less padding), left-padded so that every prompt ends
    where generation starts."""
    model.eval()
    device = next(model.parameters()).device
    config = generation_config(decoding, tokenizer)
    encoded = [
        encode_prompt(
            tokenizer, template, render_prompt(tokenizer, template, p.instruction, p.input)
        )
        for p in prompts
    ]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    answers: dict[int, str] = {}
    with tqdm(total=len(prompts), desc=desc, unit="prompt") as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, i in enumerate(rows):
                input_ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                attention_mask[row, width - len(encoded[i]) :] = 1
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
                tokenizer=tokenizer,  # needed by stop strings
            )
            texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
            for i, text in zip(rows, texts, strict=True):
                answers[i] = cut_at_stop(text, decoding.stop).strip()
            bar.update(len(rows))
    return [answers[i] for i in range(len(prompts))]


@torch.no_grad()
def answer_losses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: PromptTemplate,
    pairs: list[tuple[Prompt, str]],
    batch_size: int,
    desc: str = "loss",
) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, tokens) of each expected answer + EOS given its prompt,
    the same tokens training takes its loss on."""
    model.eval()
    device = next(model.parameters()).device
    examples = []
    for prompt, answer in pairs:
        ids = encode_prompt(
            tokenizer,
            template,
            render_prompt(tokenizer, template, prompt.instruction, prompt.input),
        )
        target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        examples.append((ids + target, len(ids)))
    out: list[tuple[float, int]] = []
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, unit="batch", leave=False):
        batch = examples[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, prompt_len) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
            mask[row, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        shifted = labels[:, 1:].to(device)
        for row in range(len(batch)):  # row by row: one more vocabulary-wide tensor, not B
            nll = torch.nn.functional.cross_entropy(
                logits[row, :-1].float(), shifted[row], ignore_index=IGNORE_INDEX, reduction="sum"
            )
            out.append((float(nll), int((shifted[row] != IGNORE_INDEX).sum())))
    return out
