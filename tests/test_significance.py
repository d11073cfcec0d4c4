"""The gate's paired tests on numbers worked out by hand or by an independent method."""

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from loraflow.evaluation.significance import (
    detectable_improvement,
    holm,
    paired_test,
)


def pairs(wins: int, losses: int, ties_right: int, ties_wrong: int) -> tuple[list, list]:
    candidate = [1.0] * wins + [0.0] * losses + [1.0] * ties_right + [0.0] * ties_wrong
    reference = [0.0] * wins + [1.0] * losses + [1.0] * ties_right + [0.0] * ties_wrong
    return candidate, reference


def test_ten_wins_four_losses_of_64_is_no_evidence_at_95_percent():
    """The seed-11 retraining of the issue: +6 answers (10 won, 4 lost) was promoted by the old
    gate; exact one-sided McNemar p = 0.09."""
    candidate, reference = pairs(10, 4, 33, 17)
    test = paired_test("exact_match", candidate, reference, margin=0.01, confidence=0.95)
    assert (test.wins, test.losses, test.ties, test.examples) == (10, 4, 50, 64)
    assert test.estimate == pytest.approx(6 / 64)
    exact = binomtest(10, 14, 0.5, alternative="greater").pvalue  # margin 0's p, for scale
    assert exact == pytest.approx(0.0898, abs=1e-4)
    assert test.p_value > exact  # the margin makes the claim stronger, so harder to show
    assert test.lower < 0.01 < test.estimate < test.upper and not test.passed
    at_zero = paired_test("exact_match", candidate, reference, margin=0.0, confidence=0.95)
    assert at_zero.p_value == pytest.approx(exact) and not at_zero.passed


def test_a_clear_paired_improvement_passes_and_its_bound_is_exact():
    candidate, reference = pairs(20, 1, 30, 13)
    test = paired_test("exact_match", candidate, reference, margin=0.01, confidence=0.95)
    assert test.passed and test.p_value < 0.05
    # the bound inverts the test: at a margin just above the lower bound p crosses 0.05
    edge = paired_test("exact_match", candidate, reference, margin=test.lower + 1e-6,
                       confidence=0.95)
    below = paired_test("exact_match", candidate, reference, margin=test.lower - 1e-3,
                        confidence=0.95)
    assert below.p_value <= 0.05 < edge.p_value + 1e-9


def test_identical_answers_are_never_an_improvement():
    candidate, reference = pairs(0, 0, 40, 24)
    test = paired_test("exact_match", candidate, reference, margin=0.0, confidence=0.95)
    assert (test.estimate, test.lower, test.upper, test.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert not test.passed


def test_a_guard_is_a_non_inferiority_claim_with_a_negative_margin():
    candidate, reference = pairs(1, 2, 57, 4)  # one answer worse on balance, of 64
    guard = paired_test("json_valid", candidate, reference, margin=-0.05, confidence=0.95)
    assert guard.estimate < 0 and guard.passed  # not worse by 5 points, with confidence
    fell = pairs(0, 12, 50, 2)
    assert not paired_test("json_valid", *fell, margin=-0.05, confidence=0.95).passed


def test_loss_is_an_improvement_when_it_falls_and_the_bootstrap_is_seeded():
    rng = np.random.default_rng(1)
    reference = list(rng.normal(1.0, 0.3, 200))
    better = [r - 0.1 + e for r, e in zip(reference, rng.normal(0, 0.05, 200), strict=True)]
    first = paired_test("loss", better, reference, margin=0.0, confidence=0.95,
                        lower_is_better=True)
    again = paired_test("loss", better, reference, margin=0.0, confidence=0.95,
                        lower_is_better=True)
    assert first == again and first.kind == "continuous"
    assert first.passed and first.lower == pytest.approx(0.1, abs=0.02)
    same = paired_test("loss", reference, reference, margin=0.0, confidence=0.95,
                       lower_is_better=True)
    assert not same.passed
    noise = [r + e for r, e in zip(reference, rng.normal(0, 0.05, 200), strict=True)]
    assert not paired_test("loss", noise, reference, margin=0.01, confidence=0.95,
                           lower_is_better=True).passed


def test_holm_adjusts_step_down_and_stays_monotone():
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adjusted == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})


def test_64_prompts_cannot_show_a_one_point_improvement():
    """The shipped test split: even an improvement with no losses must be ~13 points for a
    95% gate to see it 4 times in 5; 1,000 prompts see ~1.5 points."""
    small = detectable_improvement(64, reference_score=0.672, margin=0.01, confidence=0.95)
    large = detectable_improvement(1000, reference_score=0.672, margin=0.01, confidence=0.95)
    assert 0.08 < small < 0.2 and large < small / 4
    assert math.isnan(detectable_improvement(64, reference_score=1.0, margin=0.01,
                                             confidence=0.95))
