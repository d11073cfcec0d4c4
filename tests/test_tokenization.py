import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, normalizers, processors
from transformers import AutoTokenizer

from loraflow.data import Example
from loraflow.packing import (
    IGNORE,
    Packer,
    collate_packed,
    labels,
    position_ids,
    read_packs,
    read_tokenized,
    unpack,
)
from loraflow.prompts import ALPACA, encode_prompt, prompt_renderer, render_example, render_prompt
from loraflow.tokenization import (
    Encoder,
    TokenizeSettings,
    encode_example,
    plot_lengths,
    tokenize_cached,
    tokenize_splits,
)
from loraflow.train import attention_mask_for, collate, read_examples

ASSETS = Path(__file__).parent / "assets"

EXAMPLE = Example(
    instruction="Extract the order.",
    input="3 x AB-100 for Ann",
    output='{"sku":"AB-100","quantity":3}',
)
JINJA = "{{ bos_token }}Q: {{ instruction }}{% if input %} [{{ input }}]{% endif %}\nA: "


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


@pytest.mark.parametrize("template", ["chat", "alpaca", JINJA])
def test_labels_cover_the_answer_and_eos_only(tokenizer, template):
    ids, prompt_len = encode_example(tokenizer, template, EXAMPLE)
    batch = collate([[(ids, prompt_len)]], pad_id=tokenizer.pad_token_id)
    labels_ = batch["labels"][0].tolist()
    assert labels_[:prompt_len] == [IGNORE] * prompt_len
    answer = labels_[prompt_len:]
    assert answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer[:-1]) == EXAMPLE.output


def test_padding_is_masked_out_of_labels_and_attention_while_eos_is_trained(tokenizer):
    short = encode_example(tokenizer, "chat", EXAMPLE)
    long = encode_example(tokenizer, "chat", EXAMPLE.model_copy(update={"input": "x " * 30}))
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


@pytest.mark.parametrize("template", ["chat", "alpaca", JINJA])
def test_training_prompt_is_exactly_the_inference_prompt(tokenizer, template):
    ids, prompt_len = encode_example(tokenizer, template, EXAMPLE)
    prompt = render_prompt(tokenizer, template, EXAMPLE.instruction, EXAMPLE.input)
    assert ids[:prompt_len] == encode_prompt(tokenizer, template, prompt)


def test_the_three_templates_render_what_they_promise(tokenizer):
    assert render_prompt(tokenizer, "chat", "Do it.", "").endswith("<|im_start|>assistant\n")
    prompt = render_prompt(tokenizer, "alpaca", "Do it.", "this")
    assert prompt == "### Instruction:\nDo it.\n\n### Input:\nthis\n\n### Output:\n"
    assert ALPACA.count("###") == 3
    assert render_prompt(tokenizer, JINJA, "Do it.", "this") == "<|im_start|>Q: Do it. [this]\nA: "


def test_bulk_rendering_and_encoding_equal_the_one_by_one_path(tokenizer):
    batch = [
        *examples(20),
        EXAMPLE.model_copy(update={"messages": [{"role": "system", "content": "Hi"}]}),
    ]
    for template in ("chat", "alpaca", JINJA):
        render = prompt_renderer(tokenizer, template)
        assert [render(e) for e in batch] == [render_example(tokenizer, template, e) for e in batch]
        expected = []
        for e in batch:
            prompt = encode_prompt(tokenizer, template, render_example(tokenizer, template, e))
            answer = tokenizer(e.output, add_special_tokens=False)["input_ids"]
            expected.append((prompt + answer + [tokenizer.eos_token_id], len(prompt)))
        assert Encoder(tokenizer, template).encode(batch) == expected


def test_batches_stream_through_the_encoding_thread_in_line_order(tmp_path, tokenizer, monkeypatch):
    # several batches (the last one short) go through the second thread; none lost or reordered
    monkeypatch.setattr("loraflow.tokenization.BATCH", 7)
    rows = examples(30)
    data = write_data(tmp_path / "data", {"train": rows, "validation": []})
    report = tokenize_splits(data, tokenizer, "alpaca", 4096, tmp_path / "tok", progress=False)
    assert report.counts == {"train": 30, "validation": 0}
    stored = read_tokenized(tmp_path / "tok" / "train.parquet")
    assert stored == [encode_example(tokenizer, "alpaca", e) for e in rows]


