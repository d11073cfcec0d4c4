"""Paired tests for the promotion gate: is the candidate better than the reference on the same
prompts by more than chance, and no worse on what must not regress?

Both models answer the same examples, so each example is a pair and only the pairs that differ
carry information. A 0/1 metric (exact match, JSON validity, a threshold per example) is judged
by the exact sign (McNemar) test on the discordant pairs and an exact one-sided bound on the
difference of the two proportions, conditional on how many pairs differ; a continuous metric
(fuzzy, loss) by a seeded paired bootstrap of the mean difference. Each test is one-sided: the
lower confidence bound of the improvement is compared with a margin.

Promotion asks every test at once (the gate metric improves by at least the margin AND no
guard falls by more than its tolerance): an intersection-union test, whose chance of promoting
when any one of those claims is false is at most the one-sided error of that claim's own test,
so the gate and its guards need no multiplicity adjustment (Berger 1982). Several candidates
judged against one reference are a union of claims and do: `holm` adjusts their p-values.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel
from scipy.stats import beta as beta_distribution
from scipy.stats import binom

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 20_251_206  # any fixed value: the same scores give the same interval
Kind = Literal["binary", "continuous"]


class PairedTest(BaseModel):
    """One paired comparison of candidate against reference on the same examples."""

    metric: str
    kind: Kind
    examples: int
    wins: int  # examples where the candidate scored better
    losses: int  # examples where the reference scored better
    ties: int
    estimate: float  # mean improvement (candidate - reference; reference - candidate for loss)
    lower: float  # one-sided lower confidence bound of the improvement
    upper: float  # the bound on the other side, at the same confidence (with lower: the
    # two-sided interval at 1 - 2 x (1 - confidence), the one the report draws)
    confidence: float
    margin: float  # the improvement the lower bound must reach (negative: a tolerance)
    p_value: float  # one-sided, of "the improvement is at most the margin"
    passed: bool  # lower >= margin (and, for a superiority claim, lower > 0)


def improvement_of(candidate: list[float], reference: list[float], lower_is_better: bool
                   ) -> np.ndarray:
    """Per-example improvement, positive where the candidate is better."""
    diff = np.asarray(candidate, dtype=float) - np.asarray(reference, dtype=float)
    return -diff if lower_is_better else diff


def is_binary(values: list[float]) -> bool:
    return all(v in (0.0, 1.0) for v in values)


def paired_test(
    metric: str,
    candidate: list[float],
    reference: list[float],
    margin: float,
    confidence: float,
    lower_is_better: bool = False,
) -> PairedTest:
    """Test "the candidate improves `metric` by more than `margin`" on paired per-example
    scores (the same examples in the same order). 0/1 scores: exact conditional bound on the
    discordant pairs; anything else: the seeded paired bootstrap."""
    if len(candidate) != len(reference) or not candidate:
        raise ValueError(f"{metric}: paired scores need the same non-empty examples on both "
                         f"sides ({len(candidate)} vs {len(reference)})")
    gains = improvement_of(candidate, reference, lower_is_better)
    binary = is_binary(candidate) and is_binary(reference)
    bounds = (_binary_bounds if binary else _bootstrap_bounds)(gains, margin, confidence)
    lower, upper, p_value = bounds
    wins, losses = int((gains > 0).sum()), int((gains < 0).sum())
    return PairedTest(
        metric=metric, kind="binary" if binary else "continuous", examples=len(gains),
        wins=wins, losses=losses, ties=len(gains) - wins - losses,
        estimate=float(gains.mean()), lower=lower, upper=upper, confidence=confidence,
        margin=margin, p_value=p_value,
        passed=lower >= margin and (lower > 0 if margin >= 0 else True),
    )


def _binary_bounds(gains: np.ndarray, margin: float, confidence: float
                   ) -> tuple[float, float, float]:
    """(lower, upper, p) for the mean of -1/0/+1 gains: with m discordant pairs of n, b wins
    among them is Binomial(m, pi) and the improvement is (m/n)(2 pi - 1); the exact
    (Clopper-Pearson) bounds of pi give its bounds, the exact binomial tail its p-value."""
    n = len(gains)
    wins, losses = int((gains > 0).sum()), int((gains < 0).sum())
    m = wins + losses
    if m == 0:  # every answer the same: no evidence either way, an improvement of exactly 0
        return 0.0, 0.0, 1.0
    alpha = 1.0 - confidence
    pi_low = 0.0 if wins == 0 else float(beta_distribution.ppf(alpha, wins, m - wins + 1))
    pi_high = 1.0 if wins == m else float(beta_distribution.ppf(1 - alpha, wins + 1, m - wins))
    share = m / n
    # p of "improvement <= margin": the pi at which (m/n)(2 pi - 1) = margin, and the chance of
    # b or more wins there (pi above 1: no m discordant pairs can reach the margin, p = 1).
    pi_null = (margin / share + 1.0) / 2.0
    if pi_null >= 1.0:
        p_value = 1.0
    elif pi_null <= 0.0:
        p_value = 0.0
    else:
        p_value = float(binom.sf(wins - 1, m, pi_null))
    return share * (2 * pi_low - 1), share * (2 * pi_high - 1), p_value


def _bootstrap_bounds(gains: np.ndarray, margin: float, confidence: float
                      ) -> tuple[float, float, float]:
    """(lower, upper, p) of the mean gain from BOOTSTRAP_RESAMPLES paired resamples (seeded:
    the same scores always give the same numbers); p by the shifted-bootstrap test."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    n = len(gains)
    means = np.empty(BOOTSTRAP_RESAMPLES)
    step = max(1, 2_000_000 // n)  # resample in blocks: memory stays ~16 MB for any n
    for start in range(0, BOOTSTRAP_RESAMPLES, step):
        stop = min(start + step, BOOTSTRAP_RESAMPLES)
        means[start:stop] = gains[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    alpha = 1.0 - confidence
    estimate = float(gains.mean())
    lower = float(np.quantile(means, alpha))
    upper = float(np.quantile(means, 1 - alpha))
    p_value = float((1 + np.sum(means - estimate >= estimate - margin))
                    / (BOOTSTRAP_RESAMPLES + 1))
    return lower, upper, p_value


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values (step-down, monotone): reject a claim when its adjusted p is at
    most 1 - confidence; the family's chance of any false claim stays within that."""
    order = sorted(p_values, key=p_values.get)
    adjusted, running = {}, 0.0
    for rank, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p_values[name]))
        adjusted[name] = running
    return adjusted


def detectable_improvement(
    examples: int, reference_score: float, margin: float, confidence: float,
    power: float = 0.8,
) -> float:
    """The smallest improvement of a 0/1 metric this many examples can show at `confidence`
    with probability `power`, at best: when the candidate only gains (turns reference misses
    into hits, breaks nothing), the least discordant case. Flips both ways (two seeds flip
    10-14 of 64 answers) need more. nan when even every miss turned into a hit is not enough."""
    misses = round(examples * (1.0 - reference_score))
    alpha = 1.0 - confidence
    needed = None  # the fewest wins (no losses) whose lower bound reaches the margin
    for wins in range(1, misses + 1):
        if (wins / examples) * (2 * alpha ** (1 / wins) - 1) >= max(margin, 1e-12):
            needed = wins
            break
    if needed is None:
        return math.nan
    # The improvement (share of examples gained) at which `needed` wins come with `power`.
    low, high = 0.0, misses / examples
    for _ in range(60):
        mid = (low + high) / 2
        if binom.sf(needed - 1, examples, mid) >= power:
            high = mid
        else:
            low = mid
    return high
