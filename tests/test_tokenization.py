import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, normalizers, processors
from transformers import AutoTokenizer

from loraflow.config import ConfigError, load_config
from loraflow.data.prompts import (
    ALPACA,
    PromptTemplate,
    encode_prompt,
    prompt_renderer,
    render_example,
    render_prompt,
)
from loraflow.data.records import Example
from loraflow.data.tokenization import IGNORE_INDEX as IGNORE
from loraflow.data.tokenization import (
    Encoder,
    TokenizeSettings,
    encode_example,
    plot_lengths,
    read_tokenized,
    tokenize_cached,
    tokenize_splits,
)
from loraflow.engine.batches import attention_mask_for, collate, read_examples

ASSETS = Path(__file__).parent / "assets"

EXAMPLE = Example(
    instruction="Extract the order.",
    input="3 x AB-100 for Ann",
    output='{"sku":"AB-100","quantity":3}',
)
JINJA = PromptTemplate(
    kind="jinja",
    jinja="{{ bos_token }}Q: {{ instruction }}{% if input %} [{{ input }}]{% endif %}\nA: ",
)
CHAT, ALPACA_LAYOUT = PromptTemplate(kind="chat"), PromptTemplate(kind="alpaca")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")


def examples(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    return [
        Example(
            instruction="Extract the order.",
            input=f"{rng.randint(1, 9)} x AB-{i} " + "word " * rng.randint(0, 40),
            output=json.dumps({"sku": f"AB-{i}", "n": rng.randint(1, 99)}),
        )
        for i in range(n)
    ]


def write_data(folder: Path, splits: dict[str, list[Example]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (folder / f"{split}.jsonl").write_text("".join(r.model_dump_json() + "\n" for r in rows))
    return folder


@pytest.mark.parametrize("template", [CHAT, ALPACA_LAYOUT, JINJA])
def test_labels_cover_the_answer_and_eos_only(tokenizer, template):
    ids, prompt_len, _ = encode_example(tokenizer, template, EXAMPLE)
    batch = collate([[(ids, prompt_len)]], pad_id=tokenizer.pad_token_id)
    labels_ = batch["labels"][0].tolist()
    assert labels_[:prompt_len] == [IGNORE] * prompt_len
    answer = labels_[prompt_len:]
    assert answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer[:-1]) == EXAMPLE.output


def test_padding_is_masked_out_of_labels_and_attention_while_eos_is_trained(tokenizer):
    short = encode_example(tokenizer, CHAT, EXAMPLE)
    long = encode_example(tokenizer, CHAT, EXAMPLE.model_copy(update={"input": "x " * 30}))
    batch = collate([[short], [long]], pad_id=tokenizer.pad_token_id)
    n = len(short[0])
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert (batch["doc_ids"][0, n:] == -1).all() and (batch["doc_ids"][0, :n] == 0).all()
    mask = attention_mask_for(batch["doc_ids"], "sdpa")
    assert not mask[0, 0, :n, n:].any()  # no real token attends to padding
    assert (batch["labels"][0, n:] == IGNORE).all()
    assert batch["labels"][0, n - 1] == tokenizer.eos_token_id  # the "never stops" bug
    # even when pad and EOS share an id (SmolLM2 does), EOS keeps its label
    same = collate([[short], [long]], pad_id=tokenizer.eos_token_id)
    assert same["labels"][0, n - 1] == tokenizer.eos_token_id
    assert (same["labels"][0, n:] == IGNORE).all()


@pytest.mark.parametrize("template", [CHAT, ALPACA_LAYOUT, JINJA])
def test_training_prompt_is_exactly_the_inference_prompt(tokenizer, template):
    ids, prompt_len, _ = encode_example(tokenizer, template, EXAMPLE)
    prompt = render_prompt(tokenizer, template, EXAMPLE.instruction, EXAMPLE.input)
    assert ids[:prompt_len] == encode_prompt(tokenizer, template, prompt)


def test_the_three_templates_render_what_they_promise(tokenizer):
    assert render_prompt(tokenizer, CHAT, "Do it.", "").endswith("<|im_start|>assistant\n")
    prompt = render_prompt(tokenizer, ALPACA_LAYOUT, "Do it.", "this")
    assert prompt == "### Instruction:\nDo it.\n\n### Input:\nthis\n\n### Output:\n"
    assert ALPACA.count("###") == 3
    assert render_prompt(tokenizer, JINJA, "Do it.", "this") == "<|im_start|>Q: Do it. [this]\nA: "


def test_bulk_rendering_and_encoding_equal_the_one_by_one_path(tokenizer):
    batch = [
        *examples(20),
        EXAMPLE.model_copy(update={"messages": [{"role": "system", "content": "Hi"}]}),
    ]
    for template in (CHAT, ALPACA_LAYOUT, JINJA):
        render = prompt_renderer(tokenizer, template)
        assert [render(e) for e in batch] == [render_example(tokenizer, template, e) for e in batch]
        expected = []
        for e in batch:
            prompt = encode_prompt(tokenizer, template, render_example(tokenizer, template, e))
            answer = tokenizer(e.output, add_special_tokens=False)["input_ids"]
            expected.append((prompt + answer + [tokenizer.eos_token_id], len(prompt), []))
        assert Encoder(tokenizer, template).encode(batch) == expected


def test_batches_stream_through_the_encoding_thread_in_line_order(tmp_path, tokenizer, monkeypatch):
    # several batches (the last one short) go through the second thread; none lost or reordered
    monkeypatch.setattr("loraflow.data.tokenization.BATCH", 7)
    rows = examples(30)
    data = write_data(tmp_path / "data", {"train": rows, "validation": []})
    report = tokenize_splits(data, tokenizer, ALPACA_LAYOUT, TokenizeSettings(max_length=4096),
                             tmp_path / "tok", progress=False)
    assert report.counts == {"train": 30, "validation": 0}
    stored = read_tokenized(tmp_path / "tok" / "train.parquet")
    assert stored == [encode_example(tokenizer, ALPACA_LAYOUT, e) for e in rows]


def test_over_max_length_is_dropped_or_truncated_and_a_lost_answer_is_reported(tmp_path, tokenizer):
    long_input = EXAMPLE.model_copy(update={"input": "word " * 200})
    data = write_data(tmp_path / "data", {"train": [EXAMPLE, long_input], "validation": [EXAMPLE]})
    drop = tokenize_splits(data, tokenizer, CHAT, TokenizeSettings(max_length=128),
                           tmp_path / "drop", progress=False)
    assert drop.counts == {"train": 1, "validation": 1}
    assert drop.too_long == {"train": 1, "validation": 0}
    assert [len(ids) <= 128 for ids, *_ in read_tokenized(tmp_path / "drop" / "train.parquet")] == [
        True
    ]

    long_answer = EXAMPLE.model_copy(update={"output": "word " * 200})
    data = write_data(
        tmp_path / "d2", {"train": [EXAMPLE, long_input, long_answer], "validation": []}
    )
    cut = TokenizeSettings(max_length=128, truncation="truncate")
    report = tokenize_splits(data, tokenizer, CHAT, cut, tmp_path / "cut", progress=False)
    assert report.completion_truncated_away["train"] == 1  # the long prompt left no answer
    assert report.truncated["train"] == 1 and report.counts["train"] == 2
    rows = read_tokenized(tmp_path / "cut" / "train.parquet")
    assert all(len(ids) <= 128 and prompt_len < len(ids) for ids, prompt_len, _ in rows)


def test_files_hold_one_example_a_row_unpadded_and_the_engine_reads_them(tmp_path, tokenizer):
    data = write_data(tmp_path / "data", {"train": examples(60), "validation": examples(5, 1)})
    report = tokenize_splits(data, tokenizer, CHAT, TokenizeSettings(max_length=256),
                             tmp_path / "tok", progress=False)
    stored = read_tokenized(tmp_path / "tok" / "train.parquet")
    assert report.rows["train"] == report.counts["train"] == len(stored) == 60
    assert sum(len(ids) for ids, *_ in stored) == report.tokens["train"]  # no padding stored
    assert tokenizer.pad_token_id not in {t for ids, *_ in stored for t in ids}
    assert read_examples(tmp_path / "tok", "train") == stored
    assert read_examples(tmp_path / "tok", "test") == []  # a split without its file


def test_packing_is_the_engines_one_switch():
    """Packing lives in the engine alone (train.batching); the data-side keys say where."""
    with pytest.raises(ConfigError, match="data.packing: no longer here.*train.batching=packed"):
        load_config(None, ["data.packing=true"])
    with pytest.raises(ConfigError, match="data.pack_length: no longer here.*train.seq_len"):
        load_config(None, ["data.pack_length=1024"])
    assert "packing" not in TokenizeSettings.model_fields


def test_the_parquet_files_load_with_datasets(tmp_path, tokenizer):
    from datasets import load_dataset

    data = write_data(tmp_path / "data", {"train": examples(10), "validation": examples(2)})
    tokenize_splits(data, tokenizer, ALPACA_LAYOUT, TokenizeSettings(max_length=256),
                    tmp_path / "tok", progress=False)
    ds = load_dataset(
        "parquet",
        data_files=str(tmp_path / "tok" / "train.parquet"),
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    assert ds.column_names == ["input_ids", "label_spans", "prompt_len"] and len(ds) == 10


def test_tokenized_data_is_cached_on_data_tokenizer_and_template(tmp_path, tokenizer):
    data = write_data(tmp_path / "data", {"train": examples(8), "validation": examples(2)})
    args = (tmp_path / "cache", data, "datahash", tokenizer, "tokhash")
    settings = TokenizeSettings(max_length=256)
    first, report, reused = tokenize_cached(*args, CHAT, settings, progress=False)
    assert not reused and report.counts["train"] == 8
    again, report2, reused = tokenize_cached(*args, CHAT, settings, progress=False)
    assert reused and again == first and report2 == report
    other, _, reused = tokenize_cached(*args, ALPACA_LAYOUT, settings, progress=False)
    assert not reused and other != first
    png = plot_lengths(first / "lengths.npz", 256, tmp_path / "lengths.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- ids by pre-token lookup (loraflow.data.pretokens) ----------------------------------------

# Every ASCII character, runs of white space, the contractions the pre-tokenizer keeps apart,
# the template's markers, added tokens and pieces of them; and some non-ASCII text, which must
# go to the tokenizer itself.
FRAGMENTS = [chr(c) for c in range(128)] + [
    "'s", "'ll", "'D", "  ", "\r\n", " \n\n", "\t ", "### Input:\n", "12.50", " word",
    "<|im_start|>", "<|im_end|>", "<pad>", "<|im_", "\u00e9", "\u2014", "\u00a0", "\U0001f600",
]  # fmt: skip
TEXTS = st.lists(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join), max_size=8)


def tokenizer_ids(backend, texts: list[str], specials: bool) -> list[list[int]]:
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=specials)]


@settings(max_examples=400, deadline=None)
@given(texts=TEXTS, specials=st.booleans())
def test_pretoken_lookup_gives_the_tokenizers_ids(tokenizer, texts, specials):
    encoder = Encoder(tokenizer, ALPACA_LAYOUT)
    assert encoder.pretokens is not None  # the tiny tokenizer is byte-level BPE
    assert encoder._ids(texts, specials) == tokenizer_ids(encoder.backend, texts, specials)


def test_pretoken_lookup_keeps_the_post_processors_special_tokens(tokenizer):
    bos_eos = AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")
    backend = bos_eos.backend_tokenizer
    ids = {t: backend.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>")}
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A <|im_end|>", special_tokens=list(ids.items())
    )
    encoder = Encoder(bos_eos, ALPACA_LAYOUT)
    assert (encoder.pretokens.prefix, encoder.pretokens.suffix) == ([ids["<|im_start|>"]],
                                                                   [ids["<|im_end|>"]])  # fmt: skip
    texts = [render_example(bos_eos, ALPACA_LAYOUT, e) for e in examples(20)]
    assert encoder._ids(texts, True) == tokenizer_ids(backend, texts, True)
    assert encoder._ids(texts, False) == tokenizer_ids(backend, texts, False)


def test_tokenizers_the_lookup_cannot_copy_are_left_to_the_tokenizer(monkeypatch):
    lower = AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()  # ids depend on more than pieces
    stripping = AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")
    stripping.add_tokens([AddedToken("ZZ", lstrip=True)])
    texts = ["Hello World ZZ there", "  MIXED case\n"]
    for tokenizer in (lower, stripping):
        encoder = Encoder(tokenizer, ALPACA_LAYOUT)
        assert encoder.pretokens is None
        assert encoder._ids(texts, False) == tokenizer_ids(encoder.backend, texts, False)


def test_the_pretoken_table_is_emptied_when_full_and_the_ids_stay_right(tokenizer, monkeypatch):
    monkeypatch.setattr("loraflow.data.pretokens.MAX_PIECES", 5)
    encoder = Encoder(tokenizer, ALPACA_LAYOUT)
    texts = [render_example(tokenizer, ALPACA_LAYOUT, e) for e in examples(30)]
    assert encoder._ids(texts, False) == tokenizer_ids(encoder.backend, texts, False)
    assert len(encoder.pretokens.pieces) < 5 + 40  # emptied on the way, not grown to all
