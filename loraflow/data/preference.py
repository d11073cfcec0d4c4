"""Preference records: the two record kinds (PAIRS, KTO) the one validator
(loraflow.data.validation.validate_splits) checks and cleans line by line like SFT data, and
their tokenizing to Parquet for the engine's dpo/orpo/kto objectives.

Two kinds, the fields renamed through DataConfig.columns like SFT data:
  pairs (dpo, orpo):
    {"prompt" | "instruction" + "input"?, "chosen", "rejected"}
    {"messages": [... ending with the user's turn], "chosen", "rejected"}
    chosen/rejected: a string, or [{"role": "assistant", "content": "..."}]
  kto:
    {"prompt" | "instruction" + "input"? | "messages", "completion", "label": true | false}

Every line is accounted for (blank, kept, cleaned, or quarantined with a reason); besides the
SFT reasons: empty_side (an answer empty after cleaning), chosen_equals_rejected (the same
text after cleaning: nothing to learn; case counts, it can be the very mistake),
label_not_boolean, and sft_record (an SFT example in preference data: the file was given in
the wrong place, so the run stops, naming the file, the line and the fix). data.clean's
min_output_tokens and instruction_like_input are SFT checks, and dedup=minhash deduplicates
preference records as near does.

The prompt is rendered with the template of the SFT adapter this stage trains on top of, so the
aligned model is asked exactly as the SFT model was trained and is served. Tokenized pairs are
stored as prompt_ids, chosen_ids, rejected_ids (each answer + EOS), KTO records as prompt_ids,
completion_ids, desirable; loraflow.engine.batches.read_items reads them back.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from loraflow.config import COLUMN_NAMES, DataConfig
from loraflow.data.cleaning import fold, rule_runner
from loraflow.data.prompts import PromptTemplate
from loraflow.data.records import (
    SPLITS,
    Example,
    Rejected,
    checked_messages,
    json_type,
    string_field,
)
from loraflow.data.tokenization import (
    BATCH,
    Encoder,
    TokenizeSettings,
    batches,
    cache_key,
    cached,
    write_report,
)
from loraflow.data.validation import Checked, RecordKind, Steps

Kind = Literal["pairs", "kto"]
FORMAT_VERSION = "1"
REASONS = (
    "invalid_utf8", "too_long", "not_json", "not_object", "sft_record", "unknown_shape",
    "missing_field", "wrong_type", "label_not_boolean", "empty", "empty_side",
    "chosen_equals_rejected", "duplicate", "near_duplicate", "leak",
)  # fmt: skip


class PreferenceExample(BaseModel):
    """One cleaned preference record. `messages` holds the turns before the final user turn."""

    instruction: str
    input: str = ""
    messages: list[dict[str, str]] | None = None
    chosen: str = ""  # pairs
    rejected: str = ""  # pairs
    completion: str = ""  # kto
    desirable: bool = True  # kto

    def prompt(self) -> Example:
        """The prompt as an SFT Example (no answer), for the prompt template."""
        return Example(instruction=self.instruction, input=self.input, output="",
                       messages=self.messages)


# --- parsing one line -----------------------------------------------------------------------


def _text(record: dict[str, Any], name: str, columns: dict[str, str], required: bool) -> str:
    """A string field, or TRL's conversational answer: [{"role": "assistant", "content": ...}]."""
    key = columns.get(name, name)
    value = record.get(key)
    if isinstance(value, list):
        if (len(value) == 1 and isinstance(value[0], dict)
                and value[0].get("role") == "assistant"
                and isinstance(value[0].get("content"), str)):
            return value[0]["content"]
        raise Rejected("wrong_type", f"field {key!r} must be a string or one assistant message")
    return string_field(record, name, columns, required)


def _prompt(record: dict[str, Any], columns: dict[str, str]) -> tuple[str, str, list | None]:
    """(instruction, input, history) from prompt, instruction + input, or messages."""
    key = columns.get("messages", "messages")
    if record.get(key) is not None:
        messages = checked_messages(record[key], key)
        if messages[-1]["role"] != "user":
            raise Rejected("missing_field", f"the last of {key!r} must be the user's turn (the "
                           "answers are chosen/rejected or completion)")
        history = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
        return messages[-1]["content"], "", history or None
    if record.get(columns.get("prompt", "prompt")) is not None:
        return _text(record, "prompt", columns, True), "", None
    if record.get(columns.get("instruction", "instruction")) is not None:
        return (_text(record, "instruction", columns, True),
                _text(record, "input", columns, False), None)
    raise Rejected("missing_field", "no prompt, instruction or messages field")