def test_over_max_length_is_dropped_or_truncated_and_a_lost_answer_is_reported(tmp_path, tokenizer):
    long_input = EXAMPLE.model_copy(update={"input": "word " * 200})
    data = write_data(tmp_path / "data", {"train": [EXAMPLE, long_input], "validation": [EXAMPLE]})
    drop = tokenize_splits(data, tokenizer, "chat", 128, tmp_path / "drop", progress=False)
    assert drop.counts == {"train": 1, "validation": 1}
    assert drop.too_long == {"train": 1, "validation": 0}
    assert [len(ids) <= 128 for ids, _ in read_tokenized(tmp_path / "drop" / "train.parquet")] == [
        True
    ]

    long_answer = EXAMPLE.model_copy(update={"output": "word " * 200})
    data = write_data(
        tmp_path / "d2", {"train": [EXAMPLE, long_input, long_answer], "validation": []}
    )
    cut = TokenizeSettings(max_length=128, truncation="truncate")
    report = tokenize_splits(data, tokenizer, "chat", cut, tmp_path / "cut", progress=False)
    assert report.completion_truncated_away["train"] == 1  # the long prompt left no answer
    assert report.truncated["train"] == 1 and report.counts["train"] == 2
    rows = read_tokenized(tmp_path / "cut" / "train.parquet")
    assert all(len(ids) <= 128 and prompt_len < len(ids) for ids, prompt_len in rows)


def test_packer_keeps_whole_examples_and_their_boundaries():
    rng = random.Random(1)
    items = [
        ([rng.randint(5, 50) for _ in range(rng.randint(2, 60))], rng.randint(1, 2))
        for _ in range(300)
    ]
    packer = Packer(64, open_limit=4)
    packs = [p for ids, pl in items for p in packer.add(ids, pl)] + packer.flush()
    for pack in packs:
        assert len(pack.input_ids) <= 64 and sum(pack.seq_lens) == len(pack.input_ids)
    assert sorted(ex for p in packs for ex in unpack(p)) == sorted(items)
    filled = sum(len(ids) for ids, _ in items) / (64 * len(packs))
    assert filled > 0.8  # best fit with a few open packs wastes little


def test_packed_batches_label_completions_only_and_restart_positions(tokenizer):
    a = encode_example(tokenizer, "chat", EXAMPLE)
    b = encode_example(tokenizer, "chat", EXAMPLE.model_copy(update={"input": "7 x ZZ-9"}))
    packer = Packer(len(a[0]) + len(b[0]) + 5)
    assert packer.add(*a) == [] and packer.add(*b) == []
    (pack,) = packer.flush()
    batch = collate_packed([pack], pad_id=tokenizer.pad_token_id)
    n_a = len(a[0])
    assert batch["seq_lens"] == [[n_a, len(b[0])]]
    assert batch["position_ids"][0, : n_a + 2].tolist() == [*range(n_a), 0, 1]
    assert batch["document_ids"][0].tolist() == [0] * n_a + [1] * len(b[0])
    got = batch["labels"][0].tolist()
    assert got == labels(*pack)
    expected = [IGNORE] * a[1] + a[0][a[1] :] + [IGNORE] * b[1] + b[0][b[1] :]
    assert got == expected  # answer + EOS of each example and nothing else
    assert position_ids([2, 3]) == [0, 1, 0, 1, 2]


def test_packed_and_unpacked_files_hold_the_same_examples_without_padding(tmp_path, tokenizer):
    data = write_data(tmp_path / "data", {"train": examples(60), "validation": examples(5, 1)})
    plain = tokenize_splits(data, tokenizer, "chat", 256, tmp_path / "plain", progress=False)
    packed_settings = TokenizeSettings(max_length=256, packing=True, pack_length=512)
    packed = tokenize_splits(
        data, tokenizer, "chat", packed_settings, tmp_path / "packed", progress=False
    )
    assert plain.tokens == packed.tokens and plain.counts == packed.counts
    assert packed.rows["train"] < plain.rows["train"]
    unpacked = read_tokenized(tmp_path / "plain" / "train.parquet")
    assert sorted(read_tokenized(tmp_path / "packed" / "train.parquet")) == sorted(unpacked)
    packs = read_packs(tmp_path / "packed" / "train.parquet")
    assert sum(len(p.input_ids) for p in packs) == plain.tokens["train"]  # no padding stored
    assert tokenizer.pad_token_id not in {t for ids, _ in unpacked for t in ids}
    # the training engine reads both, by the split's old .jsonl name too
    assert read_examples(tmp_path / "packed" / "train.jsonl") == read_tokenized(
        tmp_path / "packed" / "train.parquet"
    )
    assert read_examples(tmp_path / "plain" / "test.jsonl") == []


