"""Scoring answers: each metric on answers a user would recognise as right, close or wrong."""

import json
import sys
from pathlib import Path

import pytest

from loraflow.config import ConfigError, EvalConfig, EvalSetConfig, load_config
from loraflow.evaluation.metrics import MetricError, Scorer, normalise, summarise

EXPECTED = '{"customer":{"name":"Ana Silva","email":"ana@x.test"},"order":{"quantity":4}}'


def scorer(**fields) -> Scorer:
    return Scorer(EvalSetConfig(name="t", **fields))


def test_key_order_and_spacing_do_not_break_an_exact_match_but_a_wrong_value_does():
    s = scorer()
    reordered = (
        '{"order": {"quantity": 4}, "customer": {"email": "ana@x.test", "name": "Ana Silva"}}'
    )
    assert s.score(reordered, EXPECTED)["exact_match"] == 1.0
    assert s.score(reordered.replace("4", "5"), EXPECTED)["exact_match"] == 0.0


def test_normalisation_is_configurable_and_applied_in_order():
    assert normalise("  Hello   World ", ["strip", "lower", "collapse_whitespace"]) == "hello world"
    assert scorer(normalize=["strip"]).score("ANA", "ana")["exact_match"] == 0.0
    assert scorer(normalize=["strip", "lower"]).score("ANA ", "ana")["exact_match"] == 1.0
    # without the json step, JSON compares as text
    assert scorer(normalize=["strip"]).score('{"a": 1}', '{"a":1}')["exact_match"] == 0.0


def test_json_validity_and_structure_check_keys_and_value_types():
    s = scorer()
    wrong_type = EXPECTED.replace("4", '"four"')
    missing_key = '{"customer":{"name":"Ana Silva"},"order":{"quantity":4}}'
    extra_key = EXPECTED[:-1] + ',"note":"hi"}'
    assert s.score(wrong_type, EXPECTED)["json_valid"] == 1.0
    assert s.score(wrong_type, EXPECTED)["json_structure"] == 0.0
    assert s.score(missing_key, EXPECTED)["json_structure"] == 0.0
    assert s.score(extra_key, EXPECTED)["json_structure"] == 1.0  # extra keys are allowed
    assert s.score("not json {", EXPECTED)["json_valid"] == 0.0
    assert s.score("not json {", EXPECTED)["json_structure"] == 0.0
    # structure does not apply when the expected output is plain text
    assert s.score("hello", "hello")["json_structure"] is None


def test_json_schema_checks_required_keys_types_and_formats(tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({
        "type": "object",
        "required": ["order"],
        "properties": {"order": {"type": "object", "required": ["quantity"],
                                 "properties": {"quantity": {"type": "integer", "minimum": 1}}}},
    }))
    s = scorer(json_schema=schema)
    assert s.score('{"order": {"quantity": 3}}', "")["json_schema"] == 1.0
    assert s.score('{"order": {"quantity": 0}}', "")["json_schema"] == 0.0
    assert s.score('{"order": {}}', "")["json_schema"] == 0.0
    assert s.score("no json", "")["json_schema"] == 0.0


def test_the_shipped_order_schema_accepts_every_expected_output():
    s = scorer(json_schema="data/orders/schema.json")
    for path in ("data/orders/test.jsonl", "data/orders/curated.jsonl"):
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            output = json.loads(line)["output"]
            assert s.score(output, output)["json_schema"] == 1.0, output


def test_a_broken_schema_file_names_the_set_and_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "objekt"}')
    with pytest.raises(MetricError, match=r"eval.sets\[t\].json_schema = .*bad.json.*not a valid"):
        scorer(json_schema=bad)
    with pytest.raises(MetricError, match="does not exist"):
        scorer(json_schema=tmp_path / "missing.json")


def test_fuzzy_match_grades_near_misses_and_reports_the_distribution():
    s = scorer()
    exact = s.score(EXPECTED, EXPECTED)["fuzzy"]
    close = s.score(EXPECTED.replace("Ana Silva", "Ana Silvia"), EXPECTED)["fuzzy"]
    far = s.score("I cannot help with that.", EXPECTED)["fuzzy"]
    assert exact == 1.0 and 0.9 < close < 1.0 and far < 0.3
    summary = summarise([{"fuzzy": v} for v in (0.0, 0.5, 1.0, 1.0, 1.0)])
    assert summary["fuzzy"] == pytest.approx(0.7)
    assert summary["fuzzy_p10"] == pytest.approx(0.2) and summary["fuzzy_p50"] == 1.0


def test_regex_and_keywords_from_the_set_and_from_the_example():
    s = scorer(regex=r"^\{.*\}$", keywords=["Ana", "ana@x.test"])
    scores = s.score(EXPECTED, EXPECTED, keywords=("quantity",), regex=r"\d")
    assert scores["regex"] == 1.0 and scores["keywords"] == 1.0
    partial = s.score('{"name": "Ana"}', EXPECTED, keywords=("quantity",))
    assert partial["keywords"] == pytest.approx(1 / 3)
    assert s.score("Ana: ana@x.test", EXPECTED)["regex"] == 0.0


def test_a_metric_that_does_not_apply_is_left_out_of_the_mean():
    summary = summarise([{"json_structure": 1.0}, {"json_structure": None}, {"json_structure": 0}])
    assert summary == {"json_structure": 0.5}


def test_a_user_metric_is_a_plain_function_named_in_config(tmp_path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text(
        "def has_sku(answer, expected):\n    return 'sku' in answer\n"
        "def bad(answer, expected):\n    return 'yes'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    s = scorer(custom=["my_metrics:has_sku"])
    assert s.score('{"sku": "A"}', "")["has_sku"] == 1.0
    assert s.score("{}", "")["has_sku"] == 0.0
    with pytest.raises(MetricError, match="'bad' returned 'yes'"):
        scorer(custom=["my_metrics:bad"]).score("x", "y")
    with pytest.raises(MetricError, match="has no function 'nope'"):
        scorer(custom=["my_metrics:nope"])
    with pytest.raises(MetricError, match="cannot import module 'no_such_module_x'"):
        scorer(custom=["no_such_module_x:f"])
    sys.modules.pop("my_metrics", None)


def test_eval_config_errors_name_the_field_and_the_fix():
    with pytest.raises(ConfigError) as err:
        load_config(None, [
            "eval.sets=[{name: test, regex: '(', custom: [nocolon]}, {name: test}]",
        ])
    message = str(err.value)
    assert "eval.sets.0.regex" in message and "not a valid regular expression" in message
    assert "eval.sets.0.custom" in message and "'module:function'" in message
    with pytest.raises(ConfigError, match="repeated: test"):
        load_config(None, ["eval.sets=[{name: test}, {name: test}]"])
    with pytest.raises(ConfigError, match="thresholds key 'test.bleu' names no metric"):
        load_config(None, ["eval.thresholds={test.bleu: 0.5}"])
    cfg = load_config(None, ["eval.thresholds={json_valid: 0.9, test.perplexity: 20}"])
    assert cfg.eval.thresholds == {"json_valid": 0.9, "test.perplexity": 20}


def test_the_curated_config_ships_valid_and_evaluates_three_sets():
    cfg = load_config("configs/curated.yaml")
    assert [s.name for s in cfg.eval.sets] == ["test", "curated", "keep"]
    assert isinstance(cfg.eval, EvalConfig) and cfg.eval.thresholds["json_valid"] == 0.9
