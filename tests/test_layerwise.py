"""A QLoRA base built layer by layer (loraflow.engine.layerwise): the structure on CPU with the
plain-PyTorch NF4 stand-in, and, on a GPU, the stand-in against bitsandbytes and the build
with bitsandbytes itself."""

import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loraflow.config import LoraSettings, TrainConfig
from loraflow.engine.batches import read_examples
from loraflow.engine.layerwise import (
    BLOCK,
    NF4_LEVELS,
    Nf4Linear,
    build_random_nf4,
    tensor_bytes,
)
from loraflow.engine.loop import fit

# The Llama-2-70B shape in miniature: grouped-query attention (2 query heads a KV head; 8 in the
# 70B), an MLP 3.5x the hidden size, an untied head; the tiny tokenizer's 512 tokens.
TINY_70B = dict(vocab_size=512, hidden_size=64, intermediate_size=224, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                tie_word_embeddings=False, pad_token_id=3, bos_token_id=1, eos_token_id=2)


def test_nf4_stand_in_keeps_the_levels_exactly_and_random_weights_closely():
    torch.manual_seed(0)
    exact = torch.nn.Linear(BLOCK, 4, bias=False)
    levels = torch.tensor(NF4_LEVELS)
    with torch.no_grad():  # every block: the 16 levels x 4, scaled by 0.5 (its absmax)
        exact.weight.copy_(levels.repeat(16).view(4, BLOCK) * 0.5)
    assert torch.equal(Nf4Linear(exact).dequantized_weight(), exact.weight)

    linear = torch.nn.Linear(256, 96, bias=False)
    torch.nn.init.normal_(linear.weight, std=0.02)
    quantized = Nf4Linear(linear)
    assert quantized.codes.numel() == 256 * 96 // 2  # two 4-bit codes a byte
    error = quantized.dequantized_weight() - linear.weight.detach()
    assert 0.02 < float(error.norm() / linear.weight.detach().norm()) < 0.15  # NF4 on N(0, s): ~0.1
    x = torch.randn(8, 256, requires_grad=True)
    y = quantized(x)
    y.sum().backward()  # the gradient reaches the input; nothing in the layer trains
    assert x.grad is not None and not list(quantized.parameters())


def test_a_layerwise_nf4_base_is_never_whole_in_full_precision_and_trains(
    tmp_path, tokenized
):
    """The 70B path on a tiny architecture, on CPU: built on the meta device, each decoder
    layer made and quantized before the next is made, LoRA on top; two steps of the engine's
    loop with packed rows under checkpointing move LoRA and leave the NF4 codes as they were."""
    train = TrainConfig(precision="nf4", gradient_checkpointing=True, batching="packed",
                        seq_len=512, micro_batch_size=1, grad_accum_steps=1, max_steps=2,
                        warmup_steps=0, learning_rate=1e-2, compile=False, watchdog_seconds=0)
    model, built = build_random_nf4(LlamaConfig(**TINY_70B), train, LoraSettings(dropout=0.0),
                                    "cpu", torch.float32, "sdpa")

    assert not [n for n, p in model.named_parameters() if p.device.type == "meta"]
    rotary = list(model.get_base_model().model.rotary_emb.buffers())
    fresh = list(LlamaForCausalLM(LlamaConfig(**TINY_70B)).model.rotary_emb.buffers())
    assert rotary and all(torch.equal(a, b) for a, b in zip(rotary, fresh, strict=True))
    layers = model.get_base_model().model.layers
    base_layers = [m for m in layers.modules() if isinstance(m, Nf4Linear)]
    assert len(base_layers) == 7 * TINY_70B["num_hidden_layers"]  # q k v o gate up down
    assert not [m for m in layers.modules()
                if type(m) is torch.nn.Linear and not m.weight.requires_grad]
    # The peak: the layers quantized so far plus one in full precision; never two of them.
    assert built.peak_bytes <= built.held_bytes + built.layer_bytes
    whole = 4 * sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**TINY_70B)).parameters())
    assert built.peak_bytes < 0.5 * whole, (built, whole)  # the base whole in fp32
    assert built.layer_bytes > 3 * tensor_bytes(layers[0])  # NF4 vs the fp32 layer

    codes = [m.codes.clone() for m in base_layers]
    result = fit(model, train_set=read_examples(tokenized, "train"), val_set=[], t=train,
                 out=tmp_path, pad_id=3, dtype=torch.float32, packed=True)
    assert result["steps"] == 2 and math.isfinite(result["train_loss"])
    assert all(torch.equal(a, m.codes) for a, m in zip(codes, base_layers, strict=True))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(float(p.detach().abs().sum()) > 0 for p in lora_b)  # B starts at zero


