"""Reading and validating JSONL instruction data (`instruction`, `input`, `output`).

Validation reads every line and reports every problem at once, each with file:line, what was
found and what was expected; the validated records are written out as the exact input of
tokenization, so what was checked is what is trained on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

SPLITS = ("train", "validation", "test")
FIELDS = {"instruction": True, "input": False, "output": True}  # name -> must be non-empty
MAX_REPORTED = 20


class DataError(ValueError):
    """The dataset is unusable; the message lists each problem with file:line."""


class Example(BaseModel):
    instruction: str
    input: str
    output: str


class DataReport(BaseModel):
    """What validation found: counts per split and the hash of the bytes read."""

    sha256: str
    counts: dict[str, int]
    blank_lines: int


def read_jsonl(path: Path) -> Iterator[Example]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield Example.model_validate_json(line)


def validate_splits(files: dict[str, Path], out_dir: Path) -> DataReport:
    """Check every line of every split; write the examples as out_dir/<split>.jsonl."""
    problems: list[str] = []
    missing = [
        f"  - {split}: {path} does not exist"
        for split, path in files.items()
        if not Path(path).is_file()
    ]
    if missing:
        raise DataError(
            "data files are missing:\n"
            + "\n".join(missing)
            + "\nFix: set data.train / data.validation / data.test to existing JSONL files."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    counts: dict[str, int] = {}
    blank = 0
    for split, path in files.items():
        raw = Path(path).read_bytes()
        digest.update(split.encode() + b"\0" + hashlib.sha256(raw).digest())
        examples: list[Example] = []
        for number, line in enumerate(raw.removeprefix(b"\xef\xbb\xbf").splitlines(), start=1):
            if not line.strip():
                blank += 1
                continue
            example, problem = parse_line(line)
            if problem:
                problems.append(f"  - {path}:{number}: {problem}")
            else:
                examples.append(example)
        if not examples and not any(str(path) in p for p in problems):
            problems.append(f"  - {path}: no examples (the file is empty)")
        counts[split] = len(examples)
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(example.model_dump_json() + "\n" for example in examples)
    if problems:
        shown = problems[:MAX_REPORTED]
        more = len(problems) - len(shown)
        raise DataError(
            f"{len(problems)} problem(s) in the data:\n"
            + "\n".join(shown)
            + (f"\n  ... and {more} more" if more else "")
            + '\nEach line must be a JSON object like {"instruction": "...", "input": "...", '
            '"output": "..."} (input may be empty). Fix the lines above and run again.'
        )
    return DataReport(sha256=digest.hexdigest(), counts=counts, blank_lines=blank)


def parse_line(line: bytes) -> tuple[Example | None, str | None]:
    """One JSONL line -> (example, None), or (None, what is wrong with it)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 (byte {exc.start})"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"not JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, found {type(record).__name__}"
    for name, required in FIELDS.items():
        value = record.get(name, "" if not required else None)
        if value is None:
            return None, f"missing field {name!r}"
        if not isinstance(value, str):
            return None, f"field {name!r} must be a string, found {type(value).__name__}"
        if required and not value.strip():
            return None, f"field {name!r} is empty"
    return Example(**{name: record.get(name, "") for name in FIELDS}), None