def to_preference(record: Any, columns: dict[str, str], kind: Kind) -> PreferenceExample:
    """A parsed JSON value -> PreferenceExample, or raise Rejected saying what is wrong."""
    if not isinstance(record, dict):
        raise Rejected("not_object", f"expected a JSON object, found {json_type(record)}")
    answers = ("chosen", "rejected") if kind == "pairs" else ("completion", "label")
    present = [a for a in answers if record.get(columns.get(a, a)) is not None]
    if not present:
        if record.get(columns.get("output", "output")) is not None or (
            kind == "pairs" and record.get(columns.get("completion", "completion")) is not None
        ):
            raise Rejected(
                "sft_record",
                "an SFT example (instruction/output or prompt/completion), not "
                + ("a preference pair" if kind == "pairs" else "a KTO record")
                + ". Fix: give this file as data.train (the SFT stage), or add "
                + ('"chosen" and "rejected" answers' if kind == "pairs"
                   else 'a "label": true|false'),
            )
        keys = ", ".join(repr(k) for k in list(record)[:8]) or "none"
        raise Rejected("unknown_shape", f"no {' / '.join(answers)} field (keys: {keys}); map "
                       "your column names with data.columns")
    instruction, input, history = _prompt(record, columns)
    if kind == "pairs":
        return PreferenceExample(
            instruction=instruction, input=input, messages=history,
            chosen=_text(record, "chosen", columns, True),
            rejected=_text(record, "rejected", columns, True))
    label = record.get(columns.get("label", "label"))
    if not isinstance(label, bool):
        raise Rejected("label_not_boolean", f"label must be true or false, found {label!r}")
    return PreferenceExample(instruction=instruction, input=input, messages=history,
                             completion=_text(record, "completion", columns, True),
                             desirable=label)


def clean_preference(
    example: PreferenceExample, steps: Steps
) -> tuple[PreferenceExample, list[str]]:
    """Apply the cleaning steps to every text field; the record and the rules that changed it."""
    run, changed = rule_runner(steps)
    if not steps:
        return example, []
    cleaned = example.model_copy(update={
        "instruction": run(example.instruction), "input": run(example.input),
        "chosen": run(example.chosen), "rejected": run(example.rejected),
        "completion": run(example.completion),
        "messages": [{"role": m["role"], "content": run(m["content"])}
                     for m in example.messages] if example.messages else None,
    })
    return cleaned, [name for name, _ in steps if name in changed]


def check_preference(record: Any, cfg: DataConfig, steps: Steps, kind: Kind) -> Checked:
    """Shape, clean and check one decoded preference record on its own; raise Rejected."""
    example, changed = clean_preference(to_preference(record, cfg.columns, kind), steps)
    after = " after cleaning" if changed else ""
    if not example.instruction.strip():
        raise Rejected("empty", "the prompt is empty" + after)
    sides = ("chosen", "rejected") if kind == "pairs" else ("completion",)
    for side in sides:
        if not getattr(example, side).strip():
            raise Rejected("empty_side", f"{side} is empty{after}")
    history = "\x1f".join(fold(m["content"]) for m in example.messages or [])
    prompt = f"{history}\x1e{fold(example.instruction)}\x1e{fold(example.input)}"
    if kind == "pairs":
        # compared as written (after cleaning): case and punctuation can be the very mistake
        if example.chosen.strip() == example.rejected.strip():
            raise Rejected("chosen_equals_rejected", "chosen and rejected are the same answer: "
                           "nothing to prefer")
        answers = f"{fold(example.chosen)}\x1e{fold(example.rejected)}"
    else:
        answers = f"{fold(example.completion)}\x1e{example.desirable}"
    return Checked(record=example, changed=changed, prompt=prompt, answers=answers)


# what a preference line may hold: its prompt, its answers and label, and output (an SFT example)
FIELDS = (*COLUMN_NAMES, "chosen", "rejected", "label")
PAIRS = RecordKind(
    name="pairs", check=partial(check_preference, kind="pairs"), reasons=REASONS,
    shapes='{"prompt": "...", "chosen": "...", "rejected": "..."} (or "instruction" + "input" '
    'for "prompt", or "messages" ending with the user\'s turn)',
    fields=FIELDS, digest_tag=b"pairs\0", answer_checks=False,
)
KTO = RecordKind(
    name="kto", check=partial(check_preference, kind="kto"), reasons=REASONS,
    shapes='{"prompt": "...", "completion": "...", "label": true} (label false for an '
    "undesirable answer)",
    fields=FIELDS, digest_tag=b"kto\0", answer_checks=False,
)
PREFERENCE_KINDS: dict[Kind, RecordKind] = {"pairs": PAIRS, "kto": KTO}


def read_preferences(path: Path) -> Iterator[PreferenceExample]:
    """The cleaned records validate_splits wrote (kind PAIRS or KTO)."""
    with open(path, "rb") as f:
        for line in f:
            yield PreferenceExample.model_validate_json(line)


