"""The training engine: LoRA / QLoRA on a causal LM, as a plain process.

    python -m loraflow.train --config RUN_DIR/engine.json

Reads tokenized examples and a typed config, trains, and writes to the run directory:
metrics.jsonl (one JSON object per optimizer step, plus validation losses), checkpoints/
(resumable: adapter, optimizer, data position, RNG; safetensors + JSON), adapter/ (PEFT,
safetensors), result.json, and failure.json when it stops early. A rerun with the same run
directory resumes from the last checkpoint. It imports neither Prefect nor MLflow, so it runs
unchanged on a GPU worker that has neither; the caller relays the metrics.

Exit codes: 0 done, 3 out of memory, 4 diverged (NaN/inf or a loss spike that did not recover),
5 hung (the watchdog saw no progress), 6 refused by the preflight (no GPU, unsupported
precision, or the run cannot fit), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from pydantic import BaseModel
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from loraflow import distributed
from loraflow.config import LoraSettings, TrainConfig
from loraflow.distributed import SINGLE, Ranks
from loraflow.model import load_tokenizer
from loraflow.preflight import PreflightError, check_device, fit_micro_batch
from loraflow.tokenization import IGNORE_INDEX, read_tokenized

EXIT_OOM, EXIT_DIVERGED, EXIT_HUNG, EXIT_REFUSED = 3, 4, 5, 6
LOSS_CHUNK = 4096  # answer tokens per logits chunk: caps the logits tensor at 4096 x vocab
# Fault injection for the engine's own tests: a real NaN or hang cannot be summoned on demand.
POISON_STEP = int(os.environ.get("LORAFLOW_TEST_POISON_STEP", "0"))
STALL_STEP, STALL_SECONDS = 3, float(os.environ.get("LORAFLOW_TEST_STALL_SECONDS", "0"))
STALL_RANK = int(os.environ.get("LORAFLOW_TEST_STALL_RANK", "0"))

Example = tuple[list[int], int]  # (input_ids, prompt_len)


class EngineConfig(BaseModel):
    """Everything one training run needs; written as JSON by the caller."""

    base_path: Path
    data_dir: Path
    output_dir: Path
    lora: LoraSettings = LoraSettings()
    train: TrainConfig = TrainConfig()


class Diverged(RuntimeError):
    """The loss became NaN/inf or stayed spiked: retrying the same thing would not help."""


def read_examples(data_dir: Path, split: str) -> list[Example]:
    """The examples of one split (<split>.parquet, as loraflow.tokenization writes it); a split
    without its file has none."""
    path = Path(data_dir) / f"{split}.parquet"
    return read_tokenized(path) if path.is_file() else []


# ---------------------------------------------------------------------------- data


class ExampleStream:
    """Examples in a fresh seeded order each epoch; `position` (examples consumed) is all a
    checkpoint needs to resume the exact same stream."""

    def __init__(self, examples: list[Example], seed: int, position: int = 0) -> None:
        self.examples, self.seed, self.position = examples, seed, position
        self._epoch, self._order = -1, list(range(len(examples)))

    def peek(self) -> Example:
        epoch, offset = divmod(self.position, len(self.examples))
        if epoch != self._epoch:
            self._order = list(range(len(self.examples)))
            random.Random(self.seed + epoch).shuffle(self._order)
            self._epoch = epoch
        return self.examples[self._order[offset]]

    def take(self) -> Example:
        example = self.peek()
        self.position += 1
        return example


def next_micro_batch(
    stream: ExampleStream, cfg: TrainConfig, packed: bool, count: int | None = None
) -> list[list[Example]]:
    """`count` rows (default: one micro-batch) of examples: one example a row (padded), or as
    many as fit in seq_len (packed)."""
    count = count or cfg.micro_batch_size
    if not packed:
        return [[stream.take()] for _ in range(count)]
    rows = []
    for _ in range(count):
        row = [stream.take()]
        used = len(row[0][0])
        while used + len(stream.peek()[0]) <= cfg.seq_len:
            used += len(stream.peek()[0])
            row.append(stream.take())
        rows.append(row)
    return rows


def step_rows(
    stream: ExampleStream, cfg: TrainConfig, packed: bool, ranks: Ranks
) -> list[list[list[Example]]]:
    """One optimizer step's rows for every rank, micro-step by micro-step: each micro-step has
    micro_batch_size x world_size rows, of which rank r trains the r-th micro_batch_size."""
    return [next_micro_batch(stream, cfg, packed, cfg.micro_batch_size * ranks.world_size)
            for _ in range(cfg.grad_accum_steps)]


def rows_per_step(cfg: TrainConfig, ranks: Ranks) -> int:
    """The effective batch: rows in one optimizer step over all ranks."""
    return cfg.micro_batch_size * cfg.grad_accum_steps * ranks.world_size


def collate(rows: list[list[Example]], pad_id: int, width: int | None = None) -> dict[str, Any]:
    """Tensors for rows of one or more examples each, padded at the end to `width` (default:
    the longest row). Labels are IGNORE_INDEX on prompts and padding; position ids restart at 0 for
    every example; doc_ids number the examples of a row (padding is -1)."""
    width = width or max(sum(len(ids) for ids, _ in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    doc_ids = torch.full(shape, -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for d, (ids, prompt_len) in enumerate(row):
            end = start + len(ids)
            input_ids[r, start:end] = torch.tensor(ids)
            labels[r, start + prompt_len : end] = torch.tensor(ids[prompt_len:])
            position_ids[r, start:end] = torch.arange(len(ids))
            doc_ids[r, start:end] = d
            start = end
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "doc_ids": doc_ids}


def attention_mask_for(doc_ids: torch.Tensor, attn_impl: str) -> Any:
    """Causal attention inside each example only (padding attends to padding, so no row is
    empty). A flex_attention BlockMask on GPU also skips the masked blocks' compute."""
    if attn_impl == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def same_example(b: Any, h: Any, q: Any, kv: Any) -> Any:
            return (doc_ids[b, q] == doc_ids[b, kv]) & (kv <= q)

        rows, width = doc_ids.shape
        return create_block_mask(same_example, B=rows, H=None, Q_LEN=width, KV_LEN=width,
                                 device=doc_ids.device)
    width = doc_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=doc_ids.device).tril()
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]


