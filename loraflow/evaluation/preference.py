"""Held-out preference pairs as an evaluation: how strongly a model prefers the chosen answer.

For a model M and its reference R (the SFT model an aligned adapter was trained on; for the
base and the SFT model themselves no reference is needed):
- win_rate: the share of pairs where M gives the chosen answer a higher log-likelihood than the
  rejected one (answer tokens + EOS, summed; the prompt never counts);
- logp_margin: the mean of log p_M(chosen) - log p_M(rejected);
- with a reference, DPO's implicit rewards beta * (log p_M - log p_R) per side: reward_accuracy
  (share with chosen reward > rejected reward) and reward_margin (mean difference).

KTO records (single answers labelled desirable or not) have no pairs: their logp_margin is the
mean log-likelihood of the desirable answers minus that of the undesirable ones, and
reward_margin the same of the rewards; there is no win rate or reward accuracy.

The pairs are the align stage's tokenized test split (loraflow.data.preference), so they are
rendered with the prompt template the model was trained with (loraflow.data.preference).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel

from loraflow.base_model import load_model
from loraflow.engine.batches import Unit, collate, read_items
from loraflow.engine.loss import sequence_logps


@torch.no_grad()
def pair_logps(model: torch.nn.Module, units: list[Unit], pad_id: int, batch_size: int = 8,
               adapter_off: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed answer log-probabilities of every pair, a pair per row."""
    chosen, rejected = [], []
    wrapped = model if isinstance(model, PeftModel) else _Bare(model)
    for start in range(0, len(units), batch_size):
        batch = collate([[u] for u in units[start : start + batch_size]], pad_id)
        if adapter_off:
            with model.disable_adapter():
                logps, _ = sequence_logps(wrapped, batch, "sdpa")
        else:
            logps, _ = sequence_logps(wrapped, batch, "sdpa")
        chosen.append(logps[0::2])
        rejected.append(logps[1::2])
    return torch.cat(chosen), torch.cat(rejected)


class _Bare:
    """A plain causal LM seen through the one method sequence_logps asks of a PeftModel."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def get_base_model(self) -> torch.nn.Module:
        return self.model


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor,
                 ref: tuple[torch.Tensor, torch.Tensor] | None = None,
                 beta: float = 0.1) -> dict[str, float]:
    metrics = {"win_rate": float((chosen > rejected).float().mean()),
               "logp_margin": float((chosen - rejected).mean()),
               "pairs": float(chosen.numel())}
    if ref is not None:
        chosen_reward, rejected_reward = beta * (chosen - ref[0]), beta * (rejected - ref[1])
        metrics |= {
            "reward_accuracy": float((chosen_reward > rejected_reward).float().mean()),
            "reward_margin": float((chosen_reward - rejected_reward).mean()),
        }
    return metrics


def pair_scores(chosen: torch.Tensor, rejected: torch.Tensor) -> list[dict[str, float]]:
    """Each held-out pair's own scores (the paired promotion gate compares them pair by
    pair): whether the chosen answer is the more likely one, and by how much."""
    return [{"pref_win_rate": float(c > r), "pref_logp_margin": float(c - r)}
            for c, r in zip(chosen.tolist(), rejected.tolist(), strict=True)]


def record_metrics(first: torch.Tensor, desirable: torch.Tensor,
                   ref: torch.Tensor | None = None, beta: float = 0.1) -> dict[str, float]:
    """KTO records: desirable minus undesirable answers' mean log-likelihood (and rewards)."""
    good, bad = first[desirable], first[~desirable]
    metrics = {"logp_margin": float(good.mean() - bad.mean()), "pairs": 0.0}
    if ref is not None:
        reward = beta * (first - ref)
        metrics["reward_margin"] = float(reward[desirable].mean() - reward[~desirable].mean())
    return metrics


def evaluate_pairs(model_dir: Path, tokens_dir: Path, pad_id: int, adapter: Path | None = None,
                   beta: float = 0.1, split: str = "test") -> dict[str, dict[str, float]]:
    """Metrics of the model in model_dir and, with an adapter, of model + adapter against
    model_dir as its reference: {"model": ..., "adapted": ...}."""
    import pyarrow.parquet as pq

    path = Path(tokens_dir) / f"{split}.parquet"
    kto = path.is_file() and "desirable" in pq.read_schema(path).names
    units = read_items(Path(tokens_dir), split, "kto" if kto else "dpo")
    if not units:
        raise ValueError(f"{tokens_dir} holds no {split} preference pairs. Fix: give the align "
                         "stage a non-empty align.test split.")
    model = load_model(model_dir)
    model.eval()
    if kto:
        flags = torch.tensor([u.desirable for u in units])
        if flags.all() or not flags.any():
            raise ValueError(f"{path}: KTO test records need both desirable and undesirable "
                             "answers to compare. Fix: give align.test records of both labels.")
    if adapter is None:
        scores = pair_logps(model, units, pad_id)
        return {"model": record_metrics(scores[0], flags) if kto else pair_metrics(*scores)}
    peft = PeftModel.from_pretrained(model, adapter)
    peft.eval()
    reference = pair_logps(peft, units, pad_id, adapter_off=True)
    adapted = pair_logps(peft, units, pad_id)
    if kto:
        return {"model": record_metrics(reference[0], flags),
                "adapted": record_metrics(adapted[0], flags, reference[0], beta)}
    return {"model": pair_metrics(*reference),
            "adapted": pair_metrics(*adapted, ref=reference, beta=beta),
            "model_pairs": pair_scores(*reference), "adapted_pairs": pair_scores(*adapted)}
