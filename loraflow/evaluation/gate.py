"""The promotion decision from two evaluations of the same prompts in the same run: the
candidate against the reference (the champion, else the base model), example by example.

Promote only when the gate metric's one-sided lower confidence bound of the improvement reaches
registry.min_improvement, every guard is shown not worse than the reference beyond its
tolerance (a non-inferiority test at the same confidence), and eval.thresholds are met. The
tests are in loraflow.evaluation.significance; why no multiplicity adjustment is needed for the
gate and its guards is said there.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from pydantic import BaseModel

from loraflow.artifacts import ExportCheck
from loraflow.config import LOWER_IS_BETTER, EvalConfig, RegistryConfig
from loraflow.evaluation.evaluate import EvalResult
from loraflow.evaluation.significance import PairedTest, detectable_improvement, paired_test

FLIPS_SHOWN = 20  # examples listed each way in the decision (all are in the evaluations)


class Flip(BaseModel):
    """One example the two models answered differently on the gate metric."""

    id: str
    input: str
    expected: str
    candidate: str
    reference: str


class GateDecision(BaseModel):
    promote: bool
    verdict: str  # the decision in words, for the summary, the run and the version's tags
    metric: str
    set_name: str
    reference_name: str  # "champion v3", "base model", "SFT model v2"
    reference_version: str | None = None  # the champion's version it was decided against
    primary: PairedTest | None  # None when there was nothing to pair (the reason says why)
    guards: list[PairedTest] = []
    failed_guards: list[str] = []
    won: list[Flip] = []  # the candidate right (better) where the reference was not
    lost: list[Flip] = []
    detectable: float | None = None  # the smallest improvement this set can show (0/1 metrics)
    exports: list[ExportCheck] = []  # each export's agreement with the evaluated model
    failed_exports: list[str] = []  # formats (or format/runtime) below export.min_agreement


def example_id(row: dict[str, Any]) -> str:
    """An example's identity: its own `id` when the data gives one, else the hash of its
    prompt and expected answer (the same example in two evaluations has the same id)."""
    if row.get("id") is not None:
        return str(row["id"])
    key = json.dumps([row["instruction"], row["input"], row["expected"]], ensure_ascii=False)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def paired_rows(candidate: EvalResult, reference: EvalResult, set_name: str
                ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The rows of `set_name` both evaluations answered, paired by example id, in the
    candidate's order; an example only one side has is left out (and counted by the caller)."""
    theirs = {example_id(r): r for r in reference.examples.get(set_name, [])}
    return [(row, theirs[example_id(row)]) for row in candidate.examples.get(set_name, [])
            if example_id(row) in theirs]


def score_of(row: dict[str, Any], metric: str) -> float:
    # perplexity is not per example: its paired test is the loss's, which orders the same way
    return float(row["scores"]["loss" if metric == "perplexity" else metric])


def compare(candidate: EvalResult, reference: EvalResult, set_name: str, metric: str,
            margin: float, confidence: float) -> tuple[PairedTest, list[tuple[dict, dict]]]:
    rows = paired_rows(candidate, reference, set_name)
    if not rows or metric not in ("perplexity", *rows[0][0]["scores"]):
        raise KeyError(f"{set_name}.{metric}")
    test = paired_test(f"{set_name}.{metric}", [score_of(c, metric) for c, _ in rows],
                       [score_of(r, metric) for _, r in rows], margin, confidence,
                       lower_is_better=metric in LOWER_IS_BETTER)
    return test, rows


def guard_names(registry: RegistryConfig, evaluation: EvalConfig) -> list[str]:
    """registry.guards as set.metric names: a bare metric is the primary set's; a bare set
    name is that set's gate metric (or its first metric when it does not report it)."""
    sets = {s.name: s.metric_names() for s in evaluation.sets}
    primary = evaluation.sets[0].name
    names = []
    for guard in registry.guards:
        if guard in sets and guard != primary:
            metric = registry.gate_metric if registry.gate_metric in sets[guard] else sets[guard][0]
            names.append(f"{guard}.{metric}")
        elif guard == "extra_sets":
            names += guard_names(registry.model_copy(update={"guards": [
                s for s in sets if s != primary]}), evaluation)
        else:
            set_name, _, metric = guard.rpartition(".")
            names.append(f"{set_name or primary}.{metric}")
    return list(dict.fromkeys(names))