def answer_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def row_counts(rows: list[list[Example]]) -> tuple[int, int]:
    """(answer tokens, real tokens) of rows, as collate() would lay them out: the loss
    predicts every label but a row's first token. Lets each rank know the whole step's
    counts from the rows alone, with no communication."""
    answers = real = 0
    for row in rows:
        for d, (ids, prompt_len) in enumerate(row):
            answers += len(ids) - max(prompt_len, 1 if d == 0 else 0)
            real += len(ids)
    return answers, real


# ---------------------------------------------------------------------------- model


def halve_micro_batch(cfg: TrainConfig, halvings: int) -> TrainConfig:
    """After `halvings` out-of-memory failures: micro-batch / 2**h, accumulation x the same,
    so the effective batch is unchanged."""
    micro = cfg.micro_batch_size >> halvings
    if micro < 1:
        raise ValueError(f"out of memory even at micro_batch_size=1 after {halvings} halvings. "
                         "Fix: train.gradient_checkpointing=true, precision nf4, or a shorter "
                         "train.seq_len / data.max_length.")
    return cfg.with_micro_batch(micro)


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
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = pick_precision(cfg, device)
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True,
                              "attn_implementation": attn_impl}
    if cfg.precision in ("int8", "nf4"):
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True) if cfg.precision == "int8" else
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
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
    """train.parallelism=fsdp: the base with LoRA, its weights sharded across the ranks, never
    whole on one GPU. Rank 0 reads them into CPU memory, the other ranks build the model on
    the meta device; distributed.shard_model shards it and fills the shards from rank 0."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = fsdp_precision(cfg, device)
    if ranks.main:
        base = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=dtype,
                                                    attn_implementation=attn_impl)
    else:
        base = meta_base(AutoConfig.from_pretrained(path), dtype, attn_impl)
    model = add_lora(prepare_for_training(base, cfg), lora)
    held = distributed.shard_model(model, ranks)
    if ranks.main:
        print(f"loraflow.train: fsdp: rank 0 holds {held:,} of the model's "
              f"{sum(p.numel() for p in model.parameters()):,} weights", file=sys.stderr)
    return model


def random_base_sharded(
    config: Any, cfg: TrainConfig, lora: LoraSettings, device: str, attn_impl: str,
    ranks: Ranks, seed: int = 0,
) -> PeftModel:
    """Benchmarks of train.parallelism=fsdp on a model too large to build whole (a 70B): the
    architecture `config` (a transformers config) with LoRA, built on the meta device on every
    rank, sharded as load_base_sharded's model is, and filled with random weights on each
    rank's device (distributed.fill_random). Throughput does not depend on the values."""
    model = add_lora(prepare_for_training(meta_base(config, fsdp_precision(cfg, device),
                                                    attn_impl), cfg), lora)
    distributed.shard_layers(model, ranks)
    distributed.fill_random(model, ranks, seed)
    return model


