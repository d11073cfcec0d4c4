"""Preference losses: DPO (sigmoid, IPO, hinge), ORPO and KTO as plain functions.

Every function takes answer-only log-probabilities summed over each sequence's answer tokens
(the answer and EOS; the prompt never counts), of the policy and, where the loss has one, of
the reference model, one value per example, and returns per-example losses and the implicit
rewards. The engine (loraflow.engine.loss) turns them into a step's loss by summing over the
micro-batches and dividing by the examples of the whole step, as it does for SFT.

Definitions follow the papers and TRL's implementations, which the tests compare against:
- DPO (Rafailov et al. 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)));
  hinge: relu(1 - beta * delta); IPO (Azar et al. 2023, eq. 17) on per-token averages:
  (delta / tokens - 1 / (2 beta))^2, the length normalisation TRL confirmed with the authors.
- ORPO (Hong et al. 2024): NLL of the chosen answer - beta * log sigmoid(log odds ratio), the
  odds computed from per-token average log-probabilities; no reference model.
- KTO (Ethayarajh et al. 2024, eq. 7): desirable 1 - sigmoid(beta * (r - z)), undesirable
  1 - sigmoid(beta * (z - r)), r the log ratio to the reference and z the (detached, >= 0) KL
  estimate from mismatched prompt/completion pairs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from loraflow.config import DpoLoss

PAIRED: frozenset[str] = frozenset({"dpo", "orpo"})
NEEDS_REFERENCE: frozenset[str] = frozenset({"dpo", "kto"})


class PreferenceLoss(NamedTuple):
    losses: torch.Tensor  # per pair (dpo, orpo) or per example (kto)
    chosen_rewards: torch.Tensor  # detached
    rejected_rewards: torch.Tensor  # detached


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: DpoLoss = "sigmoid",
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> PreferenceLoss:
    """Per-pair DPO losses; rewards are beta x the log ratio to the reference. IPO needs the
    answer token counts (answer + EOS) of each side."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("dpo loss_type=ipo needs chosen_tokens and rejected_tokens")
        averaged = (chosen_ratio / chosen_tokens.clamp(min=1)
                    - rejected_ratio / rejected_tokens.clamp(min=1))
        losses = (averaged - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; allowed: sigmoid, ipo, hinge")
    return PreferenceLoss(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -log 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)),
                       torch.log(-torch.expm1(x)))


def orpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
) -> PreferenceLoss:
    """Per-pair odds-ratio term -beta * log sigmoid(log odds(chosen) - log odds(rejected)), on
    per-token average log-probabilities; the caller adds the chosen answers' NLL. Rewards are
    beta x the average log-probabilities (there is no reference)."""
    chosen = policy_chosen.float() / chosen_tokens.clamp(min=1)
    rejected = policy_rejected.float() / rejected_tokens.clamp(min=1)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return PreferenceLoss(-beta * F.logsigmoid(log_odds), beta * chosen.detach(),
                          beta * rejected.detach())


def kto_loss(
    policy: torch.Tensor,
    ref: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> PreferenceLoss:
    """Per-example KTO losses (desirable and undesirable mixed, in input order); `kl` is the
    reference point z, detached and clamped at 0 here. Rewards: beta x the log ratio, split
    into the desirable and the undesirable examples'."""
    ratio = policy - ref
    z = kl.detach().clamp(min=0)
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - z))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z - ratio))))
    rewards = beta * ratio.detach()
    return PreferenceLoss(losses, rewards[desirable], rewards[~desirable])


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """Sums (the engine divides by the step's pairs): reward accuracy, chosen/rejected rewards,
    margin."""
    return {
        "reward_accuracy": float((chosen_rewards > rejected_rewards).float().sum()),
        "chosen_reward": float(chosen_rewards.sum()),
        "rejected_reward": float(rejected_rewards.sum()),
        "margin": float((chosen_rewards - rejected_rewards).sum()),
    }
