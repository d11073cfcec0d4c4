"""The one generation path (loraflow.evaluation.generation) gives the greedy answers of plain
`model.generate` on each prompt alone, whatever the batching: prompts of mixed lengths, rows that
finish at different steps (EOS, stop strings), a static cache, batch_size=auto."""

import copy

import pytest
import torch

from loraflow.base_model import load_model, load_tokenizer
from loraflow.data.prompts import PromptTemplate
from loraflow.evaluation.generation import (
    CPU_BATCH,
    Decoding,
    Prompt,
    _greedy_static,
    answer_losses,
    answers_of,
    auto_batch_size,
    batch_size_for,
    common_prefix,
    encode_answers,
    encode_prompts,
    generate,
    generate_ids,
    length_batches,
)

CHAT, ALPACA = PromptTemplate(kind="chat"), PromptTemplate(kind="alpaca")
PROMPTS = [
    Prompt(instruction="Extract the order", input="3 of AB-1 for Ana, by Friday, to Oslo"),
    Prompt(instruction="short"),
    Prompt(instruction="Say hello in one word."),
    Prompt(instruction="List three colours", input="red green"),
    Prompt(instruction="x"),
]


@pytest.fixture(scope="module")
def chatty(chatty_model_dir):
    return load_model(chatty_model_dir), load_tokenizer(chatty_model_dir)


def plain_generate(model, tokenizer, ids: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """`model.generate` on one prompt, no padding: the reference every path must reproduce."""
    prompt = torch.tensor([ids])
    out = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )
    return out[0, len(ids) :].tolist()


def with_eos(tokenizer, token_id: int):
    """A copy of the tokenizer whose EOS is a token the model does generate, so rows end early."""
    other = copy.deepcopy(tokenizer)
    other.eos_token = other.convert_ids_to_tokens(token_id)
    assert other.eos_token_id == token_id
    return other


def test_prompts_are_batched_by_length_and_answers_come_back_in_prompt_order():
    encoded = [[1] * n for n in (5, 1, 9, 3, 7)]
    assert length_batches(encoded, 2) == [[2, 4], [0, 3], [1]]


@pytest.mark.parametrize("compiled", [False, True], ids=["dropping-finished", "static-cache"])
def test_greedy_answers_equal_plain_generate_on_each_prompt_alone(chatty, compiled):
    model, tokenizer = chatty
    encoded = encode_prompts(tokenizer, CHAT, PROMPTS)
    assert len({len(e) for e in encoded}) == len(encoded)  # mixed lengths: padding happens
    free = plain_generate(model, tokenizer, encoded[0], 12)
    # EOS := the 4th token prompt 0 generates: rows now finish at different steps
    tokenizer = with_eos(tokenizer, free[3])
    reference = [plain_generate(model, tokenizer, ids, 12) for ids in encoded]
    lengths = {len(r) for r in reference}
    assert len(lengths) > 1 and reference[0][-1] == tokenizer.eos_token_id, lengths

    for batch_size in (1, 2, 3, "auto"):
        decoding = Decoding(max_new_tokens=12)
        size = batch_size_for(batch_size, model, encoded, decoding)
        got = generate_ids(model, tokenizer, encoded, decoding, size, compiled=compiled).ids
        assert got == reference, batch_size


