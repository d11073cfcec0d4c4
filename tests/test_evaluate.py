"""Evaluation on the tiny random Llama: several named models, several test sets, the same
prompts and decoding for each, results per set and per example."""

import json
import math
from pathlib import Path

import pytest
import torch

from loraflow.base_model import load_model, load_tokenizer
from loraflow.config import EvalConfig, EvalSetConfig, LoraSettings
from loraflow.data.prompts import PromptTemplate, encode_prompt, render_prompt
from loraflow.data.records import DataError
from loraflow.engine.model import add_lora
from loraflow.evaluation.evaluate import (
    ModelSource,
    evaluate_models,
    load_sets,
    read_result,
    write_result,
)
from loraflow.evaluation.generation import (
    Decoding,
    Prompt,
    answer_losses,
    encode_answers,
    encode_prompts,
    generate,
)

CHAT, ALPACA = PromptTemplate(kind="chat"), PromptTemplate(kind="alpaca")


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter whose B matrices are not zero, so the tuned model answers differently."""
    torch.manual_seed(1)
    model = add_lora(load_model(tiny_model_dir), LoraSettings())
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    return path


@pytest.fixture
def curated(tmp_path) -> Path:
    rows = [
        {"instruction": "Say hi", "input": "", "output": "hi", "keywords": ["hi"]},
        {"instruction": "Count", "input": "1 2", "output": "3", "regex": r"\d"},
    ]
    path = tmp_path / "curated.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_named_models_answer_the_same_prompts_and_are_scored_per_set_and_example(
    tiny_model_dir, tiny_adapter, small_data, curated, tmp_path
):
    cfg = EvalConfig(
        max_new_tokens=6,
        batch_size=3,
        sets=[
            EvalSetConfig(name="heldout"),
            EvalSetConfig(name="curated", path=curated, metrics=["exact_match", "fuzzy"]),
        ],
        thresholds={"exact_match": 0.5},
    )
    sets = load_sets(cfg, small_data["test"])
    models = {
        "base": ModelSource(path=tiny_model_dir),
        "tuned": ModelSource(path=tiny_model_dir, adapter=tiny_adapter),
    }
    results = evaluate_models(models, sets, CHAT, cfg)

    assert list(results) == ["base", "tuned"]
    for label, result in results.items():
        assert list(result.sets) == ["heldout", "curated"]
        heldout = result.examples["heldout"]
        assert [r["input"] for r in heldout] == [e.input for e in sets[0].examples]
        assert set(heldout[0]["scores"]) == {
            "json_valid", "json_structure", "exact_match", "fuzzy", "loss"
        }
        curated_rows = result.examples["curated"]
        assert curated_rows[0]["scores"].keys() == {"exact_match", "fuzzy", "keywords"}
        assert curated_rows[1]["scores"].keys() == {"exact_match", "fuzzy", "regex"}
        # flat metrics: primary unprefixed, every set prefixed
        m = result.metrics
        assert m["exact_match"] == m["heldout.exact_match"]
        assert "curated.fuzzy_p50" in m and "curated.loss" not in m
        assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
        assert m["examples"] == 4 and m["curated.examples"] == 2
        assert m["thresholds_met"] == 0.0 and result.failed_thresholds == [
            f"exact_match = {m['exact_match']} (must be at least 0.5)"
        ]
        assert results[label].label == label
    # the adapter changes the model: its loss on the expected answers differs
    assert results["base"].metrics["loss"] != pytest.approx(results["tuned"].metrics["loss"])

    written = write_result(results["tuned"], tmp_path / "tuned")
    assert read_result(written) == results["tuned"]


def test_batched_generation_returns_each_answer_in_prompt_order(chatty_model_dir, small_data):
    tokenizer, model = load_tokenizer(chatty_model_dir), load_model(chatty_model_dir)
    sets = load_sets(EvalConfig(), small_data["test"])
    prompts = [Prompt(instruction=e.instruction, input=e.input) for e in sets[0].examples]
    prompts.append(Prompt(instruction="short"))  # a different length, so padding happens
    decoding = Decoding(max_new_tokens=5)
    one_by_one = [generate(model, tokenizer, CHAT, [p], decoding, 1)[0] for p in prompts]
    assert len(set(one_by_one)) == len(prompts)  # distinct answers, so order is visible
    assert generate(model, tokenizer, CHAT, prompts, decoding, batch_size=3) == one_by_one
    beams = generate(model, tokenizer, CHAT, prompts[:2], decoding.model_copy(
        update={"strategy": "beam", "num_beams": 3}), batch_size=2)
    assert len(beams) == 2 and all(isinstance(b, str) for b in beams)


def test_a_stop_string_ends_the_answer_before_it(chatty_model_dir):
    tokenizer, model = load_tokenizer(chatty_model_dir), load_model(chatty_model_dir)
    prompt = [Prompt(instruction="Extract the order", input="3 of AB-1 for Ana")]
    full = generate(model, tokenizer, ALPACA, prompt, Decoding(max_new_tokens=24), 1)[0]
    assert len(full) > 6, full
    stop = full[4:6]  # greedy decoding is deterministic: the same text comes again
    cut = generate(model, tokenizer, ALPACA, prompt,
                   Decoding(max_new_tokens=24, stop=[stop]), 1)[0]
    assert cut == full[: full.find(stop)].strip()


def test_held_out_loss_is_the_models_own_loss_on_the_answer_tokens(tiny_model_dir):
    tokenizer, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    prompt, answer = Prompt(instruction="Name a colour", input=""), "blue"
    [(nll, n)] = answer_losses(model, tokenizer, encode_prompts(tokenizer, CHAT, [prompt]),
                               encode_answers(tokenizer, [answer]), batch_size=1)
    ids = encode_prompt(tokenizer, CHAT, render_prompt(tokenizer, CHAT, prompt.instruction, ""))
    target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    labels = [-100] * len(ids) + target
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([ids + target]), labels=torch.tensor([labels]))
    assert n == len(target)
    assert nll / n == pytest.approx(float(reference.loss), rel=1e-5)


def test_a_bad_curated_line_is_reported_with_file_and_line(tmp_path, small_data):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"instruction": "x"}\n')
    cfg = EvalConfig(sets=[EvalSetConfig(name="test"), EvalSetConfig(name="c", path=bad)])
    with pytest.raises(DataError, match=r"bad.jsonl:2: output: Field required"):
        load_sets(cfg, small_data["test"])
    with pytest.raises(DataError, match="does not exist"):
        load_sets(EvalConfig(sets=[EvalSetConfig(name="c", path=tmp_path / "no.jsonl")]),
                  small_data["test"])


def test_decoding_defaults_are_evals_and_the_eval_section_maps_onto_it():
    """`loraflow generate`, inference and the served model ask as the pipeline's eval does."""
    assert Decoding.of(EvalConfig()) == Decoding()
    cfg = EvalConfig(max_new_tokens=7, decoding="beam", num_beams=3, stop=["\n"])
    assert Decoding.of(cfg) == Decoding(max_new_tokens=7, strategy="beam", num_beams=3,
                                        stop=["\n"])
