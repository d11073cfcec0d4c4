"""The promotion decision on paired evaluations: what must promote, what must not."""

import html

from loraflow.config import EvalConfig, EvalSetConfig, RegistryConfig
from loraflow.evaluation.evaluate import EvalResult
from loraflow.evaluation.gate import decide, detectable_note, example_id, guard_names

N = 64


def result(label: str, right: set[int], valid: set[int] | None = None,
           curated_right: set[int] | None = None) -> EvalResult:
    """An evaluation of N examples: exact_match 1 on `right`, json_valid 1 on `valid`."""
    valid = set(range(N)) if valid is None else valid
    rows = [{"instruction": "Extract the order.", "input": f"order {i}", "expected": f"{{{i}}}",
             "answer": f"{{{i}}}" if i in right else "nope",
             "scores": {"exact_match": float(i in right), "json_valid": float(i in valid),
                        "fuzzy": 1.0 if i in right else 0.4}} for i in range(N)]
    sets = {"test": {"exact_match": len(right) / N, "json_valid": len(valid) / N}}
    examples = {"test": rows}
    if curated_right is not None:
        examples["curated"] = [dict(r, scores={"exact_match": float(i in curated_right)})
                               for i, r in enumerate(rows)]
        sets["curated"] = {"exact_match": len(curated_right) / N}
    return EvalResult(label=label, metrics=sets["test"], sets=sets, examples=examples)


REGISTRY, EVAL = RegistryConfig(), EvalConfig()


def test_the_same_model_at_another_batch_size_is_not_promoted():
    """bf16 batch layouts flip a few near-ties both ways: +1 answer is no evidence."""
    reference = result("champion", set(range(40)))
    candidate = result("tuned", set(range(38)) | {45, 50, 51})
    decision = decide(candidate, reference, "champion v1", REGISTRY, EVAL)
    assert not decision.promote and decision.primary.wins == 3 and decision.primary.losses == 2
    assert "not promoted (the improvement is not shown at this confidence; 64 examples show " \
        "0.1" in decision.verdict
    assert "a gain of +0.016 needs a larger test split" in decision.verdict
    assert "p = " in decision.verdict and "lower bound" in decision.verdict
    assert [f.input for f in decision.lost] == ["order 38", "order 39"]


def test_a_planted_real_improvement_is_promoted():
    reference = result("base", set(range(20)))
    candidate = result("tuned", set(range(44)) - {3})
    decision = decide(candidate, reference, "base model", REGISTRY, EVAL)
    assert decision.promote and decision.verdict.startswith("promoted: test.exact_match +0.359")
    assert decision.primary.lower > REGISTRY.min_improvement and decision.failed_guards == []
    assert len(decision.won) == 20 and len(decision.lost) == 1  # FLIPS_SHOWN caps the list
    assert 0 < decision.detectable < 0.2


def test_a_failed_guard_blocks_and_is_named():
    """Exact match up a lot, JSON validity down by a quarter of the answers: not promoted."""
    reference = result("champion", set(range(20)))
    candidate = result("tuned", set(range(50)), valid=set(range(48)))
    decision = decide(candidate, reference, "champion v2", REGISTRY, EVAL)
    assert decision.primary.passed and not decision.promote
    assert decision.failed_guards == ["test.json_valid"]
    assert "guard(s) test.json_valid may have regressed" in decision.verdict


def test_an_extra_test_set_is_a_guard_by_default():
    evaluation = EVAL.model_copy(update={"sets": [EvalSetConfig(name="test"), EvalSetConfig(
        name="curated", path="curated.jsonl", metrics=["exact_match"])]})
    assert guard_names(REGISTRY, evaluation) == ["test.json_valid", "curated.exact_match"]
    reference = result("base", set(range(20)), curated_right=set(range(40)))
    forgot = result("tuned", set(range(50)), curated_right=set(range(10)))
    decision = decide(forgot, reference, "base model", REGISTRY, evaluation)
    assert not decision.promote and decision.failed_guards == ["curated.exact_match"]


def test_no_paired_reference_is_no_promotion_and_examples_pair_by_content():
    decision = decide(result("tuned", set(range(60))), None, "champion v4", REGISTRY, EVAL)
    assert not decision.promote and "eval.compare_champion=true" in decision.verdict
    row = {"instruction": "a", "input": "b", "expected": "c"}
    assert example_id(row) == example_id(dict(row, answer="x")) != example_id(dict(row, input="d"))
    assert example_id(dict(row, id=7)) == "7"


def test_the_report_opens_with_the_decision_its_interval_and_the_flips(tmp_path):
    from loraflow.evaluation.report import build_report

    reference = result("base", set(range(20)))
    candidate = result("tuned", set(range(50)), valid=set(range(48)))
    decision = decide(candidate, reference, "base model", REGISTRY, EVAL)
    page = build_report({"base": reference, "tuned": candidate}, {}, tmp_path,
                        decision=decision).read_text()
    assert page.index("Decision: keep") < page.index("<h2>Metrics</h2>")
    assert decision.verdict in html.unescape(page) and "<td>FAILED</td>" in page
    assert "Examples won against base model" in page and "order 20" in page
    assert (tmp_path / "decision.png").stat().st_size > 1000


def test_the_shipped_keep_set_guards_against_forgetting_in_the_curated_config():
    from pathlib import Path

    from loraflow.config import load_config
    from loraflow.evaluation.evaluate import load_sets

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "curated.yaml")
    sets = {s.cfg.name: s for s in load_sets(cfg.eval, root / "data/orders/test.jsonl")}
    keep = sets["keep"].examples
    assert len(keep) == 16 and all(e.output for e in keep)  # the base model's answers
    assert "keep.exact_match" in guard_names(cfg.registry, cfg.eval)


def test_the_detectable_note_says_plainly_when_a_test_split_is_too_small():
    registry = RegistryConfig()
    small = detectable_note(4, registry)
    assert "cannot show any improvement" in small and "nan" not in small
    shipped = detectable_note(64, registry)
    assert "can show an improvement in exact_match of 0." in shipped
