"""Scoring one answer against its expected output, and summing scores over a test set.

Every per-example score is a number in 0..1 (a check is 1.0 or 0.0), or None where the metric
does not apply to that example (json_structure when the expected output is not JSON); a set's
metric is the mean over the examples it applies to.
"""

from __future__ import annotations

import difflib
import importlib
import json
import math
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema

from loraflow.config import EvalSetConfig, Normalisation

UserMetric = Callable[[str, str], Any]


class MetricError(ValueError):
    """A configured metric cannot be used: its schema, pattern or function is broken."""


def parse_json(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(text)
    except json.JSONDecodeError:
        return False, None


def normalise(text: str, steps: list[Normalisation]) -> str:
    for step in steps:
        if step == "strip":
            text = text.strip()
        elif step == "lower":
            text = text.lower()
        elif step == "collapse_whitespace":
            text = " ".join(text.split())
        elif step == "json":
            valid, value = parse_json(text)
            if valid:  # key order and spacing stop mattering; text that is not JSON stays
                text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text


def same_structure(answer: Any, expected: Any) -> bool:
    """Every key of `expected` is in `answer`, recursively, with a value of the same JSON type."""
    if isinstance(expected, dict):
        return isinstance(answer, dict) and all(
            key in answer and same_structure(answer[key], value) for key, value in expected.items()
        )
    if isinstance(expected, list):
        return isinstance(answer, list) and (
            not expected or all(same_structure(item, expected[0]) for item in answer)
        )
    if isinstance(expected, bool) or isinstance(answer, bool):
        return isinstance(answer, bool) and isinstance(expected, bool)
    if isinstance(expected, int | float):
        return isinstance(answer, int | float)
    return type(answer) is type(expected)


class Scorer:
    """The metrics of one test set, ready to score answers (schema read, functions imported)."""

    def __init__(self, cfg: EvalSetConfig) -> None:
        self.cfg = cfg
        self.validator: jsonschema.protocols.Validator | None = None
        if cfg.json_schema is not None:
            self.validator = load_schema(cfg.json_schema, cfg.name)
        self.custom = {spec.partition(":")[2]: load_user_metric(spec) for spec in cfg.custom}

    def score(
        self,
        answer: str,
        expected: str,
        keywords: tuple[str, ...] = (),
        regex: str | None = None,
    ) -> dict[str, float | None]:
        """Per-example scores; `keywords` and `regex` come from the example's own line."""
        cfg, scores = self.cfg, {}
        valid, value = parse_json(answer.strip())
        expected_valid, expected_value = parse_json(expected.strip())
        if "json_valid" in cfg.metrics:
            scores["json_valid"] = float(valid)
        if "json_structure" in cfg.metrics:
            scores["json_structure"] = (
                float(valid and same_structure(value, expected_value)) if expected_valid else None
            )
        norm_answer, norm_expected = normalise(answer, cfg.normalize), normalise(
            expected, cfg.normalize
        )
        if "exact_match" in cfg.metrics:
            scores["exact_match"] = float(norm_answer == norm_expected)
        if "fuzzy" in cfg.metrics:
            scores["fuzzy"] = difflib.SequenceMatcher(None, norm_answer, norm_expected).ratio()
        if self.validator is not None:
            scores["json_schema"] = float(valid and self.validator.is_valid(value))
        patterns = [p for p in (cfg.regex, regex) if p]
        if patterns:
            scores["regex"] = float(all(re.search(p, answer) for p in patterns))
        words = [*cfg.keywords, *keywords]
        if words:
            scores["keywords"] = sum(w in answer for w in words) / len(words)
        for name, function in self.custom.items():
            scores[name] = call_user_metric(name, function, answer, expected)
        return scores


def load_schema(path: Path, set_name: str) -> jsonschema.protocols.Validator:
    where = f"eval.sets[{set_name}].json_schema = {path}"
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MetricError(f"{where}: the file does not exist. Fix: point it at a JSON Schema "
                          "file, or remove it") from None
    except json.JSONDecodeError as exc:
        raise MetricError(f"{where}: not JSON ({exc.msg} at line {exc.lineno})") from None
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise MetricError(f"{where}: not a valid JSON Schema: {exc.message}") from None
    return cls(schema)


def load_user_metric(spec: str) -> UserMetric:
    """Import 'module:function'; the error says which part is missing."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise MetricError(
            f"eval.sets[].custom {spec!r}: cannot import module {module_name!r} ({exc}). "
            "Fix: put the module on PYTHONPATH or correct the name."
        ) from None
    function = getattr(module, name, None)
    if not callable(function):
        raise MetricError(
            f"eval.sets[].custom {spec!r}: module {module_name!r} has no function {name!r}"
        )
    return function


def call_user_metric(name: str, function: UserMetric, answer: str, expected: str) -> float:
    value = function(answer, expected)
    if isinstance(value, bool | int | float) and math.isfinite(float(value)):
        return float(value)
    raise MetricError(
        f"custom metric {name!r} returned {value!r}; it must return a bool or a finite number"
    )


def summarise(rows: list[dict[str, float | None]]) -> dict[str, float]:
    """Mean of each metric over the examples it applies to; fuzzy also gets p10/p50/p90."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    out: dict[str, float] = {}
    for name in names:
        values = [row[name] for row in rows if row.get(name) is not None]
        if not values:
            continue
        out[name] = sum(values) / len(values)
        if name == "fuzzy":
            ordered = sorted(values)
            for q in (10, 50, 90):
                out[f"fuzzy_p{q}"] = quantile(ordered, q / 100)
    return out


def quantile(ordered: list[float], q: float) -> float:
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[round(q * 100) - 1]