def fsdp_precision(cfg: TrainConfig, device: str) -> torch.dtype:
    dtype = pick_precision(cfg, device)
    if dtype == torch.float16:  # precision=auto on a GPU without bf16
        raise PreflightError("train.parallelism=fsdp needs bf16 (or fp32): this GPU has no bf16 "
                             "and fp16's loss scaling cannot see other ranks' shards. Fix: "
                             "train.parallelism=ddp")
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
    from loraflow.fp8 import convert_frozen_linears

    convert_frozen_linears(model, skip=lambda name: name.endswith("lm_head"))


def chunk_loss(head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(states).float(), targets, reduction="sum")


def completion_loss(
    model: PeftModel, batch: dict[str, torch.Tensor], n_items: int, attn_impl: str,
    decoder: Any = None, recompute_logits: bool = False,
) -> torch.Tensor:
    """Sum of cross-entropy over answer tokens / n_items. Logits are computed only where a
    label exists, a chunk at a time: never the full (tokens x vocab) tensor. With
    recompute_logits (under activation checkpointing) the backward recomputes each chunk's
    logits instead of keeping them all (answer tokens x vocab x 6 bytes: ~1 GiB at 8k rows)."""
    causal_lm = model.get_base_model()
    mask = attention_mask_for(batch["doc_ids"], attn_impl)
    hidden = (decoder if decoder is not None else causal_lm.model)(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask,
        use_cache=False,
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    states, targets = hidden[:, :-1][keep], targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), LOSS_CHUNK):
        chunk = (causal_lm.lm_head, states[start : start + LOSS_CHUNK],
                 targets[start : start + LOSS_CHUNK])
        total = total + (checkpoint(chunk_loss, *chunk, use_reentrant=False)
                         if recompute_logits else chunk_loss(*chunk))
    return total / max(n_items, 1)


# ---------------------------------------------------------------------------- checkpoints


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


# ---------------------------------------------------------------------------- guards


class Watchdog:
    """Ends the process with a clear message when no step finishes for `seconds` (a silent
    hang: a stuck kernel, a dead collective, a deadlocked loader). It is armed by the first
    finished step: the first one also pays for compilation and warm-up."""

    def __init__(self, seconds: float, out: Path, ranks: Ranks = SINGLE) -> None:
        self.seconds, self.out, self.ranks = seconds, out, ranks
        self.step, self.beat, self.stopped = 0, time.monotonic(), False
        if seconds > 0:
            threading.Thread(target=self._watch, daemon=True, name="watchdog").start()

    def progress(self, step: int) -> None:
        self.step, self.beat = step, time.monotonic()

    def _watch(self) -> None:
        while not self.stopped:
            time.sleep(min(1.0, self.seconds / 4))
            idle = time.monotonic() - self.beat
            if idle > self.seconds and self.step and not self.stopped:
                where = f" on rank {self.ranks.rank}" if self.ranks.distributed else ""
                message = (f"no progress for {idle:.1f} s after step {self.step}{where} "
                           f"(watchdog: train.watchdog_seconds={self.seconds}); the run was "
                           "stopped." + distributed.stalled_ranks(self.ranks) + " Check GPU "
                           "utilisation and the data loader; raise the limit if a step is "
                           "legitimately this slow.")
                write_failure(self.out, "hung", self.step, message, self.ranks)
                print(f"\nloraflow.train: {message}", file=sys.stderr, flush=True)
                os._exit(EXIT_HUNG)


class SpikeGuard:
    """NaN/inf stops at once; a loss above spike_factor x its running mean for spike_patience
    steps in a row stops too (a spike that recovers is normal and ignored)."""

    def __init__(self, cfg: TrainConfig, mean: float | None = None, streak: int = 0) -> None:
        self.factor, self.patience = cfg.spike_factor, cfg.spike_patience
        self.mean, self.streak = mean, streak

    def check(self, loss: float, step: int) -> None:
        if not math.isfinite(loss):
            raise Diverged(f"loss is {loss} at step {step}")
        if self.mean is not None and loss > self.factor * self.mean:
            self.streak += 1
            if self.streak >= self.patience:
                raise Diverged(f"loss {loss:.4g} at step {step} has stayed above "
                               f"{self.factor} x its running mean {self.mean:.4g} for "
                               f"{self.patience} steps")
            return
        self.streak = 0
        self.mean = loss if self.mean is None else 0.9 * self.mean + 0.1 * loss


