"""The training loop: AdamW on the LoRA weights, accumulation, clipping, the schedule, validation,
metrics and checkpoints; resumes from the latest checkpoint. Read as a recipe: fit() is
setup() then, each step, train_step(), validate() when due and checkpoint_if_due()."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from peft import PeftModel
from tqdm import tqdm

from loraflow.config import TrainConfig
from loraflow.data.tokenization import Encoded
from loraflow.engine import distributed
from loraflow.engine.batches import (
    ExampleStream,
    Item,
    Unit,
    answer_tokens,
    collate,
    row_counts,
    rows_per_step,
    step_rows,
)
from loraflow.engine.checkpoints import (
    checkpoint_due,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from loraflow.engine.distributed import SINGLE, Ranks
from loraflow.engine.guards import FAULTS, Diverged, SpikeGuard, Watchdog, write_failure
from loraflow.engine.loss import (
    PREFERENCE_METRICS,
    completion_loss,
    preference_counts,
    preference_loss,
    preference_record,
)

# torch.compile's backend; the engine's tests count compilations with a backend of their own.
COMPILE_BACKEND: Any = "inductor"
# train.compile=auto. Measured on one H200: SmolLM2-135M's first compiled step took 86 s against
# 16 s eager (~70 s of compiling; the Llama-2-7B decoder has about as many layers, 32 vs 30, and
# compiles about as long); compiled steps ran 20-28% faster in bf16 (7B packed: 13.9k -> 19.3k
# tokens/s; SmolLM2 ~0.53 -> ~0.42 s a step), 35% with nf4 and 56% with fp8 (11.4k -> 26.1k).
# So: the first AUTO_DECIDE_STEPS steps run eagerly and are timed; the run compiles when the
# remaining steps at that pace x the gain exceed the cost, i.e. >= 6 minutes of eager training
# left (3 with fp8). SmolLM2's 60 steps (~31 s left after 3) stay eager; a 7B epoch over 20k
# examples (~6 minutes) is on the line.
COMPILE_COST_S = 90.0
COMPILE_GAIN = {"fp8": 0.5}  # share of an eager step's time compiling saves; other modes: 0.25
AUTO_DECIDE_STEPS = 3


# ---------------------------------------------------------------------------- the recipe


def fit(
    model: PeftModel,
    *,
    train_set: list[Item],
    val_set: list[Item],
    t: TrainConfig,
    out: Path,
    pad_id: int,
    dtype: torch.dtype,
    attn_impl: str = "sdpa",
    packed: bool = False,
    ranks: Ranks = SINGLE,
) -> dict[str, Any]:
    """The training loop: AdamW on the trainable (LoRA) weights only; metrics, checkpoints and
    failure reports to out/ (rank 0). Resumes from the latest checkpoint in out/checkpoints/.

    With several ranks every rank builds the whole step's rows from the same seeded stream and
    trains on its share (rows rank*m .. rank*m+m-1 of each micro-step of m x world_size rows);
    the gradients are summed once per step, so W ranks with accumulation A train on exactly the
    rows one process with accumulation W x A would."""
    run = setup(model, train_set, t, out, ranks, pad_id=pad_id, dtype=dtype,
                attn_impl=attn_impl, packed=packed)
    record: dict[str, Any] = {}
    upcoming: StepBatches | None = None
    bar = tqdm(range(run.first_step, run.t.max_steps), initial=run.first_step,
               total=run.t.max_steps, desc="train", unit="step", file=sys.stderr,
               disable=not ranks.main)
    with open(metrics_file(out, run.first_step, ranks), "a", encoding="utf-8") as metrics:
        for step in bar:
            batches = upcoming or build_step(run)
            record, upcoming = train_step(run, step, batches)
            last_step = step + 1 == run.t.max_steps
            if val_set and validation_due(run.t, step + 1, last_step):
                record |= validate(run, val_set)
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            checkpoint_if_due(run, step + 1, last_step, batches.position)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
    bar.close()
    run.watchdog.stopped = True  # saving the adapter after fit() is not a step
    return summary(run, record)


@dataclass
class Run:
    """What fit() sets up once and its steps share."""

    model: PeftModel
    t: TrainConfig  # as trained: after resume (rows per step) and epochs -> max_steps
    out: Path
    ranks: Ranks
    device: str
    dtype: torch.dtype
    pad_id: int
    attn_impl: str
    packed: bool
    params: list[torch.nn.Parameter]  # the trainable (LoRA) weights
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    compiling: Compiling
    stream: ExampleStream
    guard: SpikeGuard
    watchdog: Watchdog
    first_step: int  # 0, or the step of the checkpoint it resumed from
    tokens_seen: int = 0
    started: float = field(default_factory=time.perf_counter)
    saved_at: float = field(default_factory=time.monotonic)  # the last checkpoint, or the start

    @property
    def preferring(self) -> bool:
        return self.t.objective != "sft"


class StepBatches(NamedTuple):
    """One optimizer step's input on this rank, built before the step runs."""

    batches: list[dict[str, Any]]  # this rank's micro-batches, collated
    normaliser: Any  # the whole step's answer tokens; preference: (units, chosen answer tokens)
    tokens: int  # the whole step's real tokens, on every rank
    position: int  # the stream's position after the step: what a checkpoint resumes from


