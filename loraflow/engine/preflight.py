"""Preflight before GPU time is spent (the guide's checklist, automated): a GPU is visible,
CUDA works, the precision is supported, and the run's peak memory fits.

The peak-memory estimate is weights + LoRA state + activations + a fixed overhead, with the
activation coefficients fitted to peaks measured on an H200 and an H100 (docs/benchmarks.md):
- no activation checkpointing: ~42 bytes x hidden per token per layer (bf16, eager);
  torch.compile fuses enough to need ~25;
- with checkpointing: ~5 bytes x hidden per token per layer (the stored layer inputs, 2 of
  them, and one layer's recomputed activations spread over the layers); ~2.3 with each layer
  compiled inside its checkpoint; plus one loss chunk's fp32 logits and their gradient
  (8 bytes x vocab x LOSS_CHUNK tokens), which does not grow with the layers. Without that
  term one coefficient could not fit both the 7B (6.9 / 7.2 GiB at 4k / 8k tokens) and the
  Llama-2-70B (40.9 / 47.0 GiB, nf4 on one H100).
The coefficients are fitted to those peaks (tests hold the estimate within 15% of each); the
guide's 7B/13B table is the independent check: the estimate is 9-20% above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loraflow.config import LoraSettings, TrainConfig
from loraflow.engine.config import LOSS_CHUNK

GIB = 2**30
# fp8 keeps two FP8 copies of each frozen weight (one laid out for each GEMM): 2 bytes.
# nf4: 4-bit codes plus double-quantized block scales (1/64 + 4/16384 bytes): 0.516, as the
# Llama-2-70B's 68.4B quantized weights measured (32.9 GiB).
BYTES_PER_WEIGHT = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 2.0, "int8": 1.0,
                    "nf4": 0.52}
ACTIVATION_BYTES_PER_HIDDEN = {"plain": 42.0, "compiled": 25.0, "checkpointed": 5.0,
                               "checkpointed-compiled": 2.3}
LOSS_CHUNK_BYTES_PER_VOCAB = 8.0  # fp32 logits and their gradient, per loss-chunk token
OVERHEAD_GIB = 0.5  # CUDA context, allocator slack, cuBLAS workspaces
HEADROOM = 0.92  # never plan to fill the card


class PreflightError(RuntimeError):
    """The run cannot start on this machine; the message has the numbers and what to change."""


@dataclass
class Estimate:
    weights_gib: float
    lora_gib: float
    activations_gib: float
    overhead_gib: float

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.lora_gib + self.activations_gib + self.overhead_gib


def parameter_counts(config: dict[str, Any]) -> tuple[int, int]:
    """(linear-layer parameters, embedding + head parameters) of a Llama-family config."""
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    attention = h * heads * head_dim * 2 + h * kv * head_dim * 2  # q, o and k, v
    mlp = 3 * h * config["intermediate_size"]
    embeddings = config["vocab_size"] * h * (1 if config.get("tie_word_embeddings") else 2)
    return layers * (attention + mlp), embeddings


def lora_parameters(config: dict[str, Any], lora: LoraSettings) -> int:
    h, heads = config["hidden_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    inter = config["intermediate_size"]
    shapes = {"q_proj": (h, heads * head_dim), "k_proj": (h, kv * head_dim),
              "v_proj": (h, kv * head_dim), "o_proj": (heads * head_dim, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    targets = shapes if lora.target_modules == ["all-linear"] else {
        name: shapes[name] for name in lora.target_modules if name in shapes}
    return config["num_hidden_layers"] * sum(lora.r * (i + o) for i, o in targets.values())


def estimate(config: dict[str, Any], train: TrainConfig, lora: LoraSettings,
             tokens_per_micro_batch: int, shards: int = 1) -> Estimate:
    """Peak GPU memory of one training run, in GiB (`shards`: GPUs FSDP splits the base
    weights over)."""
    linear, embeddings = parameter_counts(config)
    precision = "bf16" if train.precision == "auto" else train.precision
    quantized = precision in ("int8", "nf4")  # bitsandbytes keeps embeddings and head in bf16
    weights = (linear * BYTES_PER_WEIGHT[precision]
               + embeddings * (2.0 if quantized else BYTES_PER_WEIGHT[precision]))
    if shards > 1:  # FSDP: a share of the layers, plus two layers gathered (one prefetched)
        layers = config["num_hidden_layers"]
        weights += linear * BYTES_PER_WEIGHT[precision] * (1 / shards + 2 / layers - 1)
    # LoRA weights, gradients and two AdamW moments, all fp32.
    lora_bytes = lora_parameters(config, lora) * 16
    if train.gradient_checkpointing:
        mode = "checkpointed-compiled" if train.compile is True else "checkpointed"
    else:
        # compile=auto trains its first steps eagerly: the eager (larger) estimate holds
        mode = "compiled" if train.compile is True else "plain"
    activations = (tokens_per_micro_batch * config["num_hidden_layers"] * config["hidden_size"]
                   * ACTIVATION_BYTES_PER_HIDDEN[mode])
    if train.gradient_checkpointing:  # the fitted coefficients without it include the logits
        activations += (min(tokens_per_micro_batch, LOSS_CHUNK) * config["vocab_size"]
                        * LOSS_CHUNK_BYTES_PER_VOCAB)
    return Estimate(weights / GIB, lora_bytes / GIB, activations / GIB, OVERHEAD_GIB)


def tokens_per_micro_batch(train: TrainConfig, packed: bool, max_example_tokens: int) -> int:
    """Packed rows are seq_len long; padded micro-batches are at most the longest example."""
    width = train.seq_len if packed else max_example_tokens
    return train.micro_batch_size * width


def fit_micro_batch(config: dict[str, Any], train: TrainConfig, lora: LoraSettings, packed: bool,
                    max_example_tokens: int, free_gib: float,
                    shards: int = 1) -> tuple[TrainConfig, Estimate]:
    """The largest micro-batch (halving from the configured one, accumulation doubled so the
    effective batch stays) whose estimate fits the free memory; refuse when none does."""
    budget = free_gib * HEADROOM
    candidate = train
    while True:
        guess = estimate(config, candidate, lora,
                         tokens_per_micro_batch(candidate, packed, max_example_tokens), shards)
        if guess.total_gib <= budget:
            return candidate, guess
        if candidate.micro_batch_size == 1:
            raise PreflightError(
                f"this run needs about {guess.total_gib:.1f} GiB even at micro_batch_size=1 "
                f"(weights {guess.weights_gib:.1f}, activations {guess.activations_gib:.1f}, "
                f"LoRA state {guess.lora_gib:.2f}, overhead {guess.overhead_gib:.1f}); the GPU "
                f"has {free_gib:.1f} GiB free. Fix: train.gradient_checkpointing=true, "
                "train.precision=nf4 (QLoRA), or a shorter train.seq_len / data.max_length."
            )
        candidate = train.with_micro_batch(candidate.micro_batch_size // 2)


def check_device(train: TrainConfig) -> float:
    """GPU visible, CUDA usable, precision supported; returns free GiB."""
    import torch

    if not torch.cuda.is_available():
        raise PreflightError("no usable CUDA GPU (torch.cuda.is_available() is False): check "
                             "nvidia-smi and that torch is a CUDA build")
    free, _ = torch.cuda.mem_get_info()
    if train.precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise PreflightError("train.precision=bf16 but this GPU has no bf16. Fix: "
                             "train.precision=fp16 (or auto)")
    if train.precision == "fp8":
        from loraflow.engine.fp8 import fp8_supported

        supported, why = fp8_supported()
        if not supported:
            raise PreflightError(why.replace("turn FP8 off for this run",
                                             "train.precision=bf16 (or auto)"))
    if train.precision in ("int8", "nf4"):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise PreflightError(f"train.precision={train.precision} needs bitsandbytes. "
                                 "Fix: pip install 'loraflow[gpu]'") from exc
    return free / GIB
