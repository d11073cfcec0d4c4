"""The loss on answer tokens only, a few thousand at a time: no vocabulary-wide logits
tensor for the whole batch. SFT: cross-entropy; dpo/orpo/kto: per-sequence answer
log-probabilities into loraflow.engine.preference's losses, the reference being the same model
with its adapter switched off.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft import (
    PeftModel,
)
from torch.utils.checkpoint import checkpoint

from loraflow.config import TrainConfig
from loraflow.data.tokenization import IGNORE_INDEX
from loraflow.engine.batches import Item, attention_mask_for, item_examples
from loraflow.engine.config import LOSS_CHUNK
from loraflow.engine.preference import NEEDS_REFERENCE, dpo_loss, kto_loss, orpo_loss


def chunk_loss(head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(states).float(), targets, reduction="sum")


def answer_states(
    model: PeftModel, batch: dict[str, torch.Tensor], attn_impl: str, decoder: Any = None
) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The causal LM, the decoder's hidden states at the positions whose next token carries a
    label, those labels, and the mask that picked them (what every loss here reads)."""
    causal_lm = model.get_base_model()
    mask = attention_mask_for(batch["doc_ids"], attn_impl, batch.get("branch_ids"))
    hidden = (decoder if decoder is not None else causal_lm.model)(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask,
        use_cache=False,
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    return causal_lm, hidden[:, :-1][keep], targets[keep], keep


def completion_loss(
    model: PeftModel, batch: dict[str, torch.Tensor], n_items: int, attn_impl: str,
    decoder: Any = None, recompute_logits: bool = False,
) -> torch.Tensor:
    """Sum of cross-entropy over answer tokens / n_items. Logits are computed only where a
    label exists, a chunk at a time: never the full (tokens x vocab) tensor. With
    recompute_logits (under activation checkpointing) the backward recomputes each chunk's
    logits instead of keeping them all (answer tokens x vocab x 6 bytes: ~1 GiB at 8k rows)."""
    causal_lm, states, targets, _ = answer_states(model, batch, attn_impl, decoder)
    total = states.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), LOSS_CHUNK):
        chunk = (causal_lm.lm_head, states[start : start + LOSS_CHUNK],
                 targets[start : start + LOSS_CHUNK])
        total = total + (checkpoint(chunk_loss, *chunk, use_reentrant=False)
                         if recompute_logits else chunk_loss(*chunk))
    return total / max(n_items, 1)


def token_logps(head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(states).float(), targets, reduction="none")


