"""The training loop: AdamW on the LoRA weights, accumulation, clipping, the schedule, validation,
metrics and checkpoints; resumes from the latest checkpoint."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from tqdm import tqdm

from loraflow.config import TrainConfig
from loraflow.data.tokenization import Encoded
from loraflow.engine import distributed
from loraflow.engine.batches import (
    ExampleStream,
    answer_tokens,
    collate,
    row_counts,
    rows_per_step,
    step_rows,
)
from loraflow.engine.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from loraflow.engine.distributed import SINGLE, Ranks
from loraflow.engine.guards import FAULTS, Diverged, SpikeGuard, Watchdog, write_failure
from loraflow.engine.loss import completion_loss


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


def to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    if device == "cuda":  # pinned host memory makes the copy truly asynchronous
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def validation_loss(
    model: PeftModel, examples: list[Encoded], cfg: TrainConfig, pad_id: int, attn_impl: str,
    dtype: torch.dtype, decoder: Any = None, ranks: Ranks = SINGLE,
) -> float:
    """Mean loss per answer token over the validation examples (each alone in its row; with
    several ranks each takes every world_size-th example)."""
    model.eval()
    device = next(model.parameters()).device.type
    total, count = torch.zeros((), device=device), 0
    spare = examples[:1]
    # Under FSDP every forward gathers weights from all ranks: each runs as many as rank 0,
    # which has the most examples; a rank short of one runs a spare example it does not count.
    passes = len(examples[:: ranks.world_size])
    examples = examples[ranks.rank :: ranks.world_size]
    for start in range(0, passes, cfg.micro_batch_size):
        rows = [[e] for e in examples[start : start + cfg.micro_batch_size]]
        batch = to_device(collate(rows or [spare], pad_id), device)
        n = answer_tokens(batch) if rows else 0
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            total += completion_loss(model, batch, n, attn_impl, decoder) * n
        count += n
    model.train()
    total_sum, count_sum = distributed.sum_values([float(total), count], ranks)
    return total_sum / max(count_sum, 1)


# ---------------------------------------------------------------------------- setup


def setup_optimizer(
    params: list[torch.nn.Parameter], t: TrainConfig, device: str, dtype: torch.dtype
) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler]:
    """AdamW on the trainable (LoRA) weights; a loss scaler only for fp16."""
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay,
                                  fused=device == "cuda")
    return optimizer, torch.amp.GradScaler(device, enabled=dtype == torch.float16)


def compiled_decoder(model: PeftModel, t: TrainConfig) -> Any:
    """The decoder the loss calls: compiled as train.compile asks, else as it is."""
    decoder = model.get_base_model().model
    if t.compile and t.gradient_checkpointing:
        # Compiling the whole decoder traces through activation checkpointing and keeps what
        # it would recompute (nf4 7B: 16.6 GiB instead of 7.6); compiling each layer inside
        # its checkpointed call keeps the savings.
        for layer in decoder.layers:
            layer.compile(dynamic=False)
    elif t.compile:
        decoder = torch.compile(decoder, dynamic=False)
    return decoder


def resume(
    out: Path, model: PeftModel, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
    t: TrainConfig, ranks: Ranks,
) -> tuple[int, int, dict[str, Any], TrainConfig]:
    """(first step, stream position, spike-guard state, config) from the latest checkpoint in
    out/checkpoints/; a fresh start without one."""
    checkpoint = distributed.share_checkpoint(latest_checkpoint(out / "checkpoints"), ranks)
    if checkpoint is None:
        return 0, 0, {}, t
    meta = load_checkpoint(checkpoint, model, optimizer, scaler)
    ranks.print(f"resuming from {checkpoint} (step {meta['step']})")
    return (meta["step"], meta["position"], meta["guard"],
            keep_rows_per_step(t, meta.get("rows_per_step"), ranks))


def metrics_file(out: Path, first_step: int, ranks: Ranks) -> Path:
    """out/metrics.jsonl without the steps after `first_step` (a resumed run writes them
    again); rank 0 writes metrics, the other ranks nothing."""
    path = out / "metrics.jsonl"
    if not ranks.main:
        return Path(os.devnull)
    lines = path.read_text().splitlines() if path.is_file() else []
    kept = [line for line in lines if json.loads(line)["step"] <= first_step]
    path.write_text("".join(line + "\n" for line in kept))
    return path


# ---------------------------------------------------------------------------- the loop


def fit(
    model: PeftModel,
    *,
    train_set: list[Encoded],
    val_set: list[Encoded],
    t: TrainConfig,
    out: Path,
    pad_id: int,
    dtype: torch.dtype,
    attn_impl: str = "sdpa",
    packed: bool = False,
    ranks: Ranks = SINGLE,
) -> dict[str, float]:
    """The training loop: AdamW on the trainable (LoRA) weights only; metrics, checkpoints and
    failure reports to out/ (rank 0). Resumes from the latest checkpoint in out/checkpoints/.

    With several ranks every rank builds the whole step's rows from the same seeded stream and
    trains on its share (rows rank*m .. rank*m+m-1 of each micro-step of m x world_size rows);
    the gradients are summed once per step, so W ranks with accumulation A train on exactly the
    rows one process with accumulation W x A would."""
    device = next(model.parameters()).device.type
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    distributed.broadcast_parameters(params, ranks)
    optimizer, scaler = setup_optimizer(params, t, device, dtype)
    decoder = compiled_decoder(model, t)
    first_step, position, guard_state, t = resume(out, model, optimizer, scaler, t, ranks)
    if ranks.distributed:  # dropout differs between ranks, reproducibly for a given step
        torch.manual_seed(t.seed + 1_000_003 * (ranks.rank + 1) + first_step)
    if t.epochs:
        t = t.model_copy(update={"max_steps": steps_for_epochs(train_set, t, packed, ranks)})
    metrics_path = metrics_file(out, first_step, ranks)
    width = t.seq_len if packed else None

    stream = ExampleStream(train_set, t.seed, position)
    guard = SpikeGuard(t, **guard_state)
    watchdog = Watchdog(t.watchdog_seconds, out, ranks)
    start, tokens_seen, loss, record = time.perf_counter(), 0, float("nan"), {}
    mine = slice(ranks.rank * t.micro_batch_size, (ranks.rank + 1) * t.micro_batch_size)

    def next_step() -> tuple[list[dict[str, Any]], int, int, int]:
        """This rank's micro-batches, the whole step's answer and real tokens, and the stream
        position after the step."""
        batches, answers, real = [], 0, 0
        for rows in step_rows(stream, t, packed, ranks):
            a, r = row_counts(rows)
            answers, real = answers + a, real + r
            batches.append(collate(rows[mine], pad_id, width))
        return batches, answers, real, stream.position

    pending: tuple[list[dict[str, Any]], int, int, int] | None = None
    bar = tqdm(range(first_step, t.max_steps), initial=first_step, total=t.max_steps,
               desc="train", unit="step", file=sys.stderr, disable=not ranks.main)
    with open(metrics_path, "a", encoding="utf-8") as metrics:
        for step in bar:
            step_start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = t.learning_rate * lr_factor(step, t)
            # Every answer token of the step weighs the same, however the examples fall
            # into micro-batches and ranks.
            batches, n_items, step_tokens, position = pending or next_step()
            distributed.heartbeat(ranks, step, "compute")
            step_loss = torch.zeros((), device=device)
            for batch in batches:
                batch = to_device(batch, device)
                with torch.autocast(device_type=device, dtype=dtype,
                                    enabled=dtype != torch.float32):
                    micro_loss = completion_loss(model, batch, n_items, attn_impl, decoder,
                                                 t.gradient_checkpointing)
                scaler.scale(micro_loss).backward()
                step_loss += micro_loss.detach()
            # Build the next step's batches on the CPU while the GPU finishes this backward;
            # the host sync just below would otherwise leave the GPU idle during collation.
            pending = next_step() if step + 1 < t.max_steps else None
            FAULTS.stall(step + 1, ranks)
            distributed.heartbeat(ranks, step, "sync")
            step_loss = distributed.sync_gradients(params, step_loss, ranks)
            scaler.unscale_(optimizer)
            # FSDP: the norm over every rank's shards (a DTensor)
            grad_norm = distributed.whole(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm))
            loss = float(step_loss)  # one host sync per optimizer step, not per micro-batch
            loss = FAULTS.poison(step + 1, loss)
            try:
                guard.check(loss, step + 1)
            except Diverged as exc:
                last = latest_checkpoint(out / "checkpoints")
                message = (f"{exc}: stopping. Nothing after the last good checkpoint "
                           f"({last or 'none'}) was kept. Lower train.learning_rate or check "
                           "the data around this step.")
                if ranks.main:
                    write_failure(out, "diverged", step + 1, message)
                raise Diverged(message) from None
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            watchdog.progress(step + 1)

            tokens_seen += step_tokens
            record = {
                "step": step + 1,
                "loss": loss,
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": float(grad_norm),
                "tokens": step_tokens,
                "tokens_per_s": step_tokens / (time.perf_counter() - step_start),
                "elapsed_s": time.perf_counter() - start,
            }
            if device == "cuda":
                record["memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            last_step = step + 1 == t.max_steps
            if val_set and ((t.eval_every and (step + 1) % t.eval_every == 0) or last_step):
                record["val_loss"] = validation_loss(model, val_set, t, pad_id, attn_impl,
                                                     dtype, decoder, ranks)
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if t.checkpoint_every and ((step + 1) % t.checkpoint_every == 0 or last_step):
                save_checkpoint(out / "checkpoints", model, optimizer, scaler, step + 1,
                                {"position": position, "rows_per_step": rows_per_step(t, ranks),
                                 "world_size": ranks.world_size,
                                 "guard": {"mean": guard.mean, "streak": guard.streak}},
                                t.keep_checkpoints, ranks)
            bar.set_postfix(loss=f"{loss:.4f}")
    bar.close()
    watchdog.stopped = True  # saving the adapter below is not a step
    return {
        "steps": t.max_steps,
        "resumed_from": first_step,
        "train_loss": loss,
        "val_loss": record.get("val_loss", float("nan")),
        "seconds": time.perf_counter() - start,
        "tokens": tokens_seen,
        "trainable_params": sum(p.numel() for p in params),
        "world_size": ranks.world_size,
    }


def keep_rows_per_step(t: TrainConfig, rows: int | None, ranks: Ranks) -> TrainConfig:
    """Resuming on another number of GPUs: keep the checkpoint's effective batch (rows per
    optimizer step) by changing accumulation, where it divides evenly."""
    now = rows_per_step(t, ranks)
    if rows is None or rows == now:
        return t
    per_pass = t.micro_batch_size * ranks.world_size
    if rows % per_pass:
        ranks.print(f"warning: the checkpoint trained {rows} rows per step; "
                    f"{ranks.world_size} ranks x micro_batch_size {t.micro_batch_size} cannot "
                    f"divide that, so the run goes on with {now} rows per step")
        return t
    ranks.print(f"the checkpoint trained {rows} rows per step; on {ranks.world_size} rank(s) "
                f"grad_accum_steps becomes {rows // per_pass} to keep it")
    return t.model_copy(update={"grad_accum_steps": rows // per_pass})


def steps_for_epochs(
    train_set: list[Encoded], t: TrainConfig, packed: bool, ranks: Ranks = SINGLE
) -> int:
    """Optimizer steps for `t.epochs` passes over the examples, counted by building the very
    rows the run will (packing decides how many examples a row holds)."""
    stream, steps, target = ExampleStream(train_set, t.seed), 0, t.epochs * len(train_set)
    while stream.position < target:
        step_rows(stream, t, packed, ranks)
        steps += 1
    return steps
