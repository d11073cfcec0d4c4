"""The loss on answer tokens only, a few thousand at a time: no vocabulary-wide logits
tensor for the whole batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft import (
    PeftModel,
)
from torch.utils.checkpoint import checkpoint

from loraflow.data.tokenization import IGNORE_INDEX
from loraflow.engine.batches import attention_mask_for
from loraflow.engine.config import LOSS_CHUNK


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
