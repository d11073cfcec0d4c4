import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from loraflow.data import Example
from loraflow.prompts import ALPACA, encode_prompt, render_prompt
from loraflow.tokenization import encode_example, tokenize_splits
from loraflow.train import attention_mask_for, collate

ASSETS = Path(__file__).parent / "assets"

EXAMPLE = Example(
    instruction="Extract the order.",
    input="3 x AB-100 for Ann",
    output='{"sku":"AB-100","quantity":3}',
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_labels_cover_the_answer_and_eos_only(tokenizer, template):
    ids, prompt_len = encode_example(tokenizer, template, EXAMPLE)
    batch = collate([[(ids, prompt_len)]], pad_id=tokenizer.pad_token_id)
    labels = batch["labels"][0].tolist()
    assert labels[:prompt_len] == [-100] * prompt_len
    answer = labels[prompt_len:]
    assert answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer[:-1]) == EXAMPLE.output


def test_padding_is_masked_out_of_labels_and_attention_while_eos_is_trained(tokenizer):
    short = encode_example(tokenizer, "chat", EXAMPLE)
    long = encode_example(tokenizer, "chat", EXAMPLE.model_copy(update={"input": "x " * 30}))
    batch = collate([[short], [long]], pad_id=tokenizer.pad_token_id)
    n = len(short[0])
    assert (batch["doc_ids"][0, n:] == -1).all() and (batch["doc_ids"][0, :n] == 0).all()
    mask = attention_mask_for(batch["doc_ids"], "sdpa")
    assert not mask[0, 0, :n, n:].any()  # no real token attends to padding
    assert (batch["labels"][0, n:] == -100).all()
    assert batch["labels"][0, n - 1] == tokenizer.eos_token_id  # the "never stops" bug
    # even when pad and EOS share an id (SmolLM2 does), EOS keeps its label
    same = collate([[short], [long]], pad_id=tokenizer.eos_token_id)
    assert same["labels"][0, n - 1] == tokenizer.eos_token_id
    assert (same["labels"][0, n:] == -100).all()


def test_training_prompt_is_exactly_the_inference_prompt(tokenizer):
    ids, prompt_len = encode_example(tokenizer, "chat", EXAMPLE)
    prompt = render_prompt(tokenizer, "chat", EXAMPLE.instruction, EXAMPLE.input)
    assert ids[:prompt_len] == encode_prompt(tokenizer, "chat", prompt)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_alpaca_template_is_the_guides_layout(tokenizer):
    prompt = render_prompt(tokenizer, "alpaca", "Do it.", "this")
    assert prompt == "### Instruction:\nDo it.\n\n### Input:\nthis\n\n### Output:\n"
    assert ALPACA.count("###") == 3


def test_too_long_examples_are_counted_not_cut(tmp_path, tokenizer):
    data = tmp_path / "data"
    data.mkdir()
    long = EXAMPLE.model_copy(update={"input": "word " * 200})
    for split, rows in {"train": [EXAMPLE, long], "validation": [EXAMPLE]}.items():
        (data / f"{split}.jsonl").write_text("".join(r.model_dump_json() + "\n" for r in rows))
    report = tokenize_splits(data, tokenizer, "chat", 128, tmp_path / "out")
    assert report.counts == {"train": 1, "validation": 1}
    assert report.too_long == {"train": 1, "validation": 0}
    rows = [
        json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 1 and len(rows[0]["input_ids"]) <= 128
