"""Tokenizing validated examples into prompt + completion ids, with no padding stored.

Each record keeps `input_ids` (prompt, then the answer and EOS) and `prompt_len`; the training
engine derives labels from them: -100 on the prompt, so loss is taken on the answer and on the
EOS token only (that is what teaches the model to stop).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from loraflow.data import Example, read_jsonl
from loraflow.prompts import Template, encode_prompt, render_prompt

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
)


class TokenizeReport(BaseModel):
    counts: dict[str, int]
    too_long: dict[str, int]
    tokens: dict[str, int]


def tokenizer_sha256(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (Path(model_dir) / name).is_file():
            digest.update(name.encode() + b"\0" + (Path(model_dir) / name).read_bytes())
    return digest.hexdigest()


def encode_example(
    tokenizer: PreTrainedTokenizerBase, template: Template, example: Example
) -> tuple[list[int], int]:
    """(input_ids, prompt_len): the prompt's ids, then the answer's ids and EOS."""
    prompt = encode_prompt(
        tokenizer, template, render_prompt(tokenizer, template, example.instruction, example.input)
    )
    answer = tokenizer(example.output, add_special_tokens=False)["input_ids"]
    return prompt + answer + [tokenizer.eos_token_id], len(prompt)


def tokenize_splits(
    data_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    template: Template,
    max_length: int,
    out_dir: Path,
    splits: tuple[str, ...] = ("train", "validation"),
) -> TokenizeReport:
    """Write out_dir/<split>.jsonl of {"input_ids", "prompt_len"}; longer than max_length is
    left out and counted, never cut (a cut answer teaches a wrong answer)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts, too_long, tokens = {}, {}, {}
    for split in splits:
        kept = skipped = total = 0
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for example in tqdm(
                read_jsonl(Path(data_dir) / f"{split}.jsonl"),
                desc=f"tokenize {split}",
                unit="ex",
                leave=False,
            ):
                ids, prompt_len = encode_example(tokenizer, template, example)
                if len(ids) > max_length:
                    skipped += 1
                    continue
                f.write(json.dumps({"input_ids": ids, "prompt_len": prompt_len}) + "\n")
                kept += 1
                total += len(ids)
        counts[split], too_long[split], tokens[split] = kept, skipped, total
    return TokenizeReport(counts=counts, too_long=too_long, tokens=tokens)
