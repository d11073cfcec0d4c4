"""Merging a LoRA adapter into its base and saving a standalone model directory
(safetensors, tokenizer, generation config) that transformers and vLLM load as is."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import torch
from peft import PeftModel

from loraflow.model import load_model, load_tokenizer

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def merge_adapter(
    base_path: Path,
    adapter_path: Path,
    out_dir: Path,
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
) -> Path:
    """Fold the adapter into the base weights in fp32, then save in `dtype`."""
    model = PeftModel.from_pretrained(load_model(base_path, torch.float32), adapter_path)
    merged = model.merge_and_unload().to(DTYPES[dtype])
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging, safe_serialization=True)
    load_tokenizer(base_path).save_pretrained(staging)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return out_dir
