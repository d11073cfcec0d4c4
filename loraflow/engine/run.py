"""One training run, set up then fitted: the ranks, the data, the model (preflight on a GPU),
fit(), and the adapter saved atomically with result.json (fit's numbers and `config`, the
TrainConfig as trained).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from loraflow.base_model import load_tokenizer
from loraflow.config import TrainConfig
from loraflow.engine import distributed
from loraflow.engine.batches import item_len, read_items
from loraflow.engine.checkpoints import lora_state
from loraflow.engine.config import EngineConfig
from loraflow.engine.distributed import Ranks
from loraflow.engine.loop import fit
from loraflow.engine.model import (
    add_lora,
    load_base,
    load_base_sharded,
    merge_into_base,
    pick_precision,
    use_fp8,
)
from loraflow.engine.preflight import check_device, fit_micro_batch


def train(cfg: EngineConfig) -> dict[str, Any]:
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
) -> dict[str, Any]:
    dtype = pick_precision(t, device)
    packed = t.batching == "packed" or (t.batching == "auto" and device == "cuda")
    attn_impl = "flex_attention" if packed and device == "cuda" else "sdpa"
    torch.manual_seed(t.seed)

    tokenizer = load_tokenizer(cfg.base_path)
    train_set = read_items(cfg.data_dir, "train", t.objective)
    val_set = read_items(cfg.data_dir, "validation", t.objective)
    if not train_set:
        raise ValueError(f"{cfg.data_dir} holds no training examples (train.parquet)")
    too_long = max(item_len(item) for item in train_set)
    if packed and too_long > t.seq_len:
        raise ValueError(f"an example has {too_long} tokens, more than train.seq_len="
                         f"{t.seq_len}. Fix: raise train.seq_len or lower data.max_length.")

    if device == "cuda":  # the guide's checklist, and a micro-batch that fits
        architecture = json.loads((Path(cfg.base_path) / "config.json").read_text())
        shards = ranks.world_size if cfg.launch.parallelism == "fsdp" else 1
        asked = t
        t, guess = fit_micro_batch(architecture, t, cfg.lora, packed, too_long, check_device(t),
                                   shards)
        micro = distributed.min_value(t.micro_batch_size, ranks)  # every rank the same rows
        if micro != t.micro_batch_size:  # from the asked config, as the other ranks' fit did
            t = asked.with_micro_batch(micro)
        ranks.print(f"preflight: about {guess.total_gib:.1f} GiB a GPU at micro_batch_size="
                    f"{t.micro_batch_size} x grad_accum_steps={t.grad_accum_steps} x "
                    f"{ranks.world_size} GPU(s)")

    if cfg.launch.parallelism == "fsdp" and ranks.distributed:
        model = load_base_sharded(cfg.base_path, t, cfg.lora, device, attn_impl, ranks)
    else:
        base = load_base(cfg.base_path, t, device, attn_impl)
        if cfg.merge_adapter is not None:
            base = merge_into_base(base, cfg.merge_adapter, t, cfg.launch.parallelism)
        model = add_lora(base, cfg.lora)
    if t.precision == "fp8":
        use_fp8(model)
    result = fit(model, train_set=train_set, val_set=val_set, t=t, out=out,
                 pad_id=tokenizer.pad_token_id, dtype=dtype, attn_impl=attn_impl, packed=packed,
                 ranks=ranks)
    adapter = lora_state(model)
    if not ranks.main:
        return result

    # The adapter names its base as the user configured it (a hub id or their path), not this
    # machine's copy, so PEFT's own loading works elsewhere; loraflow.json keeps path and hashes.
    if cfg.base_source:
        model.peft_config["default"].base_model_name_or_path = cfg.base_source
    # Write the adapter beside its final name, then rename: no half-written adapter/.
    staging = out / "adapter.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True, state_dict=adapter)
    shutil.rmtree(out / "adapter", ignore_errors=True)
    staging.rename(out / "adapter")
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result
