"""Instruction records: the shapes a line may take, the Example every stage reads, the
errors that name file:line, the split names. Imports nothing of loraflow, so a served model
can ship it.

Records come in three shapes, columns renamed through DataConfig.columns:
  {"instruction", "input"?, "output"}     the guide's
  {"messages": [{"role", "content"}...]}  chat; the last message is the assistant's answer
  {"prompt", "completion"}
Preference records (pairs, KTO) are loraflow.data.preference's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

SPLITS = ("train", "validation", "test")
ROLES = ("system", "user", "assistant")

RecordT = TypeVar("RecordT", bound=BaseModel)


class DataError(ValueError):
    """The dataset is unusable; the message lists each problem with file:line."""


class Example(BaseModel):
    """One cleaned example. `messages` holds the turns before the final user turn (chat data)."""

    instruction: str
    input: str = ""
    output: str
    messages: list[dict[str, str]] | None = None


class Rejected(Exception):
    """A line that fails a check: `reason` is its quarantine reason, `detail` says what."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _field(record: dict[str, Any], name: str, columns: dict[str, str]) -> Any:
    return record.get(columns.get(name, name))


def string_field(
    record: dict[str, Any], name: str, columns: dict[str, str], required: bool
) -> str:
    """The string under `name` (or the column the user maps it from); "" when absent and not
    required; Rejected (missing_field, wrong_type) otherwise."""
    key = columns.get(name, name)
    value = record.get(key)
    if value is None:
        if required:
            raise Rejected("missing_field", f"missing field {key!r}")
        return ""
    if not isinstance(value, str):
        raise Rejected("wrong_type", f"field {key!r} must be a string, found {json_type(value)}")
    return value


def json_type(value: Any) -> str:
    """What a decoded JSON value is, as an error message says it: "an object", "a list"..."""
    return {dict: "an object", list: "a list", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def to_example(record: Any, columns: dict[str, str]) -> Example:
    """A parsed JSON value -> Example, or raise Rejected saying what is wrong."""
    if not isinstance(record, dict):
        raise Rejected("not_object", f"expected a JSON object, found {json_type(record)}")
    if "chosen" in record or "rejected" in record or (
        "label" in record and _field(record, "completion", columns) is not None
    ):
        kind = "a preference pair" if "chosen" in record or "rejected" in record else (
            "a KTO record (prompt, completion, label)")
        raise Rejected(
            "preference_record",
            f"{kind}, not an SFT example. Fix: give this file as align.train / "
            "align.validation / align.test (the preference stage), not as data.train",
        )
    messages = _field(record, "messages", columns)
    if messages is not None:
        return _from_messages(messages, columns.get("messages", "messages"))
    if any(_field(record, name, columns) is not None for name in ("prompt", "completion")):
        return Example(
            instruction=string_field(record, "prompt", columns, True),
            output=string_field(record, "completion", columns, True),
        )
    if any(_field(record, name, columns) is not None for name in ("instruction", "output")):
        return Example(
            instruction=string_field(record, "instruction", columns, True),
            input=string_field(record, "input", columns, False),
            output=string_field(record, "output", columns, True),
        )
    keys = ", ".join(repr(k) for k in list(record)[:8]) or "none"
    raise Rejected(
        "unknown_shape",
        f"no instruction/output, messages or prompt/completion field (keys: {keys}); "
        "map your column names with data.columns",
    )


def checked_messages(messages: Any, key: str) -> list[dict[str, Any]]:
    """`messages` (the field `key`) if it is a non-empty list of {"role", "content"} objects
    with a known role and a string content; raise Rejected."""
    if not isinstance(messages, list) or not messages:
        raise Rejected("wrong_type", f"field {key!r} must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("content"), str)):
            raise Rejected("wrong_type", f"{key}[{i}] must be an object with a string 'content'")
        if m.get("role") not in ROLES:
            raise Rejected("wrong_type", f"{key}[{i}].role must be one of {ROLES}")
    return messages


def _from_messages(value: Any, key: str) -> Example:
    messages = checked_messages(value, key)
    if messages[-1]["role"] != "assistant":
        raise Rejected("missing_field", f"the last of {key!r} must be the assistant's answer")
    if len(messages) < 2 or messages[-2]["role"] != "user":
        raise Rejected("missing_field", f"the answer in {key!r} must follow a user message")
    history = [{"role": m["role"], "content": m["content"]} for m in messages[:-2]]
    return Example(
        instruction=messages[-2]["content"],
        output=messages[-1]["content"],
        messages=history or None,
    )


def read_jsonl(path: Path) -> Iterator[Example]:
    """The cleaned examples validation wrote."""
    with open(path, "rb") as f:
        for line in f:
            yield Example.model_validate_json(line)


def read_records(path: Path, model: type[RecordT], what: str, shape: str, fix: str = "") -> list[
    RecordT
]:
    """Every non-blank line of a small JSONL file (a test set, a prompt file) as `model`; all
    bad lines are reported at once with file:line, then what a line must look like."""
    if not Path(path).is_file():
        raise DataError(f"{what} {path} does not exist.{' Fix: ' + fix if fix else ''}")
    records, problems = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(model.model_validate_json(line))
            except ValidationError as exc:
                where = "; ".join(
                    f"{'.'.join(map(str, e['loc'])) or 'line'}: {e['msg']}" for e in exc.errors()
                )
                problems.append(f"  - {path}:{number}: {where}")
    if problems:
        raise DataError(
            f"{len(problems)} bad line(s) in the {what}:\n" + "\n".join(problems[:20])
            + f"\nEach line must be {shape}."
        )
    return records
