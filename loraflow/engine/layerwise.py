"""A QLoRA base too large to exist whole in bf16 (a 70B: 138 GB), built one decoder layer at a
time where it trains: the causal LM and its LoRA are made on the meta device (shapes, no
memory); then each layer gets memory and random weights and its frozen linears are quantized
to NF4 at once, so no more is ever held than the layers quantized so far plus one layer in the
compute dtype (a 70B layer: 1.7 GB in bf16, 0.44 GB in NF4).

For benchmarks of an architecture without its checkpoint (speed and memory do not depend on
the weights' values) and for the tests. A real checkpoint loads through from_pretrained
(model.load_base), which quantizes tensor by tensor as it reads them.

The NF4 is bitsandbytes' on a GPU (double-quantized, as load_base loads it). Where CUDA is
missing (the CPU tests) Nf4Linear stands in: the same format (blocks of 64 weights scaled by
their absolute maximum onto the 16 NormalFloat levels, two codes a byte) in plain PyTorch,
with the block scales kept in fp32 (not double-quantized) and the weight dequantized at every
call (slow: fine for a test model, not for training).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from loraflow.config import LoraSettings, TrainConfig
from loraflow.engine.distributed import fill_parameter
from loraflow.engine.model import add_lora, meta_base, prepare_for_training

# The NormalFloat4 levels (QLoRA, arXiv 2305.14314): quantiles of N(0, 1) scaled to [-1, 1],
# with an exact zero; the values bitsandbytes uses.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
              -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
              0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
              0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
BLOCK = 64  # weights sharing one scale (bitsandbytes' default blocksize)

Quantize = Callable[[nn.Linear], nn.Module]


class Nf4Linear(nn.Module):
    """A frozen, bias-free linear layer stored as NF4 codes; the CPU stand-in for
    bitsandbytes' Linear4bit. Gradients flow to the input only."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Nf4Linear quantizes bias-free linears (a Llama's)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        levels = torch.tensor(NF4_LEVELS, device=linear.weight.device)
        with torch.no_grad():
            flat = linear.weight.detach().float().flatten()
            blocks = F.pad(flat, (0, -flat.numel() % BLOCK)).view(-1, BLOCK)
            absmax = blocks.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo().tiny)
            # the nearest level: its index is the bucket between the midpoints of the levels
            codes = torch.bucketize(blocks / absmax, (levels[1:] + levels[:-1]) / 2)
            codes = codes.to(torch.uint8).view(-1, 2)
        self.register_buffer("codes", codes[:, 0] << 4 | codes[:, 1])  # two codes a byte
        self.register_buffer("absmax", absmax)
        self.register_buffer("levels", levels)

    def dequantized_weight(self) -> torch.Tensor:
        """The (out, in) weight the codes stand for, in the original dtype."""
        codes = torch.stack([self.codes >> 4, self.codes & 15], dim=1).flatten().long()
        blocks = self.levels[codes].view(-1, BLOCK) * self.absmax
        n = self.in_features * self.out_features
        return blocks.flatten()[:n].view(self.out_features, self.in_features).to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"


def bitsandbytes_nf4(linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    """bitsandbytes' Linear4bit holding `linear`'s weight in NF4 with double quantization,
    quantized where the weight lies (bitsandbytes quantizes a Params4bit when it is moved to
    its device); the bf16 weight is freed once `linear` is dropped."""
    import bitsandbytes as bnb

    with torch.device("meta"):  # no memory for the placeholder weight
        quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                      compute_dtype=compute_dtype, compress_statistics=True,
                                      quant_type="nf4")
    quantized.weight = bnb.nn.Params4bit(
        linear.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4",
        module=quantized).to(linear.weight.device)
    return quantized


def quantizer(device: str, compute_dtype: torch.dtype) -> Quantize:
    """bitsandbytes' NF4 on a GPU; the plain-PyTorch stand-in on CPU."""
    if device == "cuda":
        return lambda linear: bitsandbytes_nf4(linear, compute_dtype)
    return Nf4Linear


@dataclass
class Built:
    """What building took: the time, and the bytes held by the model's tensors (parameters and
    buffers, as allocated) at the worst moment and at the end."""

    seconds: float
    peak_bytes: int  # right after a layer is made, before it is quantized
    held_bytes: int  # when done
    layer_bytes: int  # one decoder layer's weights in the compute dtype


def build_random_nf4(
    config: Any, train: TrainConfig, lora: LoraSettings, device: str, dtype: torch.dtype,
    attn_impl: str, seed: int = 0,
) -> tuple[PeftModel, Built]:
    """The causal LM of `config` (a transformers config) with LoRA, its decoder linears in NF4
    and the rest (embeddings, norms, head, LoRA) in `dtype` (LoRA in fp32, as PEFT makes it),
    prepared as `train` asks (checkpointing), built layer by layer on `device` with random
    weights: normal(0, 0.02) matrices, norms at one, LoRA as PEFT starts it."""
    start = time.perf_counter()
    model = add_lora(prepare_for_training(meta_base(config, dtype, attn_impl), train), lora)
    causal_lm = model.get_base_model()
    decoder = causal_lm.model
    quantize = quantizer(device, dtype)
    generator = torch.Generator(device).manual_seed(seed)
    materialize(decoder.embed_tokens, device, generator)
    peak = layer_bytes = 0
    for layer in decoder.layers:
        materialize(layer, device, generator)
        layer_bytes = max(layer_bytes, tensor_bytes(layer))
        peak = max(peak, tensor_bytes(model))
        quantize_frozen_linears(layer, quantize)
    materialize(decoder.norm, device, generator)
    if causal_lm.config.tie_word_embeddings:  # to_empty made the embeddings a new tensor
        causal_lm.lm_head.weight = decoder.embed_tokens.weight
    else:
        materialize(causal_lm.lm_head, device, generator)
    with torch.device(device):  # its buffers are computed from the config, not drawn
        decoder.rotary_emb = type(decoder.rotary_emb)(causal_lm.config)
    held = tensor_bytes(model)
    if device == "cuda":
        torch.cuda.synchronize()
    return model, Built(time.perf_counter() - start, max(peak, held), held, layer_bytes)


@torch.no_grad()
def materialize(module: nn.Module, device: str, generator: torch.Generator) -> None:
    """Memory on `device` for a meta module's tensors, filled as distributed.fill_random fills
    a sharded model's."""
    module.to_empty(device=device)
    for name, param in module.named_parameters():
        fill_parameter(name, param, generator)


def quantize_frozen_linears(module: nn.Module, quantize: Quantize) -> int:
    """Replace, in place, each frozen nn.Linear inside `module` (the LoRA `base_layer`s and the
    untargeted linears; not lora_A/lora_B, which train) with `quantize(linear)`; how many."""
    chosen = [(name, m) for name, m in module.named_modules()
              if type(m) is nn.Linear and not m.weight.requires_grad]
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name), child, quantize(linear))
    return len(chosen)


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of `module`'s parameters and buffers that have memory (not on the meta device),
    each storage counted once (tied weights)."""
    held = {t.data_ptr(): t.nbytes for t in chain(module.parameters(), module.buffers())
            if t.device.type != "meta"}
    return sum(held.values())