def test_the_layerwise_adapter_has_the_keys_of_one_trained_on_a_loaded_base(tmp_path):
    """What the pipeline does with the adapter (merge onto the bf16 base, serve) reads it by
    these names; the layer-by-layer build must not change them."""
    from peft import get_peft_model_state_dict

    from loraflow.engine.model import add_lora

    lora, train = LoraSettings(), TrainConfig(gradient_checkpointing=True)
    built, _ = build_random_nf4(LlamaConfig(**TINY_70B), train, lora, "cpu", torch.float32,
                                "sdpa")
    loaded = add_lora(LlamaForCausalLM(LlamaConfig(**TINY_70B)), lora)
    assert get_peft_model_state_dict(built).keys() == get_peft_model_state_dict(loaded).keys()


def test_the_nf4_70b_benchmark_runs_each_sequence_length(tokenized, monkeypatch):
    """benchmarks/train_bench.py's nf4-70b on the tiny architecture on CPU, so its code cannot
    rot between GPU runs: one build, then each length's estimate, steps and losses."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from train_bench import run_nf4_70b

    result = run_nf4_70b(read_examples(tokenized, "train"), 1, [512, 1024], 1.0,
                         arch=TINY_70B, device="cpu")
    assert result["build_peak_gib"] <= result["built_gib"] + result["layer_gib"]
    for seq_len in (512, 1024):
        run = result["by_seq_len"][seq_len]
        assert len(run["losses"]) == 3 and all(map(math.isfinite, run["losses"]))
        assert run["real_tokens_per_s"] > 0 and run["estimate_gib"] > 0


@pytest.mark.gpu
def test_the_nf4_stand_in_quantizes_as_bitsandbytes_does():
    bnb = pytest.importorskip("bitsandbytes")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    weight = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=BLOCK, quant_type="nf4",
                                                 compress_statistics=False)
    theirs = bnb.functional.dequantize_4bit(packed, state, quant_type="nf4")
    linear = torch.nn.Linear(4096, 1024, bias=False, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(weight)
    ours = Nf4Linear(linear).dequantized_weight()
    differ = float((ours != theirs).float().mean())
    assert differ < 1e-4, f"{differ:.2e} of the weights dequantize differently"


@pytest.mark.gpu
# torch 2.11's flex_attention input check reads .grad of a non-leaf while dynamo traces it
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_a_layerwise_base_with_bitsandbytes_trains_on_a_gpu(tmp_path, tokenized):
    bnb = pytest.importorskip("bitsandbytes")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    train = TrainConfig(precision="nf4", gradient_checkpointing=True, batching="packed",
                        seq_len=512, micro_batch_size=1, grad_accum_steps=2, max_steps=2,
                        warmup_steps=0, learning_rate=1e-2, compile=False, watchdog_seconds=0)
    model, built = build_random_nf4(LlamaConfig(**TINY_70B), train, LoraSettings(dropout=0.0),
                                    "cuda", torch.bfloat16, "flex_attention")
    layers = model.get_base_model().model.layers
    assert len([m for m in layers.modules() if isinstance(m, bnb.nn.Linear4bit)]) == 28
    result = fit(model, train_set=read_examples(tokenized, "train"), val_set=[], t=train,
                 out=tmp_path, pad_id=3, dtype=torch.bfloat16, attn_impl="flex_attention",
                 packed=True)
    assert math.isfinite(result["train_loss"])
    assert all(float(p.detach().abs().sum()) > 0 for n, p in model.named_parameters()
               if "lora_B" in n)
