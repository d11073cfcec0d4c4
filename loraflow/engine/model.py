"""The model as training needs it: the base in the run's precision (bf16, fp16, int8, nf4,
fp8 matmuls), sharded under FSDP, with kernels and checkpointing as asked, plus LoRA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
)

from loraflow.base_model import LOAD_OPTIONS, quantization_config
from loraflow.config import LoraSettings, TrainConfig
from loraflow.engine import distributed
from loraflow.engine.distributed import Ranks
from loraflow.engine.preflight import PreflightError


def pick_precision(cfg: TrainConfig, device: str) -> torch.dtype:
    """Compute dtype. int8/nf4 quantise the stored base weights and compute in bf16/fp16."""
    if cfg.precision == "fp32" or (cfg.precision == "auto" and device == "cpu"):
        return torch.float32
    if device == "cpu":
        raise ValueError(f"train.precision={cfg.precision} needs a GPU; on CPU use fp32 or auto")
    if cfg.precision == "fp16" or not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def load_base(path: Path, cfg: TrainConfig, device: str, attn_impl: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    dtype = pick_precision(cfg, device)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_impl,
                              **LOAD_OPTIONS}
    if cfg.precision in ("int8", "nf4"):
        kwargs["quantization_config"] = quantization_config(cfg.precision, dtype)
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if cfg.precision not in ("int8", "nf4"):
        model = model.to(device)
    # No peft.prepare_model_for_kbit_training for int8/nf4: it keeps the embeddings, norms and
    # head in fp32 (1 GiB more for a 7B, and the head's matmul in fp32); they stay in the
    # compute dtype as in the bf16 modes. Non-reentrant checkpointing needs no input grads.
    return prepare_for_training(model, cfg)


def load_base_sharded(
    path: Path, cfg: TrainConfig, lora: LoraSettings, device: str, attn_impl: str, ranks: Ranks
) -> PeftModel:
    """launch.parallelism=fsdp: the base with LoRA, its weights sharded across the ranks, never
    whole on one GPU. Rank 0 reads them into CPU memory, the other ranks build the model on
    the meta device; distributed.shard_model shards it and fills the shards from rank 0."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = fsdp_precision(cfg, device)
    if ranks.main:
        base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                    attn_implementation=attn_impl, **LOAD_OPTIONS)
    else:
        base = meta_base(AutoConfig.from_pretrained(path), dtype, attn_impl)
    model = add_lora(prepare_for_training(base, cfg), lora)
    held = distributed.shard_model(model, ranks)
    ranks.print(f"fsdp: rank 0 holds {held:,} of the model's "
                f"{sum(p.numel() for p in model.parameters()):,} weights")
    return model


def fsdp_precision(cfg: TrainConfig, device: str) -> torch.dtype:
    dtype = pick_precision(cfg, device)
    if dtype == torch.float16:  # precision=auto on a GPU without bf16
        raise PreflightError("launch.parallelism=fsdp needs bf16 (or fp32): this GPU has no "
                             "bf16 and fp16's loss scaling cannot see other ranks' shards. Fix: "
                             "launch.parallelism=ddp")
    return dtype


def meta_base(config: Any, dtype: torch.dtype, attn_impl: str) -> torch.nn.Module:
    """The causal LM of `config` on the meta device: its shapes, no memory, no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                attn_implementation=attn_impl)


def prepare_for_training(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """Kernels and activation checkpointing as the config asks; no KV cache in training."""
    if cfg.kernels == "liger":
        # Fused RMSNorm, SwiGLU and RoPE Triton kernels (GPU); the loss is our own already.
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False, model=model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def merge_into_base(
    model: torch.nn.Module, adapter: Path, t: TrainConfig, parallelism: str
) -> torch.nn.Module:
    """The base with a trained adapter folded into its weights (EngineConfig.merge_adapter)."""
    if t.precision in ("int8", "nf4") or parallelism == "fsdp":
        raise PreflightError(
            f"merge_adapter {adapter} cannot be folded into {t.precision} / {parallelism} "
            "base weights exactly. Fix: give the merged SFT model as the base instead (the "
            "pipeline's align stage does), or train this stage with precision bf16/fp32 and "
            "parallelism ddp.")
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ValueError(f"merge_adapter {adapter} holds no adapter_config.json. Fix: point it "
                         "at the adapter directory an SFT run wrote (RUN_DIR/adapter).")
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def add_lora(model: torch.nn.Module, lora: LoraSettings) -> PeftModel:
    targets: list[str] | str = (
        "all-linear" if lora.target_modules == ["all-linear"] else list(lora.target_modules)
    )
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=targets, bias=lora.bias, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def use_fp8(model: PeftModel) -> None:
    """precision=fp8: the frozen base linears compute in FP8; after PEFT, whose LoRA layers
    wrap them; the head stays in the compute dtype."""
    from loraflow.engine.fp8 import convert_frozen_linears

    convert_frozen_linears(model, skip=lambda name: name.endswith("lm_head"))