def decide(
    candidate: EvalResult,
    reference: EvalResult | None,
    reference_name: str,
    registry: RegistryConfig,
    evaluation: EvalConfig,
    metric: str | None = None,
    margin: float | None = None,
    set_name: str | None = None,
    reference_version: str | None = None,
) -> GateDecision:
    """The promotion decision against `reference` (champion `reference_version`, or None for
    the base or SFT model); the align stage passes its own metric, margin and, for held-out
    preference metrics, the set of pairs."""
    metric = metric or registry.gate_metric
    margin = registry.min_improvement if margin is None else margin
    set_name = set_name or evaluation.sets[0].name
    base = {"metric": metric, "set_name": set_name, "reference_name": reference_name,
            "reference_version": reference_version}
    if reference is None:
        return GateDecision(promote=False, primary=None, verdict=(
            f"not promoted: {reference_name} did not answer the test prompts in this run, so "
            "there is nothing to pair the candidate's answers with. Fix: "
            "eval.compare_champion=true"), **base)
    primary, rows = compare(candidate, reference, set_name, metric, margin, registry.confidence)
    guards, failed = [], []
    for name in guard_names(registry, evaluation):
        guard_set, _, guard_metric = name.rpartition(".")
        try:
            test, _ = compare(candidate, reference, guard_set, guard_metric,
                              -registry.guard_tolerance, registry.confidence)
        except KeyError:
            continue  # a guard the sets do not report (e.g. json_valid on a set without it)
        guards.append(test)
        if not test.passed:
            failed.append(name)
    met = candidate.metrics.get("thresholds_met", 1.0) >= 1.0
    promote = primary.passed and not failed and met
    won, lost = flips(rows, metric)
    detectable = None
    if primary.kind == "binary":
        detectable = detectable_improvement(
            primary.examples, reference.sets[set_name][metric], margin, registry.confidence)
    return GateDecision(
        promote=promote, primary=primary, guards=guards, failed_guards=failed,
        won=won[:FLIPS_SHOWN], lost=lost[:FLIPS_SHOWN], detectable=detectable,
        verdict=verdict(primary, reference_name, failed, met, promote, detectable), **base)


def with_exports(decision: GateDecision, checks: list[ExportCheck]) -> GateDecision:
    """The decision once the exports are checked: what ships must be what was measured, so an
    export that answers unlike the evaluated model blocks promotion and is named."""
    failed = [c for c in checks if not c.passed]
    if not failed:
        return decision.model_copy(update={"exports": checks})
    named = "; ".join(
        f"export {c.name} answered {round(c.agreement * c.answers)} of {c.answers} test "
        f"prompts as the evaluated model did ({c.runtime}): agreement {c.agreement:.3f} < "
        f"export.min_agreement {c.min_agreement}" for c in failed)
    verdict = (f"not promoted ({named}): {decision.verdict.removeprefix('promoted: ')}"
               if decision.promote else f"{decision.verdict}; and {named}")
    return decision.model_copy(update={"promote": False, "exports": checks, "verdict": verdict,
                                       "failed_exports": [c.name for c in failed]})


def flips(rows: list[tuple[dict, dict]], metric: str) -> tuple[list[Flip], list[Flip]]:
    won, lost = [], []
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    for c, r in rows:
        gain = sign * (score_of(c, metric) - score_of(r, metric))
        if gain:
            flip = Flip(id=example_id(c), input=c["input"] or c["instruction"],
                        expected=c["expected"], candidate=c["answer"], reference=r["answer"])
            (won if gain > 0 else lost).append(flip)
    return won, lost


def detectable_note(examples: int, registry: RegistryConfig) -> str:
    """Before training: the smallest improvement of a 0/1 gate metric `examples` test prompts
    can show, and whether registry.min_improvement is below it."""
    if registry.gate_metric not in ("exact_match", "json_valid", "json_structure"):
        return (f"{registry.gate_metric} is continuous: what its {examples} test examples can "
                "show depends on the spread of the paired differences (the gate's interval "
                "says it after evaluation)")
    best = detectable_improvement(examples, 0.0, registry.min_improvement, registry.confidence)
    if math.isnan(best):
        return (f"the {examples} test examples cannot show any improvement in "
                f"{registry.gate_metric} at {registry.confidence:.0%} confidence, even with "
                "every answer gained: no model trained on this data will be promoted; a larger "
                "test split is needed")
    note = (f"the {examples} test examples can show an improvement in {registry.gate_metric} of "
            f"{best:.3f} or more at {registry.confidence:.0%} confidence (4 times in 5, at best: "
            "no answer lost)")
    if best > registry.min_improvement:
        note += (f"; smaller true improvements (registry.min_improvement is "
                 f"{registry.min_improvement}) will mostly not be promoted: a larger test split "
                 "sees smaller ones")
    return note


def verdict(primary: PairedTest, reference_name: str, failed: list[str], met: bool,
            promote: bool, detectable: float | None = None) -> str:
    """The decision in one sentence a person can check against the numbers; when the
    improvement is not shown, whether this test split could have shown it at all."""
    level = f"{primary.confidence:.0%}"
    evidence = (
        f"{primary.metric} {primary.estimate:+.3f} against {reference_name} on "
        f"{primary.examples} paired examples ({primary.wins} won, {primary.losses} lost, "
        f"{primary.ties} tied); {level} lower bound {primary.lower:+.3f} "
        f"{'>=' if primary.lower >= primary.margin else '<'} the margin {primary.margin:.3f}, "
        f"p = {primary.p_value:.3g}"
    )
    if promote:
        return f"promoted: {evidence}"
    why = []
    if not primary.passed:
        why.append("the improvement is not shown at this confidence")
        # (detectable is None for a continuous metric: its interval says it)
        if detectable is not None and math.isnan(detectable):
            why.append(f"no improvement is detectable on {primary.examples} examples: a larger "
                       "test split is needed")
        elif detectable is not None and 0 < primary.estimate < detectable:
            why.append(f"{primary.examples} examples show {detectable:.3f} or more at best; a "
                       f"gain of {primary.estimate:+.3f} needs a larger test split")
    if failed:
        why.append(f"guard(s) {', '.join(failed)} may have regressed")
    if not met:
        why.append("eval.thresholds are missed")
    return f"not promoted ({'; '.join(why)}): {evidence}"