# ---------------------------------------------------------------------------- setup


def setup(
    model: PeftModel, train_set: list[Item], t: TrainConfig, out: Path, ranks: Ranks, *,
    pad_id: int, dtype: torch.dtype, attn_impl: str, packed: bool,
) -> Run:
    """The optimizer, the compile state and the example stream, restored from the latest
    checkpoint when there is one. Its config (Run.t) is the one the run trains with: resuming
    on another GPU count keeps the checkpoint's rows per step; train.epochs sets max_steps."""
    device = next(model.parameters()).device.type
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    distributed.broadcast_parameters(params, ranks)
    optimizer, scaler = setup_optimizer(params, t, device, dtype)
    compiling = start_compiling(model, t, packed, device)
    first_step, position, guard_state, t = resume(out, model, optimizer, scaler, t, ranks)
    if ranks.distributed:  # dropout differs between ranks, reproducibly for a given step
        torch.manual_seed(t.seed + 1_000_003 * (ranks.rank + 1) + first_step)
    if t.epochs:
        t = t.model_copy(update={"max_steps": steps_for_epochs(train_set, t, packed, ranks)})
    return Run(model=model, t=t, out=out, ranks=ranks, device=device, dtype=dtype,
               pad_id=pad_id, attn_impl=attn_impl, packed=packed, params=params,
               optimizer=optimizer, scaler=scaler, compiling=compiling,
               stream=ExampleStream(train_set, t.seed, position),
               guard=SpikeGuard(t, **guard_state),
               watchdog=Watchdog(t.watchdog_seconds, out, ranks), first_step=first_step)


def setup_optimizer(
    params: list[torch.nn.Parameter], t: TrainConfig, device: str, dtype: torch.dtype
) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler]:
    """AdamW on the trainable (LoRA) weights; a loss scaler only for fp16."""
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay,
                                  fused=device == "cuda")
    return optimizer, torch.amp.GradScaler(device, enabled=dtype == torch.float16)


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


# ---------------------------------------------------------------------------- a step


def build_step(run: Run) -> StepBatches:
    """The next optimizer step's micro-batches for this rank, with the whole step's normaliser:
    every answer token of the step weighs the same, however the examples fall into
    micro-batches and ranks."""
    t = run.t
    mine = slice(run.ranks.rank * t.micro_batch_size, (run.ranks.rank + 1) * t.micro_batch_size)
    width = t.seq_len if run.packed else None
    batches, answers, real, units, chosen = [], 0, 0, 0, 0
    for rows in step_rows(run.stream, t, run.packed, run.ranks):
        a, r = row_counts(rows)
        answers, real = answers + a, real + r
        if run.preferring:
            u, c = preference_counts(rows)
            units, chosen = units + u, chosen + c
        batches.append(collate(rows[mine], run.pad_id, width))
    normaliser = (units, chosen) if run.preferring else answers
    return StepBatches(batches, normaliser, real, run.stream.position)