def test_the_parquet_files_load_with_datasets(tmp_path, tokenizer):
    from datasets import load_dataset

    data = write_data(tmp_path / "data", {"train": examples(10), "validation": examples(2)})
    tokenize_splits(data, tokenizer, "alpaca", 256, tmp_path / "tok", progress=False)
    ds = load_dataset(
        "parquet",
        data_files=str(tmp_path / "tok" / "train.parquet"),
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    assert ds.column_names == ["input_ids", "prompt_len"] and len(ds) == 10


def test_tokenized_data_is_cached_on_data_tokenizer_and_template(tmp_path, tokenizer):
    data = write_data(tmp_path / "data", {"train": examples(8), "validation": examples(2)})
    args = (tmp_path / "cache", data, "datahash", tokenizer, "tokhash")
    settings = TokenizeSettings(max_length=256)
    first, report, reused = tokenize_cached(*args, "chat", settings, progress=False)
    assert not reused and report.counts["train"] == 8
    again, report2, reused = tokenize_cached(*args, "chat", settings, progress=False)
    assert reused and again == first and report2 == report
    other, _, reused = tokenize_cached(*args, "alpaca", settings, progress=False)
    assert not reused and other != first
    png = plot_lengths(first / "lengths.npz", 256, tmp_path / "lengths.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- ids by pre-token lookup (loraflow.pretokens) ---------------------------------------------

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
    encoder = Encoder(tokenizer, "alpaca")
    assert encoder.pretokens is not None  # the tiny tokenizer is byte-level BPE
    assert encoder._ids(texts, specials) == tokenizer_ids(encoder.backend, texts, specials)


def test_pretoken_lookup_keeps_the_post_processors_special_tokens(tokenizer):
    bos_eos = AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")
    backend = bos_eos.backend_tokenizer
    ids = {t: backend.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>")}
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A <|im_end|>", special_tokens=list(ids.items())
    )
    encoder = Encoder(bos_eos, "alpaca")
    assert (encoder.pretokens.prefix, encoder.pretokens.suffix) == ([ids["<|im_start|>"]],
                                                                   [ids["<|im_end|>"]])  # fmt: skip
    texts = [render_example(bos_eos, "alpaca", e) for e in examples(20)]
    assert encoder._ids(texts, True) == tokenizer_ids(backend, texts, True)
    assert encoder._ids(texts, False) == tokenizer_ids(backend, texts, False)


def test_tokenizers_the_lookup_cannot_copy_are_left_to_the_tokenizer(monkeypatch):
    lower = AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()  # ids depend on more than pieces
    stripping = AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")
    stripping.add_tokens([AddedToken("ZZ", lstrip=True)])
    texts = ["Hello World ZZ there", "  MIXED case\n"]
    for tokenizer in (lower, stripping):
        encoder = Encoder(tokenizer, "alpaca")
        assert encoder.pretokens is None
        assert encoder._ids(texts, False) == tokenizer_ids(encoder.backend, texts, False)


def test_the_pretoken_table_is_emptied_when_full_and_the_ids_stay_right(tokenizer, monkeypatch):
    monkeypatch.setattr("loraflow.pretokens.MAX_PIECES", 5)
    encoder = Encoder(tokenizer, "alpaca")
    texts = [render_example(tokenizer, "alpaca", e) for e in examples(30)]
    assert encoder._ids(texts, False) == tokenizer_ids(encoder.backend, texts, False)
    assert len(encoder.pretokens.pieces) < 5 + 40  # emptied on the way, not grown to all