def write_failure(out: Path, kind: str, step: int, message: str, ranks: Ranks = SINGLE) -> None:
    """failure.json (rank 0) or failure.rank<N>.json: why the run stopped, for the caller."""
    name = "failure.json" if ranks.main else f"failure.rank{ranks.rank}.json"
    (out / name).write_text(json.dumps({"kind": kind, "step": step, "message": message,
                                        "rank": ranks.rank}))


# ---------------------------------------------------------------------------- loop


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
    model: PeftModel, examples: list[Example], cfg: TrainConfig, pad_id: int, attn_impl: str,
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


def fit(
    model: PeftModel,
    train_set: list[Example],
    val_set: list[Example],
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
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay,
                                  fused=device == "cuda")
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    decoder = model.get_base_model().model
    if t.compile and t.gradient_checkpointing:
        # Compiling the whole decoder traces through activation checkpointing and keeps what
        # it would recompute (nf4 7B: 16.6 GiB instead of 7.6); compiling each layer inside
        # its checkpointed call keeps the savings.
        for layer in decoder.layers:
            layer.compile(dynamic=False)
    elif t.compile:
        decoder = torch.compile(decoder, dynamic=False)
    width = t.seq_len if packed else None

    first_step, position, guard_state = 0, 0, {}
    checkpoint = distributed.share_checkpoint(latest_checkpoint(out / "checkpoints"), ranks)
    if checkpoint is not None:
        meta = load_checkpoint(checkpoint, model, optimizer, scaler)
        first_step, position, guard_state = meta["step"], meta["position"], meta["guard"]
        t = keep_rows_per_step(t, meta.get("rows_per_step"), ranks)
        if ranks.main:
            print(f"loraflow.train: resuming from {checkpoint} (step {first_step})",
                  file=sys.stderr)
    if ranks.distributed:  # dropout differs between ranks, reproducibly for a given step
        torch.manual_seed(t.seed + 1_000_003 * (ranks.rank + 1) + first_step)
    if t.epochs:
        t = t.model_copy(update={"max_steps": steps_for_epochs(train_set, t, packed, ranks)})
    metrics_path = out / "metrics.jsonl"
    if ranks.main:
        kept = [line for line in (metrics_path.read_text().splitlines()
                                  if metrics_path.is_file() else [])
                if json.loads(line)["step"] <= first_step]
        metrics_path.write_text("".join(line + "\n" for line in kept))

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
    with open(metrics_path if ranks.main else os.devnull, "a", encoding="utf-8") as metrics_file:
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
            if step + 1 == STALL_STEP and STALL_SECONDS and ranks.rank == STALL_RANK:
                time.sleep(STALL_SECONDS)
            distributed.heartbeat(ranks, step, "sync")
            step_loss = distributed.sync_gradients(params, step_loss, ranks)
            scaler.unscale_(optimizer)
            # FSDP: the norm over every rank's shards (a DTensor)
            grad_norm = distributed.whole(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm))
            loss = float(step_loss)  # one host sync per optimizer step, not per micro-batch
            if step + 1 == POISON_STEP:
                loss = float("nan")
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
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
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
        if ranks.main:
            print(f"loraflow.train: warning: the checkpoint trained {rows} rows per step; "
                  f"{ranks.world_size} ranks x micro_batch_size {t.micro_batch_size} cannot "
                  f"divide that, so the run goes on with {now} rows per step", file=sys.stderr)
        return t
    if ranks.main:
        print(f"loraflow.train: the checkpoint trained {rows} rows per step; on "
              f"{ranks.world_size} rank(s) grad_accum_steps becomes {rows // per_pass} to keep "
              "it", file=sys.stderr)
    return t.model_copy(update={"grad_accum_steps": rows // per_pass})


def steps_for_epochs(
    train_set: list[Example], t: TrainConfig, packed: bool, ranks: Ranks = SINGLE
) -> int:
    """Optimizer steps for `t.epochs` passes over the examples, counted by building the very
    rows the run will (packing decides how many examples a row holds)."""
    stream, steps, target = ExampleStream(train_set, t.seed), 0, t.epochs * len(train_set)
    while stream.position < target:
        step_rows(stream, t, packed, ranks)
        steps += 1
    return steps


def train(cfg: EngineConfig) -> dict[str, float]:
    """Set up model and data, run fit(), save the adapter (also written: result.json)."""
    t = cfg.train
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("failure*.json"):
        old.unlink(missing_ok=True)
    if t.threads:
        torch.set_num_threads(t.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # A collective waiting longer than this fails; the watchdog (shorter) names the rank first.
    ranks = distributed.init(device, 2 * t.watchdog_seconds + 60 if t.watchdog_seconds else 1800)
    try:
        return train_ranks(cfg, t, out, device, ranks)
    finally:
        distributed.shutdown(ranks)


def train_ranks(
    cfg: EngineConfig, t: TrainConfig, out: Path, device: str, ranks: Ranks
) -> dict[str, float]:
    dtype = pick_precision(t, device)
    packed = t.batching == "packed" or (t.batching == "auto" and device == "cuda")
    attn_impl = "flex_attention" if packed and device == "cuda" else "sdpa"
    torch.manual_seed(t.seed)

    tokenizer = load_tokenizer(cfg.base_path)
    train_set = read_examples(cfg.data_dir, "train")
    val_set = read_examples(cfg.data_dir, "validation")
    if not train_set:
        raise ValueError(f"{cfg.data_dir} holds no training examples (train.parquet)")
    too_long = max(len(ids) for ids, _ in train_set)
    if packed and too_long > t.seq_len:
        raise ValueError(f"an example has {too_long} tokens, more than train.seq_len="
                         f"{t.seq_len}. Fix: raise train.seq_len or lower data.max_length.")

    if device == "cuda":  # the guide's checklist, and a micro-batch that fits
        architecture = json.loads((Path(cfg.base_path) / "config.json").read_text())
        shards = ranks.world_size if t.parallelism == "fsdp" else 1
        asked = t
        t, guess = fit_micro_batch(architecture, t, cfg.lora, packed, too_long, check_device(t),
                                   shards)
        micro = distributed.min_value(t.micro_batch_size, ranks)  # every rank the same rows
        if micro != t.micro_batch_size:  # from the asked config, as the other ranks' fit did
            t = asked.with_micro_batch(micro)
        if ranks.main:
            print(f"loraflow.train: preflight: about {guess.total_gib:.1f} GiB a GPU at "
                  f"micro_batch_size={t.micro_batch_size} x grad_accum_steps="
                  f"{t.grad_accum_steps} x {ranks.world_size} GPU(s)", file=sys.stderr)

    if t.parallelism == "fsdp" and ranks.distributed:
        model = load_base_sharded(cfg.base_path, t, cfg.lora, device, attn_impl, ranks)
    else:
        model = add_lora(load_base(cfg.base_path, t, device, attn_impl), cfg.lora)
    if t.precision == "fp8":
        use_fp8(model)
    result = fit(model, train_set, val_set, t, out, tokenizer.pad_token_id, dtype, attn_impl,
                 packed, ranks)
    adapter = lora_state(model)
    if not ranks.main:
        return result

    # Write the adapter beside its final name, then rename: no half-written adapter/.
    staging = out / "adapter.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True, state_dict=adapter)
    shutil.rmtree(out / "adapter", ignore_errors=True)
    staging.rename(out / "adapter")
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a LoRA adapter (loraflow engine).")
    parser.add_argument("--config", type=Path, required=True, help="engine config JSON")
    args = parser.parse_args(argv)
    cfg = EngineConfig.model_validate_json(args.config.read_text(encoding="utf-8"))
    try:
        result = train(cfg)
    except torch.OutOfMemoryError as exc:
        rank = int(os.environ.get("RANK", "0"))
        message = (f"out of memory with micro_batch_size={cfg.train.micro_batch_size}"
                   f"{f' on rank {rank}' if rank else ''}: {exc}. A retry halves the "
                   "micro-batch and doubles accumulation.")
        write_failure(Path(cfg.output_dir), "oom", -1, message, Ranks(rank=rank))
        print(f"loraflow.train: {message}", file=sys.stderr)
        return EXIT_OOM
    except Diverged as exc:
        print(f"\nloraflow.train: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except PreflightError as exc:
        write_failure(Path(cfg.output_dir), "preflight", 0, str(exc),
                      Ranks(rank=int(os.environ.get("RANK", "0"))))
        print(f"loraflow.train: preflight: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