def train_step(
    run: Run, step: int, batches: StepBatches
) -> tuple[dict[str, Any], StepBatches | None]:
    """Optimizer step `step` (0-based): forward and backward over this rank's micro-batches,
    the gradients summed, clipped and applied. Returns the step's metrics and the next step's
    batches, built on the CPU while the GPU finishes this backward (the host sync just after
    would otherwise leave the GPU idle during collation)."""
    started = time.perf_counter()
    for group in run.optimizer.param_groups:
        group["lr"] = run.t.learning_rate * lr_factor(step, run.t)
    distributed.heartbeat(run.ranks, step, "compute")
    step_loss, sums = forward_backward(run, batches)
    upcoming = build_step(run) if step + 1 < run.t.max_steps else None
    FAULTS.stall(step + 1, run.ranks)
    distributed.heartbeat(run.ranks, step, "sync")
    loss, grad_norm = apply_gradients(run, step + 1, step_loss)
    run.tokens_seen += batches.tokens
    seconds = time.perf_counter() - started
    record = {
        "step": step + 1,
        "loss": loss,
        "lr": run.optimizer.param_groups[0]["lr"],
        "grad_norm": grad_norm,
        "tokens": batches.tokens,
        "tokens_per_s": batches.tokens / seconds,
        "elapsed_s": time.perf_counter() - run.started,
    }
    record |= compile_after_step(run, seconds, steps_left=run.t.max_steps - step - 1)
    if run.preferring:
        record |= preference_record(distributed.sum_values(sums.tolist(), run.ranks),
                                    run.t.objective)
    if run.device == "cuda":
        record["memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return record, upcoming


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


def forward_backward(run: Run, batches: StepBatches) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over the step's micro-batches, gradients accumulated: the step's
    loss on this rank and its preference sums (PREFERENCE_METRICS; zeros for sft)."""
    step_loss = torch.zeros((), device=run.device)
    sums = torch.zeros(len(PREFERENCE_METRICS), device=run.device)
    decoder, recompute = run.compiling.decoder, run.t.gradient_checkpointing
    for batch in batches.batches:
        batch = to_device(batch, run.device)
        with torch.autocast(device_type=run.device, dtype=run.dtype,
                            enabled=run.dtype != torch.float32):
            if run.preferring:
                micro_loss, micro_sums = preference_loss(
                    run.model, batch, batches.normaliser, run.t, run.attn_impl, decoder,
                    recompute)
                sums += micro_sums
            else:
                micro_loss = completion_loss(run.model, batch, batches.normaliser,
                                             run.attn_impl, decoder, recompute)
        run.scaler.scale(micro_loss).backward()
        step_loss += micro_loss.detach()
    return step_loss, sums


def apply_gradients(run: Run, step: int, step_loss: torch.Tensor) -> tuple[float, float]:
    """Sum the gradients over the ranks, clip them, let the spike guard judge the loss, then
    update the weights: (loss, grad norm) of step `step` (1-based)."""
    step_loss = distributed.sync_gradients(run.params, step_loss, run.ranks)
    run.scaler.unscale_(run.optimizer)
    # FSDP: the norm over every rank's shards (a DTensor)
    grad_norm = float(distributed.whole(
        torch.nn.utils.clip_grad_norm_(run.params, run.t.max_grad_norm)))
    loss = float(step_loss)  # one host sync per optimizer step, not per micro-batch
    loss = FAULTS.poison(step, loss)
    try:
        run.guard.check(loss, step, None if run.scaler.is_enabled() else grad_norm)
    except Diverged as exc:
        raise stopped(run, exc, step) from None
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.watchdog.progress(step)
    return loss, grad_norm


def stopped(run: Run, exc: Diverged, step: int) -> Diverged:
    """The error that ends a diverged run, naming the last good checkpoint; rank 0 leaves it
    in failure.json for the launcher."""
    last = latest_checkpoint(run.out / "checkpoints")
    message = (f"{exc}: stopping. Nothing after the last good checkpoint ({last or 'none'}) "
               "was kept. Lower train.learning_rate or check the data around this step.")
    if run.ranks.main:
        write_failure(run.out, "diverged", step, message)
    return Diverged(message)


# ---------------------------------------------------------------------------- compiling


@dataclass
class Compiling:
    """train.compile over the steps: the decoder they run, whether it is compiled, and the
    checks still to come."""

    decoder: Any
    compiled: bool
    graphs_before: int | None  # set until the first compiled step: then none made = fallback
    deciding: bool  # compile=auto: AUTO_DECIDE_STEPS eager steps are timed, then it decides
    step_seconds: list[float] = field(default_factory=list)


def start_compiling(model: PeftModel, t: TrainConfig, packed: bool, device: str) -> Compiling:
    """compile=true compiles now; compile=auto times its first steps eagerly on a GPU."""
    compiled = t.compile is True
    decoder = compiled_decoder(model, t, packed) if compiled else model.get_base_model().model
    return Compiling(decoder, compiled, graphs_compiled() if compiled else None,
                     deciding=t.compile == "auto" and device == "cuda")  # never on CPU


def compile_after_step(run: Run, seconds: float, steps_left: int) -> dict[str, Any]:
    """After each step, the record's compile fields: the graphs the first compiled step made
    (none: an eager fallback, said), and compile=auto's decision once its steps are timed."""
    state = run.compiling
    fields: dict[str, Any] = {}
    state.step_seconds.append(seconds)
    if state.graphs_before is not None:  # the first compiled step is done
        fields["compile_graphs"] = compile_took(state.graphs_before, run.ranks)
        state.compiled, state.graphs_before = fields["compile_graphs"] > 0, None
    if state.deciding and len(state.step_seconds) == AUTO_DECIDE_STEPS:
        state.deciding = False
        pace = sum(state.step_seconds[1:]) / (AUTO_DECIDE_STEPS - 1)  # the first warms up
        precision = run.t.precision
        state.compiled = compile_pays(pace, steps_left, precision)
        if state.compiled:
            state.decoder = compiled_decoder(run.model, run.t, run.packed)
            state.graphs_before = graphs_compiled()
        fields["compiled"] = state.compiled
        run.ranks.print(f"compile=auto: {steps_left} steps left at {pace:.2f} s "
                        f"(~{pace * steps_left:.0f} s eager): "
                        f"{'compiling' if state.compiled else 'not compiling'} (pays off above "
                        f"~{COMPILE_COST_S / COMPILE_GAIN.get(precision, 0.25):.0f} s)")
    return fields


def compiled_decoder(model: PeftModel, t: TrainConfig, packed: bool) -> Any:
    """The decoder to train with, compiled. Packed rows all have one shape (static kernels);
    padded micro-batches vary in width, so theirs is compiled once for any width instead of
    once per width."""
    decoder = model.get_base_model().model
    dynamic = not packed
    if t.gradient_checkpointing:
        # transformers >= 5.25 with the `kernels` package it requires wraps Llama's attention
        # forward in a context-variable set/reset (RoPE routed to a Hub kernel): a side effect
        # dynamo refuses inside a checkpoint, so every layer ran eagerly (0 graphs; 1 on 5.24).
        # The set/reset pair leaves no state behind and is traced into the graph; not replaying
        # it when backward recomputes the layer changes nothing.
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
        # Compiling the whole decoder traces through activation checkpointing and keeps what
        # it would recompute (nf4 7B: 16.6 GiB instead of 7.6); compiling each layer inside
        # its checkpointed call keeps the savings. The layers share one compiled graph.
        for layer in decoder.layers:
            layer.compile(backend=COMPILE_BACKEND, dynamic=dynamic)
        return decoder
    return torch.compile(decoder, backend=COMPILE_BACKEND, dynamic=dynamic)


def graphs_compiled() -> int:
    """Graphs torch.compile has made in this process so far (dynamo's own count)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def compile_took(graphs_before: int, ranks: Ranks) -> int:
    """After the first compiled step: the graphs it made. None made means torch.compile fell back to
    eager for the whole decoder (a graph break in every layer: transformers 5.25's Hub kernels
    did that under checkpointing); the run goes on eagerly and says so."""
    made = graphs_compiled() - graphs_before
    if made == 0:
        from torch._dynamo.utils import counters

        breaks = "; ".join(sorted(counters["graph_break"])[:3]) or "no graph break recorded"
        ranks.print(f"warning: train.compile: torch.compile made no graph of the decoder "
                    f"({breaks}); this run trains eagerly, at eager speed")
    return made


def compile_pays(step_seconds: float, steps_left: int, precision: str) -> bool:
    """train.compile=auto: would compiling now save more than it costs?"""
    return step_seconds * steps_left * COMPILE_GAIN.get(precision, 0.25) > COMPILE_COST_S


# ---------------------------------------------------------------------------- validation


def validation_due(t: TrainConfig, step: int, last_step: bool) -> bool:
    """Every eval_every steps (1-based `step`), and after the last."""
    return bool(t.eval_every and step % t.eval_every == 0) or last_step


def validate(run: Run, val_set: list[Item]) -> dict[str, float]:
    """The record's validation fields: val_loss; preference: also its rewards and margin."""
    if run.preferring:
        return validation_preference(run.model, val_set, run.t, run.pad_id, run.attn_impl,
                                     run.dtype, None, run.ranks)
    return {"val_loss": validation_loss(run.model, val_set, run.t, run.pad_id, run.attn_impl,
                                        run.dtype, run.packed, run.ranks)}


def validation_batches(
    examples: list[Encoded], cfg: TrainConfig, packed: bool, pad_id: int
) -> list[dict[str, Any]]:
    """The validation examples in the training shapes: micro_batch_size rows a batch (the
    last filled with empty rows), packed in order into seq_len-wide rows when training packs
    (attention stays inside each example, so each keeps the loss it has alone). One shape
    means one compiled flex_attention kernel, not one per batch width."""
    rows: list[list[Encoded]] = []
    for example in examples:
        if packed and rows and (sum(len(e[0]) for e in rows[-1]) + len(example[0])
                                <= cfg.seq_len):
            rows[-1].append(example)
        else:
            rows.append([example])
    size, batches = cfg.micro_batch_size, []
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        longest = max(sum(len(e[0]) for e in row) for row in chunk)
        batches.append(collate(chunk + [[]] * (size - len(chunk)), pad_id,
                               max(cfg.seq_len, longest) if packed else longest))
    return batches


@contextmanager
def uncompiled(decoder: Any) -> Iterator[None]:
    """Layers compiled one by one (nn.Module.compile, under checkpointing) run eagerly inside
    this block. Validation runs eagerly: a compiled graph guards on grad mode and on dropout's
    training flag, so no_grad + eval() would compile a second one (on an H200, SmolLM2's first
    validation pass took 227 s of recompiling against a training step's 0.5 s)."""
    saved = [(layer, layer._compiled_call_impl) for layer in decoder.layers]
    for layer, _ in saved:
        layer._compiled_call_impl = None
    try:
        yield
    finally:
        for layer, compiled in saved:
            layer._compiled_call_impl = compiled


@torch.no_grad()
def validation_loss(
    model: PeftModel, examples: list[Encoded], cfg: TrainConfig, pad_id: int, attn_impl: str,
    dtype: torch.dtype, packed: bool = False, ranks: Ranks = SINGLE,
) -> float:
    """Mean loss per answer token over the validation examples, through the uncompiled model
    (see `uncompiled`); with several ranks each takes every world_size-th batch (rank_share)."""
    model.eval()
    device = next(model.parameters()).device.type
    total, count = torch.zeros((), device=device), 0
    batches = validation_batches(examples, cfg, packed, pad_id)
    decoder = model.get_base_model().model
    with uncompiled(decoder):
        for (batch,), counted in distributed.rank_share(batches, ranks):
            batch = to_device(batch, device)
            n = answer_tokens(batch) if counted else 0
            with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
                total += completion_loss(model, batch, n, attn_impl, decoder) * n
            count += n
    model.train()
    total_sum, count_sum = distributed.sum_values([float(total), count], ranks)
    return total_sum / max(count_sum, 1)


@torch.no_grad()
def validation_preference(
    model: PeftModel, units: list[Unit], cfg: TrainConfig, pad_id: int, attn_impl: str,
    dtype: torch.dtype, decoder: Any = None, ranks: Ranks = SINGLE,
) -> dict[str, float]:
    """The preference loss per unit over the validation units (each unit alone in its row;
    several ranks: every world_size-th, rank_share), with its reward accuracy, rewards and
    margin."""
    model.eval()
    device = next(model.parameters()).device.type
    total, sums, count = torch.zeros((), device=device), None, 0
    for chunk, counted in distributed.rank_share(units, ranks, cfg.micro_batch_size):
        rows = [[u] for u in chunk]
        batch = to_device(collate(rows, pad_id), device)
        n, chosen = preference_counts(rows)
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            loss, metrics = preference_loss(model, batch, (n, chosen), cfg, attn_impl, decoder)
        if counted:
            total += loss * n
            sums = metrics if sums is None else sums + metrics
            count += n
    model.train()
    local = [float(total), count, *(sums.tolist() if sums is not None
                                    else [0.0] * len(PREFERENCE_METRICS))]
    summed = distributed.sum_values(local, ranks)
    return {"val_loss": summed[0] / max(summed[1], 1),
            **preference_record(summed[2:], cfg.objective, prefix="val_")}


# ---------------------------------------------------------------------------- checkpoint, result


def checkpoint_if_due(run: Run, step: int, last_step: bool, position: int) -> None:
    """A resumable checkpoint after `step` when checkpoint_due says so: the adapter, optimizer
    and RNG, the stream position, the rows per step and the spike guard's state."""
    if not checkpoint_due(run.t, step, last_step, time.monotonic() - run.saved_at, run.ranks):
        return
    save_checkpoint(run.out / "checkpoints", run.model, run.optimizer, run.scaler, step,
                    {"position": position, "rows_per_step": rows_per_step(run.t, run.ranks),
                     "world_size": run.ranks.world_size,
                     "guard": {"mean": run.guard.mean, "streak": run.guard.streak}},
                    run.t.keep_checkpoints, run.ranks)
    run.saved_at = time.monotonic()


def summary(run: Run, last: dict[str, Any]) -> dict[str, Any]:
    """fit()'s result, from the last step's record: what result.json reports, with the
    TrainConfig the run trained with (`config`), every adjustment made: the micro-batch preflight
    fitted, the rows per step kept on resume, max_steps from train.epochs."""
    return {
        "steps": run.t.max_steps,
        "resumed_from": run.first_step,
        "train_loss": last.get("loss", float("nan")),
        "val_loss": last.get("val_loss", float("nan")),
        "seconds": time.perf_counter() - run.started,
        "tokens": run.tokens_seen,
        "trainable_params": sum(p.numel() for p in run.params),
        "world_size": run.ranks.world_size,
        "compiled": run.compiling.compiled,
        "config": run.t.model_dump(mode="json"),
    }