# --- tokenizing -----------------------------------------------------------------------------


class PreferenceTokenReport(BaseModel):
    kind: Kind
    counts: dict[str, int]  # records stored per split
    too_long: dict[str, int]  # prompt + longest answer over max_length: left out
    truncated: dict[str, int]  # answers cut to fit max_length (truncation=truncate)
    tokens: dict[str, int]  # tokens of every stored sequence (a pair counts both sides)
    settings: TokenizeSettings


def tokenize_preference_splits(
    data_dir: Path, tokenizer: PreTrainedTokenizerBase, template: PromptTemplate,
    settings: TokenizeSettings, out_dir: Path, kind: Kind,
    splits: tuple[str, ...] = SPLITS, progress: bool = True,
) -> PreferenceTokenReport:
    """out_dir/<split>.parquet (prompt ids + answer ids + EOS per side) and report.json. The
    prompt and each answer are encoded apart, as for SFT: the prompt's ids are those the model
    is given at inference. A record whose prompt + longest answer exceeds max_length is left
    out (truncation=drop) or has its answers cut (truncate; the prompt must fit)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    encoder = Encoder(tokenizer, template)
    out_dir.mkdir(parents=True, exist_ok=True)
    sides = ("chosen", "rejected") if kind == "pairs" else ("completion",)
    numbers: dict[str, dict[str, int]] = {k: {} for k in ("counts", "too_long", "truncated",
                                                          "tokens")}
    limit = settings.max_length
    for split in splits:
        path = Path(data_dir) / f"{split}.jsonl"
        records = read_preferences(path) if path.is_file() else iter([])
        columns: dict[str, list[Any]] = {"prompt_ids": []} | {f"{s}_ids": [] for s in sides}
        if kind == "kto":
            columns["desirable"] = []
        n = dict.fromkeys(numbers, 0)
        bar = tqdm(desc=f"tokenize {split}", unit="ex", disable=not progress, leave=False)
        for batch in batches(records, BATCH):
            for record, prompt, ids in zip(batch, *_encoded(encoder, batch, sides), strict=True):
                if len(prompt) + max(map(len, ids)) > limit:
                    if settings.truncation == "drop" or len(prompt) >= limit:
                        n["too_long"] += 1
                        continue
                    ids = [a[: limit - len(prompt)] for a in ids]
                    n["truncated"] += 1
                columns["prompt_ids"].append(prompt)
                for side, a in zip(sides, ids, strict=True):
                    columns[f"{side}_ids"].append(a)
                if kind == "kto":
                    columns["desirable"].append(record.desirable)
                n["counts"] += 1
                n["tokens"] += sum(len(prompt) + len(a) for a in ids)
            bar.update(len(batch))
        bar.close()
        ids_type = pa.list_(pa.int32())
        schema = pa.schema([(c, pa.bool_() if c == "desirable" else ids_type) for c in columns])
        pq.write_table(pa.table(columns, schema=schema), out_dir / f"{split}.parquet",
                       compression="zstd")
        for key, value in n.items():
            numbers[key][split] = value
    report = PreferenceTokenReport(kind=kind, settings=settings, **numbers)
    write_report(out_dir, report)
    return report


def _encoded(
    encoder: Encoder, batch: list[PreferenceExample], sides: tuple[str, ...]
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """(prompt ids, [answer ids + EOS, one list per side]) of each record of the batch: the
    final turn's answers only (no earlier-turn spans)."""
    prompts = [encoder.render(r.prompt()) for r in batch]
    none: list[list[tuple[int, int]]] = [[] for _ in batch]
    prompt_ids, first, _ = encoder.run((prompts, [getattr(r, sides[0]) for r in batch], none))
    answers = [first] + [encoder.run(([], [getattr(r, s) for r in batch], []))[1]
                         for s in sides[1:]]
    return prompt_ids, [[a[i] + [encoder.eos] for a in answers] for i in range(len(batch))]


def tokenize_preference_cached(
    cache_root: Path, data_dir: Path, data_sha256: str, tokenizer: PreTrainedTokenizerBase,
    tokenizer_sha: str, template: PromptTemplate, settings: TokenizeSettings, kind: Kind,
    progress: bool = True,
) -> tuple[Path, PreferenceTokenReport, bool]:
    """(folder, report, reused): tokenize into cache_root/<content key>/ unless it is there."""
    key = cache_key("preference", FORMAT_VERSION, kind, data_sha256, tokenizer_sha,
                    template.model_dump(), settings.model_dump())
    return cached(Path(cache_root) / key, PreferenceTokenReport, lambda out: (
        tokenize_preference_splits(data_dir, tokenizer, template, settings, out, kind,
                                   progress=progress)))
