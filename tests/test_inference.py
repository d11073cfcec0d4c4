"""Inference a user calls: by registry alias or local path, with the recorded template, from
Python and from `loraflow generate`."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraflow.base_model import ModelNotFoundError, load_model, load_tokenizer
from loraflow.data.prompts import PromptTemplate
from loraflow.data.records import DataError
from loraflow.evaluation.generation import Decoding, Prompt, generate
from loraflow.release.inference import (
    InferenceError,
    generate_answers,
    load_for_inference,
    read_prompts,
    resolve_model,
)

PROMPTS = [
    Prompt(instruction="Extract the order", input="3 of AB-1 for Ana"),
    Prompt(instruction="Extract the order", input="Maria wants 12 units"),
]


@pytest.fixture(scope="module")
def merged_dir(chatty_model_dir, tmp_path_factory) -> Path:
    """A model directory as merge_adapter leaves it: weights, tokenizer and loraflow.json,
    which records that the model was trained on the alpaca template."""
    path = tmp_path_factory.mktemp("merged") / "model"
    shutil.copytree(chatty_model_dir, path)
    (path / "loraflow.json").write_text(json.dumps({"template": "alpaca", "base_model": "tiny"}))
    return path


def direct(model_dir: Path, template: str, prompts=PROMPTS, **decoding) -> list[str]:
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    return generate(model, tokenizer, PromptTemplate(kind=template), prompts,
                    Decoding(**decoding), batch_size=2)


def test_a_local_model_answers_with_the_template_recorded_with_it(merged_dir):
    answers = generate_answers(merged_dir, PROMPTS, Decoding(max_new_tokens=8))
    assert answers == direct(merged_dir, "alpaca", max_new_tokens=8)
    assert answers != direct(merged_dir, "chat", max_new_tokens=8)  # the template matters
    overridden = generate_answers(merged_dir, PROMPTS, Decoding(max_new_tokens=8), template="chat")
    assert overridden == direct(merged_dir, "chat", max_new_tokens=8)


def test_a_registered_model_loads_by_alias_and_by_version(merged_dir):
    # imported here: the GPU machine runs this file's gpu tests and has no MLflow
    from mlflow import MlflowClient

    client = MlflowClient()
    client.create_registered_model("tiny-inference")
    version = client.create_model_version("tiny-inference", source=merged_dir.as_uri())
    client.set_registered_model_alias("tiny-inference", "champion", version.version)

    assert resolve_model("models:/tiny-inference@champion") == merged_dir
    assert resolve_model(f"models:/tiny-inference/{version.version}") == merged_dir
    answers = generate_answers("models:/tiny-inference@champion", PROMPTS[:1],
                               Decoding(max_new_tokens=8))
    assert answers == direct(merged_dir, "alpaca", PROMPTS[:1], max_new_tokens=8)

    with pytest.raises(ModelNotFoundError, match="is not in the registry"):
        resolve_model("models:/tiny-inference@nobody")
    with pytest.raises(ModelNotFoundError, match="expected models:/<name>@<alias>"):
        resolve_model("models:/tiny-inference")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(merged_dir.parent / "nowhere"))


def test_beam_search_is_an_option(merged_dir):
    beam = generate_answers(merged_dir, PROMPTS, Decoding(max_new_tokens=8, strategy="beam",
                                                          num_beams=3))
    assert beam == direct(merged_dir, "alpaca", max_new_tokens=8, strategy="beam", num_beams=3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_quantized_loading_without_a_gpu_says_what_it_needs(merged_dir):
    with pytest.raises(InferenceError, match="nf4 needs a CUDA GPU"):
        load_for_inference(merged_dir, "nf4")


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_quantized_loading_on_a_gpu_generates(merged_dir, quantization):
    model, tokenizer = load_for_inference(merged_dir, quantization)
    assert any("Linear8bitLt" in type(m).__name__ or "Linear4bit" in type(m).__name__
               for m in model.modules())
    answers = generate(model, tokenizer, PromptTemplate(kind="alpaca"), PROMPTS,
                       Decoding(max_new_tokens=8), 2)
    assert len(answers) == 2


def test_a_prompt_file_with_a_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"instruction": "a"}\n\n{"input": "b"}\n')
    with pytest.raises(DataError, match=r"prompts.jsonl:3: instruction: Field required"):
        read_prompts(path)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loraflow.cli", "generate", *args],
        capture_output=True, text=True, timeout=300,
    )


def test_loraflow_generate_answers_a_prompt_and_a_file_of_prompts(merged_dir, tmp_path):
    expected = direct(merged_dir, "alpaca", max_new_tokens=8)
    one = run_cli(str(merged_dir), "--prompt", PROMPTS[0].instruction,
                  "--input", PROMPTS[0].input, "--max-new-tokens", "8")
    assert one.returncode == 0, one.stderr[-2000:]
    assert one.stdout == expected[0] + "\n"

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(p.model_dump_json() + "\n" for p in PROMPTS))
    out = tmp_path / "answers.jsonl"
    many = run_cli(str(merged_dir), "--prompts", str(prompts), "--output", str(out),
                   "--max-new-tokens", "8")
    assert many.returncode == 0, many.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["answer"] for r in rows] == expected
    assert rows[1]["input"] == PROMPTS[1].input
