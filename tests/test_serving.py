"""The merged model directory is what vLLM and TGI load as is (docs/serving.md): a
transformers config, safetensors weights, the tokenizer with its chat template and a
generation config."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_adapter

from loraflow.release.merge import merge_adapter


@pytest.fixture(scope="module")
def merged(tiny_model_dir, tmp_path_factory):
    adapter = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"))
    out = tmp_path_factory.mktemp("m") / "model"
    merge_adapter(tiny_model_dir, adapter, out, "bf16")
    return out


def test_the_merged_directory_has_the_layout_serving_engines_load(merged):
    files = {p.name for p in merged.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= files
    assert any(name.endswith(".safetensors") for name in files)
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)  # no pickles

    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert "quantization_config" not in config  # plain weights, no loader plugin needed
    assert config["dtype"] == "bfloat16"

    weights = load_file(merged / "model.safetensors")
    assert not any("lora" in name for name in weights)  # the adapter is folded in
    assert all(t.dtype == torch.bfloat16 for t in weights.values())

    generation = json.loads((merged / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"]

    tokenizer_config = json.loads((merged / "tokenizer_config.json").read_text())
    chat_template = (merged / "chat_template.jinja")
    assert chat_template.is_file() or tokenizer_config.get("chat_template")


def test_the_served_model_loads_weights_as_the_pipeline_does():
    """serving.py cannot import loraflow.base_model (the packaged model ships without it), so
    it writes the loading options out: safetensors only, no Hub kernels."""
    from loraflow.base_model import LOAD_OPTIONS
    from loraflow.release.serving import SERVED_LOAD_OPTIONS

    assert SERVED_LOAD_OPTIONS == LOAD_OPTIONS
