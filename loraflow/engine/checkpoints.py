"""Resumable checkpoints (adapter, optimizer, scaler, RNG, data position) as safetensors +
JSON, written atomically with retention.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import (
    PeftModel,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file, save_file

from loraflow.config import TrainConfig
from loraflow.engine import distributed
from loraflow.engine.distributed import SINGLE, Ranks


def checkpoint_due(t: TrainConfig, step: int, last_step: bool, since_last_s: float,
                   ranks: Ranks = SINGLE) -> bool:
    """Whether to checkpoint after `step`: every checkpoint_every steps (and at the last), or
    once checkpoint_minutes have passed since the last checkpoint. The time rule skips the last
    step, whose adapter is saved anyway; with several ranks it fires when every rank's clock
    says so (a collective: under FSDP all ranks must save together)."""
    if t.checkpoint_every and (step % t.checkpoint_every == 0 or last_step):
        return True
    if not t.checkpoint_minutes or last_step:
        return False
    due = since_last_s >= 60.0 * t.checkpoint_minutes
    return bool(distributed.min_value(int(due), ranks))


def save_checkpoint(
    root: Path, model: PeftModel, optimizer: torch.optim.Optimizer, scaler: Any, step: int,
    state: dict[str, Any], keep: int, ranks: Ranks = SINGLE,
) -> Path | None:
    """Adapter + optimizer + RNG as safetensors, the rest as JSON; written whole or not at all.
    Every rank calls it (under FSDP each gives its shards); rank 0 alone writes, the same
    files whatever the parallelism, so a checkpoint resumes under ddp or fsdp on any count."""
    adapter = lora_state(model)
    optim = optimizer.state_dict()
    whole = {i: distributed.full_tensors(s) for i, s in optim["state"].items()}
    if not ranks.main:
        return None
    final = root / f"step-{step:07d}"
    staging = root / f".step-{step:07d}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging / "adapter", safe_serialization=True, state_dict=adapter)
    tensors = {f"optim.{i}.{k}": v.detach().reshape(-1).contiguous().cpu()
               for i, s in whole.items() for k, v in s.items()}
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, staging / "state.safetensors")
    meta = {"step": step, "param_groups": optim["param_groups"], "scaler": scaler.state_dict(),
            **state}
    (staging / "state.json").write_text(json.dumps(meta))
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(
    path: Path, model: PeftModel, optimizer: torch.optim.Optimizer, scaler: Any
) -> dict[str, Any]:
    weights = load_file(path / "adapter" / "adapter_model.safetensors")
    like = get_peft_model_state_dict(model)  # the model's own tensors (FSDP: shards) by file key
    set_peft_model_state_dict(
        model, {k: distributed.shard_like(v, like[k]) for k, v in weights.items()})
    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(path / "state.safetensors")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            param = optimizer_param(optimizer, int(index))
            state.setdefault(int(index), {})[name] = (
                value.reshape(()) if name == "step"
                else distributed.shard_like(value.reshape(param.shape), param))
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta


def optimizer_param(optimizer: torch.optim.Optimizer, index: int) -> torch.nn.Parameter:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return params[index]


def lora_state(model: PeftModel) -> dict[str, torch.Tensor] | None:
    """Under FSDP the trainable (LoRA) weights gathered whole for save_pretrained, which could
    not read the shards (a collective: every rank calls it); None for a whole model, which
    save_pretrained reads itself."""
    if not distributed.sharded(model.parameters()):
        return None
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return distributed.full_tensors(
        {k: v for k, v in model.state_dict().items() if k in trainable})
