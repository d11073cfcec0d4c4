"""The training engine: LoRA on a causal LM, as a plain process.

    python -m loraflow.train --config RUN_DIR/engine.json

Reads tokenized examples and a typed config, trains, and writes to the run directory:
metrics.jsonl (one JSON object per optimizer step, plus validation losses), adapter/ (PEFT,
safetensors) and result.json. It imports neither Prefect nor MLflow, so it runs unchanged on a
GPU worker that has neither; the caller relays the metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from pydantic import BaseModel
from tqdm import tqdm

from loraflow.config import LoraSettings, TrainConfig
from loraflow.model import load_model, load_tokenizer


class EngineConfig(BaseModel):
    """Everything one training run needs; written as JSON by the caller."""

    base_path: Path
    data_dir: Path
    output_dir: Path
    lora: LoraSettings = LoraSettings()
    train: TrainConfig = TrainConfig()


Example = tuple[list[int], int]  # (input_ids, prompt_len)


def read_examples(path: Path) -> list[Example]:
    """The examples of one split: <split>.parquet as loraflow.tokenization writes it (packed
    or not; needs pyarrow), else an older <split>.jsonl of {"input_ids", "prompt_len"}; `path`
    may name either. A split with neither file has no examples."""
    parquet = Path(path).with_suffix(".parquet")
    if parquet.is_file():
        from loraflow.packing import read_tokenized

        return read_tokenized(parquet)
    if not Path(path).is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [(r["input_ids"], r["prompt_len"]) for r in map(json.loads, f)]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example; labels are -100 on prompt and padding."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def micro_batches(examples: list[Example], size: int, seed: int) -> Iterator[list[Example]]:
    """Endless stream of micro-batches, reshuffled each epoch (deterministic for a seed)."""
    epoch = 0
    while True:
        order = list(range(len(examples)))
        random.Random(seed + epoch).shuffle(order)
        for start in range(0, len(order), size):
            yield [examples[i] for i in order[start : start + size]]
        epoch += 1


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak LR at `step` (0-based): linear warmup, then the chosen decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.lr_schedule == "linear":
        return 1.0 - progress
    return 1.0


def pick_precision(cfg: TrainConfig, device: str) -> torch.dtype:
    if cfg.precision == "fp32" or (cfg.precision == "auto" and device == "cpu"):
        return torch.float32
    if device == "cpu":
        raise ValueError(f"train.precision={cfg.precision} needs a GPU; on CPU use fp32 or auto")
    if cfg.precision == "fp16" or not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def add_lora(model: torch.nn.Module, lora: LoraSettings) -> PeftModel:
    targets: list[str] | str = (
        "all-linear" if lora.target_modules == ["all-linear"] else list(lora.target_modules)
    )
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


@torch.no_grad()
def validation_loss(
    model: PeftModel,
    examples: list[Example],
    batch_size: int,
    pad_id: int,
    device: str,
    dtype: torch.dtype,
) -> float:
    """Mean loss per answer token over the validation examples."""
    model.eval()
    total, count = torch.zeros((), device=device), 0
    for start in range(0, len(examples), batch_size):
        batch = {
            k: v.to(device)
            for k, v in collate(examples[start : start + batch_size], pad_id).items()
        }
        n = int((batch["labels"][:, 1:] != -100).sum())
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            total += model(**batch, num_items_in_batch=n).loss.float() * n
        count += n
    model.train()
    return float(total) / max(count, 1)


def train(cfg: EngineConfig) -> dict[str, float]:
    """Run LoRA training; return the final numbers (also written to result.json)."""
    t = cfg.train
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if t.threads:
        torch.set_num_threads(t.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = pick_precision(t, device)
    torch.manual_seed(t.seed)

    tokenizer = load_tokenizer(cfg.base_path)
    train_set = read_examples(Path(cfg.data_dir) / "train.jsonl")
    val_set = read_examples(Path(cfg.data_dir) / "validation.jsonl")
    if not train_set:
        raise ValueError(f"{cfg.data_dir} holds no training examples (train.parquet)")

    # Base weights stay in the load dtype (bf16 on GPU halves their memory); LoRA weights
    # are kept in fp32 by PEFT and autocast handles the mixed matmuls.
    model = add_lora(load_model(cfg.base_path, dtype=dtype, device=device), cfg.lora)
    result = fit(model, train_set, val_set, t, out, tokenizer.pad_token_id, dtype)

    # Write the adapter beside its final name, then rename: no half-written adapter/.
    staging = out / "adapter.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    shutil.rmtree(out / "adapter", ignore_errors=True)
    staging.rename(out / "adapter")
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def fit(
    model: PeftModel,
    train_set: list[Example],
    val_set: list[Example],
    t: TrainConfig,
    out: Path,
    pad_id: int,
    dtype: torch.dtype,
) -> dict[str, float]:
    """The training loop: AdamW on the trainable (LoRA) weights only; metrics to out/."""
    device = next(model.parameters()).device.type
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=t.learning_rate, weight_decay=t.weight_decay, fused=device == "cuda"
    )
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    batches = micro_batches(train_set, t.micro_batch_size, t.seed)

    start = time.perf_counter()
    tokens_seen = 0
    loss = float("nan")
    metrics_file = open(out / "metrics.jsonl", "w", encoding="utf-8")  # noqa: SIM115
    bar = tqdm(range(t.max_steps), desc="train", unit="step", file=sys.stderr)
    try:
        for step in bar:
            step_start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = t.learning_rate * lr_factor(step, t)
            group_batches = [collate(next(batches), pad_id) for _ in range(t.grad_accum_steps)]
            # Sum of token losses / answer tokens in the whole step: every token weighs the
            # same, however the examples fall into micro-batches.
            n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in group_batches)
            step_loss = torch.zeros((), device=device)
            step_tokens = 0
            for batch in group_batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                with torch.autocast(
                    device_type=device, dtype=dtype, enabled=dtype != torch.float32
                ):
                    micro_loss = model(**batch, num_items_in_batch=n_items).loss
                scaler.scale(micro_loss).backward()
                step_loss += micro_loss.detach().float()
                step_tokens += int(batch["attention_mask"].sum())
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

            tokens_seen += step_tokens
            loss = float(step_loss)
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss} at step {step + 1}: stopping. Lower train.learning_rate "
                    "or check the data; nothing after this step was kept."
                )
            record = {
                "step": step + 1,
                "loss": loss,
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": float(grad_norm),
                "tokens_per_s": step_tokens / (time.perf_counter() - step_start),
                "elapsed_s": time.perf_counter() - start,
            }
            if device == "cuda":
                record["memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            last_step = step + 1 == t.max_steps
            if val_set and ((t.eval_every and (step + 1) % t.eval_every == 0) or last_step):
                record["val_loss"] = validation_loss(
                    model, val_set, t.micro_batch_size, pad_id, device, dtype
                )
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            bar.set_postfix(loss=f"{loss:.4f}")
    finally:
        metrics_file.close()
        bar.close()

    return {
        "steps": t.max_steps,
        "train_loss": loss,
        "val_loss": record.get("val_loss", float("nan")),
        "seconds": time.perf_counter() - start,
        "tokens": tokens_seen,
        "trainable_params": sum(p.numel() for p in params),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train a LoRA adapter (loraflow engine).")
    parser.add_argument("--config", type=Path, required=True, help="engine config JSON")
    args = parser.parse_args(argv)
    cfg = EngineConfig.model_validate_json(args.config.read_text(encoding="utf-8"))
    result = train(cfg)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