@pytest.mark.parametrize("lag", [0, 1, 3])
def test_the_static_cache_loop_reading_tokens_late_ends_each_row_where_generate_does(chatty, lag):
    """The GPU's loop reads each step's tokens `lag` steps after the device made them (no wait
    per step); on CPU the same loop with a lag: rows ending at EOS, at a stop string, and EOS
    held back by min_new_tokens must come out as plain generate's, and no later."""
    model, tokenizer = chatty
    encoded = encode_prompts(tokenizer, CHAT, PROMPTS)
    tokenizer = with_eos(tokenizer, plain_generate(model, tokenizer, encoded[0], 12)[3])
    reference = [plain_generate(model, tokenizer, ids, 12) for ids in encoded]
    assert len({len(r) for r in reference}) > 1  # rows end at different steps
    cache_len = max(map(len, encoded)) + 12
    got = _greedy_static(model, tokenizer, encoded, Decoding(max_new_tokens=12), cache_len, lag)
    assert got == reference

    held = Decoding(max_new_tokens=12, min_new_tokens=6)
    later = [plain_generate(model, tokenizer, ids, 12, min_new_tokens=6) for ids in encoded]
    assert later != reference
    assert _greedy_static(model, tokenizer, encoded, held, cache_len, lag) == later

    text = tokenizer.decode(reference[1], skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    stopped = _greedy_static(
        model, tokenizer, encoded, Decoding(max_new_tokens=12, stop=[stop]), cache_len, lag
    )
    for ids, full in zip(stopped, reference, strict=True):
        answer = tokenizer.decode(ids, skip_special_tokens=True)
        if stop in tokenizer.decode(full, skip_special_tokens=True):  # ends at the stop string
            before = tokenizer.decode(ids[:-1], skip_special_tokens=True)
            assert stop in answer and stop not in before
        assert ids == full[: len(ids)]


def test_one_prompt_forward_gives_the_answers_and_the_losses_of_the_separate_passes(chatty):
    model, tokenizer = chatty
    assert common_prefix(encode_prompts(tokenizer, CHAT, PROMPTS)) > 0  # the shared-prefix path
    expected = ["blue", "a longer expected answer of several words", "x", "1 2 3", ""]
    decoding = Decoding(max_new_tokens=6)
    encoded, targets = encode_prompts(tokenizer, CHAT, PROMPTS), encode_answers(tokenizer, expected)
    ids, losses = generate_ids(
        model, tokenizer, encoded, decoding, 3, compiled=False, targets=targets
    )
    assert answers_of(tokenizer, ids, decoding) == generate(
        model, tokenizer, CHAT, PROMPTS, decoding, 1
    )
    alone = [answer_losses(model, tokenizer, [prompt], [target], 1)[0]
             for prompt, target in zip(encoded, targets, strict=True)]  # fmt: skip
    assert [n for _, n in losses] == [n for _, n in alone]
    assert [nll for nll, _ in losses] == pytest.approx([nll for nll, _ in alone], rel=1e-5)


def test_min_new_tokens_holds_eos_back_as_generate_does(chatty):
    model, tokenizer = chatty
    encoded = encode_prompts(tokenizer, CHAT, PROMPTS[:3])
    tokenizer = with_eos(tokenizer, plain_generate(model, tokenizer, encoded[0], 6)[1])
    reference = [plain_generate(model, tokenizer, e, 8, min_new_tokens=8) for e in encoded]
    assert all(len(r) == 8 for r in reference)
    decoding = Decoding(max_new_tokens=8, min_new_tokens=8)
    assert generate_ids(model, tokenizer, encoded, decoding, 3).ids == reference


def test_a_stop_string_ends_its_row_and_is_cut_from_the_answer(chatty):
    model, tokenizer = chatty
    full = generate(model, tokenizer, ALPACA, PROMPTS, Decoding(max_new_tokens=16), 5)
    stop = full[0][4:6]
    cut = generate(model, tokenizer, ALPACA, PROMPTS, Decoding(max_new_tokens=16, stop=[stop]), 5)
    assert cut[0] == full[0][: full[0].find(stop)].strip()
    for before, after in zip(full, cut, strict=True):  # the other rows: cut only if they hold it
        assert after == (before[: before.find(stop)] if stop in before else before).strip()
    # the stopped row left the batch: its new ids end at the stop string, not at max_new_tokens
    encoded = encode_prompts(tokenizer, ALPACA, PROMPTS)
    ids = generate_ids(model, tokenizer, encoded, Decoding(max_new_tokens=16, stop=[stop]), 5).ids
    assert len(ids[0]) < 16 and stop in tokenizer.decode(ids[0], skip_special_tokens=True)


def test_beam_search_answers_equal_generate_with_beams(chatty):
    model, tokenizer = chatty
    encoded = encode_prompts(tokenizer, CHAT, PROMPTS[:2])
    decoding = Decoding(max_new_tokens=6, strategy="beam", num_beams=3)
    reference = [plain_generate(model, tokenizer, e, 6, num_beams=3) for e in encoded]
    assert generate_ids(model, tokenizer, encoded, decoding, 1).ids == reference


def test_auto_batch_size_on_cpu_is_the_fixed_default_in_even_batches(chatty):
    model, _ = chatty
    assert auto_batch_size(model, 100, Decoding(), 3) == 3
    assert auto_batch_size(model, 100, Decoding(), 64) == CPU_BATCH
    # 20 prompts: two batches of 10, not 16 + 4
    assert auto_batch_size(model, 100, Decoding(), CPU_BATCH + 4) == (CPU_BATCH + 4) // 2


def test_the_vllm_backend_without_vllm_names_the_fix(tiny_model_dir, small_data, monkeypatch):
    from loraflow.config import EvalConfig
    from loraflow.evaluation import vllm_backend
    from loraflow.evaluation.evaluate import ModelSource, evaluate, load_sets

    monkeypatch.setattr(vllm_backend, "available", lambda: False)
    cfg = EvalConfig(backend="vllm", max_new_tokens=2)
    sets = load_sets(cfg, small_data["test"])
    with pytest.raises(vllm_backend.BackendError, match="pip install vllm"):
        evaluate(ModelSource(path=tiny_model_dir), sets, CHAT, cfg)


@pytest.mark.gpu
def test_the_vllm_backend_gives_the_greedy_answers_of_transformers(tiny_model_dir, small_data):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA GPU")
    from loraflow.config import EvalConfig
    from loraflow.evaluation.evaluate import ModelSource, evaluate, load_sets

    cfg = EvalConfig(max_new_tokens=8, sets=[{"name": "test", "metrics": ["exact_match"]}])
    sets = load_sets(cfg, small_data["test"])
    by_transformers = evaluate(ModelSource(path=tiny_model_dir), sets, CHAT, cfg)
    by_vllm = evaluate(
        ModelSource(path=tiny_model_dir), sets, CHAT, cfg.model_copy(update={"backend": "vllm"})
    )
    answers = [[r["answer"] for r in res.examples["test"]] for res in (by_transformers, by_vllm)]
    assert len(answers[1]) == len(sets[0].examples)
    # the tiny random model in float32 vs vLLM's kernels: most answers agree, near-ties may flip
    assert sum(a == b for a, b in zip(*answers, strict=True)) >= len(answers[0]) // 2