def sequence_logps(
    model: PeftModel, batch: dict[str, torch.Tensor], attn_impl: str, decoder: Any = None,
    recompute_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probabilities of each sequence's answer tokens, answer tokens of each), for
    a batch of preference units (collate's seq_ids): the logits only where a label exists, a
    chunk at a time, as completion_loss computes them."""
    causal_lm, states, targets, keep = answer_states(model, batch, attn_impl, decoder)
    owner = batch["seq_ids"][:, 1:][keep]
    pieces = []
    for start in range(0, targets.numel(), LOSS_CHUNK):
        chunk = (causal_lm.lm_head, states[start : start + LOSS_CHUNK],
                 targets[start : start + LOSS_CHUNK])
        pieces.append(checkpoint(token_logps, *chunk, use_reentrant=False)
                      if recompute_logits else token_logps(*chunk))
    n = 2 * batch["desirable"].numel()  # every unit has two sequences
    per_token = torch.cat(pieces) if pieces else states.new_zeros(0, dtype=torch.float32)
    logps = per_token.new_zeros(n).index_add(0, owner, per_token)
    tokens = torch.bincount(owner, minlength=n).to(per_token.dtype)
    return logps, tokens


PREFERENCE_METRICS = ("reward_correct", "chosen_reward_sum", "rejected_reward_sum",
                      "chosen_count", "rejected_count", "kl_sum", "micro_batches")


def preference_loss(
    model: PeftModel, batch: dict[str, torch.Tensor], counts: tuple[int, int], t: TrainConfig,
    attn_impl: str, decoder: Any = None, recompute_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(this micro-batch's share of the step's dpo/orpo/kto loss, its metric sums in the order
    of PREFERENCE_METRICS). `counts` are the whole step's (units, chosen answer tokens): the
    step loss is the mean over its units (plus, for orpo and for dpo with sft_weight, the
    chosen answers' NLL per answer token), however the units fall into micro-batches and
    ranks. The reference is this model with its adapter switched off, in the same no-grad
    forward layout: no second copy."""
    units, chosen_tokens = counts
    logps, tokens = sequence_logps(model, batch, attn_impl, decoder, recompute_logits)
    first, second = logps[0::2], logps[1::2]
    if t.objective in NEEDS_REFERENCE:
        with torch.no_grad(), model.disable_adapter():
            ref, _ = sequence_logps(model, batch, attn_impl, decoder)
        ref_first, ref_second = ref[0::2], ref[1::2]
    zero = logps.new_zeros(())
    kl = zero
    chosen_nll = -first.sum() / max(chosen_tokens, 1)  # per chosen answer token (orpo, sft_weight)
    weights = t.preference
    if t.objective == "dpo":
        out = dpo_loss(first, second, ref_first, ref_second, weights.beta, weights.loss_type,
                       tokens[0::2], tokens[1::2])
        loss = out.losses.sum() / max(units, 1)
        if weights.sft_weight:
            loss = loss + weights.sft_weight * chosen_nll
    elif t.objective == "orpo":
        out = orpo_loss(first, second, tokens[0::2], tokens[1::2], weights.beta)
        loss = chosen_nll + out.losses.sum() / max(units, 1)
    elif t.objective == "kto":
        kl = (second - ref_second).mean().detach()  # the mismatched pairs: KTO's z
        out = kto_loss(first, ref_first, batch["desirable"], kl, weights.beta,
                       weights.kto_desirable_weight, weights.kto_undesirable_weight)
        loss = out.losses.sum() / max(units, 1)
    else:
        raise ValueError(f"preference_loss: train.objective={t.objective} is not a preference "
                         "objective")
    paired = t.objective != "kto"
    correct = ((out.chosen_rewards > out.rejected_rewards).float().sum() if paired else zero)
    metrics = torch.stack([
        correct, out.chosen_rewards.sum(), out.rejected_rewards.sum(),
        logps.new_tensor(float(out.chosen_rewards.numel())),
        logps.new_tensor(float(out.rejected_rewards.numel())), kl.clamp(min=0),
        logps.new_ones(())]).detach()
    return loss, metrics


def preference_counts(rows: list[list[Item]]) -> tuple[int, int]:
    """(units, answer tokens of their first sequences) of rows: a step's normalisers."""
    units = chosen = 0
    for row in rows:
        for item in row:
            ids, prompt_len = item_examples(item)[0]
            units, chosen = units + 1, chosen + len(ids) - prompt_len
    return units, chosen


def preference_record(sums: list[float], objective: str, prefix: str = "") -> dict[str, float]:
    """Per-step metrics from summed PREFERENCE_METRICS: reward accuracy (pairs), mean
    chosen/rejected rewards and their margin, KTO's KL estimate."""
    got = dict(zip(PREFERENCE_METRICS, sums, strict=True))
    chosen = got["chosen_reward_sum"] / max(got["chosen_count"], 1)
    rejected = got["rejected_reward_sum"] / max(got["rejected_count"], 1)
    record = {f"{prefix}chosen_reward": chosen, f"{prefix}rejected_reward": rejected,
              f"{prefix}margin": chosen - rejected}
    if objective == "kto":
        record[f"{prefix}kl"] = got["kl_sum"] / max(got["micro_batches"], 1)
    else:
        record[f"{prefix}reward_accuracy"] = got["reward_correct"] / max(got["chosen_count"], 1)
    return record
