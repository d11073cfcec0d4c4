"""What one engine run is given (EngineConfig, written as JSON by the caller) and how it
ends: the exit codes and failure kinds, defined here once for the engine and its launcher.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from loraflow.config import LaunchConfig, LoraSettings, TrainConfig

# How a run can end early: the failure kind each rank writes to failure[.rankN].json, and the
# process's exit code. In the order a launcher reports them when ranks disagree: an OOM (which a
# retry with a smaller micro-batch can fix) before a divergence, a hang or a refusal.
EXIT_CODES = {"oom": 3, "diverged": 4, "hung": 5, "preflight": 6}
EXIT_OOM, EXIT_DIVERGED = EXIT_CODES["oom"], EXIT_CODES["diverged"]
EXIT_HUNG, EXIT_REFUSED = EXIT_CODES["hung"], EXIT_CODES["preflight"]
LOSS_CHUNK = 4096  # answer tokens per logits chunk: caps the logits tensor at 4096 x vocab

class EngineConfig(BaseModel):
    """Everything one training run needs; written as JSON by the caller."""

    base_path: Path
    base_source: str | None = None  # model.base as configured: what the adapter names
    data_dir: Path
    output_dir: Path
    lora: LoraSettings = LoraSettings()
    train: TrainConfig = TrainConfig()
    launch: LaunchConfig = LaunchConfig()
    merge_adapter: Path | None = Field(
        None,
        description="A trained LoRA adapter (an SFT adapter) folded into the base weights "
        "before the new adapter is added, so the new one trains on top of it and the "
        "reference of dpo/kto (this model with the new adapter off) is base + this adapter. "
        "Needs unquantized base weights (not int8/nf4).",
    )


def halve_micro_batch(cfg: TrainConfig, halvings: int) -> TrainConfig:
    """After `halvings` out-of-memory failures: micro-batch / 2**h, accumulation x the same,
    so the effective batch is unchanged."""
    micro = cfg.micro_batch_size >> halvings
    if micro < 1:
        raise ValueError(f"out of memory even at micro_batch_size=1 after {halvings} halvings. "
                         "Fix: train.gradient_checkpointing=true, precision nf4, or a shorter "
                         "train.seq_len / data.max_length.")
    return cfg.with_micro_batch(micro)
