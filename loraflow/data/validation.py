"""Validating and cleaning data, streamed record by record: one split runner for every kind
of record (SFT examples here, preference pairs and KTO records in loraflow.data.preference).

Sources are JSON Lines (plain, .gz, .zst), JSON arrays, Parquet, CSV/TSV or save_to_disk
folders, local or on S3 (loraflow.data.formats reads them); a file that is not what its name
says stops validation first, with one message naming it and the fix (sources.check_sources).
Every record read is accounted for: blank, kept as is, kept after cleaning (with the names of
the rules that changed it), or quarantined with a reason. Quarantined JSON lines are written
byte for byte to quarantine/<split>.jsonl, records of the other formats as one JSON line each
(fix them and resubmit that file), and the n-th row of quarantine/<split>.tsv says where the
n-th came from (file and line, or "row N" for Parquet, CSV and Arrow) and why. The cleaned
records are written as <split>.jsonl, the exact input of tokenization and evaluation, so what
was checked is what is trained on.

A RecordKind says how one decoded line is checked, cleaned and turned into the record written,
and gives the keys the runner compares (the folded prompt: leakage; prompt + answers: near
duplicates); the runner does the rest the same way for every kind: decoding, dedup, leakage,
counters, quarantine and digests. The shapes an SFT record may take: loraflow.data.records.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

import orjson
from pydantic import BaseModel
from tqdm import tqdm

from loraflow.config import COLUMN_NAMES, DataConfig
from loraflow.data import formats
from loraflow.data.cleaning import RULES, clean_example, cleaning_steps, fold, similarity
from loraflow.data.minhash import NearDuplicates
from loraflow.data.records import SPLITS, DataError, Rejected, to_example
from loraflow.data.sources import check_sources, dataset_files, join, open_source, source_size

MAX_REPORTED = 20
CHUNK = 2048  # lines cleaned and token-counted together

# SFT quarantine reasons, in the order the checks run.
REASONS = (
    "invalid_utf8",
    "too_long",
    "not_json",
    "not_object",
    "preference_record",
    "unknown_shape",
    "missing_field",
    "wrong_type",
    "empty",
    "too_short",
    "instruction_like_input",
    "duplicate",
    "near_duplicate",
    "leak",
)
# A line of the other kind of data (a preference pair or a KTO record in SFT data, or an SFT
# example in preference data): the file was given in the wrong place, so the run stops.
WRONG_KIND = frozenset({"preference_record", "sft_record"})
SFT_SHAPES = (
    '{"instruction": "...", "input": "...", "output": "..."} (input may be empty), '
    '{"messages": [...]} or {"prompt": "...", "completion": "..."}'
)
Steps = list[tuple[str, Callable[[str], str]]]  # the cleaning rules on, as cleaning_steps gives


class Checked(NamedTuple):
    """A line that passed its kind's own checks, cleaned, with the keys the runner compares."""

    record: BaseModel  # what <split>.jsonl gets, as one JSON line
    changed: list[str]  # the cleaning rules that changed it
    prompt: str  # the folded prompt: the leakage key
    answers: str  # the folded answer(s): with the prompt, the near-duplicate key
    answer: str = ""  # the answer as cleaned: what data.clean.min_output_tokens counts (SFT)


@dataclass(frozen=True)
class RecordKind:
    """One kind of record: how a decoded line is checked (check raises Rejected) and what the
    report says of it. Everything else is the split runner's, the same for every kind."""

    name: Literal["sft", "pairs", "kto"]
    check: Callable[[Any, DataConfig, Steps], Checked]
    reasons: tuple[str, ...]  # its quarantine reasons in the order the checks run: the report's
    shapes: str  # what a line must look like, for the error message
    fields: tuple[str, ...]  # what it reads of a record: the columns read of a columnar file
    digest_tag: bytes  # leads the data digest; none for SFT, whose digests predate the kinds
    # data.clean.min_output_tokens and dedup=minhash's MinHash look at one answer: SFT's; a
    # preference record is deduplicated exactly and near (dedup=minhash counts as near)
    answer_checks: bool


class SplitCounts(BaseModel):
    read: int = 0
    blank: int = 0
    kept: int = 0
    cleaned: int = 0
    quarantined: int = 0
    reasons: dict[str, int] = {}
    rules: dict[str, int] = {}

    @property
    def usable(self) -> int:
        return self.kept + self.cleaned

    @property
    def kept_fraction(self) -> float:
        return self.usable / max(1, self.read - self.blank)


class DataReport(BaseModel):
    """What validation found, per split; sha256 identifies the cleaned data handed on."""

    sha256: str
    source_sha256: str
    splits: dict[str, SplitCounts]
    problems: list[str]  # the first quarantined records, "file:line: detail [reason]"
    min_kept_fraction: float
    shapes: str  # what a line must look like, for the error message
    first_wrong_kind: str | None = None  # "file:line: detail" of the first such line

    @property
    def counts(self) -> dict[str, int]:
        return {split: c.usable for split, c in self.splits.items()}

    def totals(self) -> dict[str, Any]:
        """The counts a person or a script checks: read, kept, cleaned, quarantined, reasons."""
        total: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        rules: Counter[str] = Counter()
        for c in self.splits.values():
            total.update(
                {k: getattr(c, k) for k in ("read", "blank", "kept", "cleaned", "quarantined")}
            )
            reasons.update(c.reasons)
            rules.update(c.rules)
        return dict(total) | {
            "reasons": dict(reasons),
            "rules": dict(rules),
            "kept_fraction": {s: round(c.kept_fraction, 6) for s, c in self.splits.items()},
            "passed": not self.failures(),
        }

    def failures(self) -> list[str]:
        out = []
        wrong = {split: sum(c.reasons.get(r, 0) for r in WRONG_KIND)
                 for split, c in self.splits.items()}
        if any(wrong.values()):
            counts = ", ".join(f"{split}: {n}" for split, n in wrong.items() if n)
            out.append(f"lines of the wrong kind of data ({counts}); the first: "
                       f"{self.first_wrong_kind}")
        for split, c in self.splits.items():
            if c.usable == 0:
                out.append(f"{split}: no usable examples ({c.read} lines read)")
            elif c.kept_fraction < self.min_kept_fraction:
                out.append(
                    f"{split}: kept {c.usable} of {c.read - c.blank} lines "
                    f"({c.kept_fraction:.1%}), under data.min_kept_fraction="
                    f"{self.min_kept_fraction}"
                )
        return out

    def check(self, out_dir: Path | str) -> None:
        """Raise DataError naming every failing split, the first bad lines and the fix."""
        failures = self.failures()
        if not failures:
            return
        totals = self.totals()
        shown = "\n".join(f"  - {p}" for p in self.problems)
        more = totals["quarantined"] - len(self.problems)
        raise DataError(
            "the data is not usable:\n"
            + "\n".join(f"  {f}" for f in failures)
            + f"\nquarantined lines by reason: {totals['reasons']}\n"
            + (shown + (f"\n  ... and {more} more" if more > 0 else "") + "\n" if shown else "")
            + f"Every quarantined record is in {out_dir}/quarantine/<split>.jsonl (one JSON line "
            "each), with file:line (or file and row N) and reason in quarantine/<split>.tsv. "
            f"Each record must be an object like {self.shapes}. Fix the records and run "
            "again, map other column names with data.columns, or lower "
            "data.min_kept_fraction."
        )


def check_example(record: Any, cfg: DataConfig, steps: Steps) -> Checked:
    """Shape, clean and check one decoded SFT record on its own; raise Rejected."""
    example, changed = clean_example(to_example(record, cfg.columns), steps)
    for name in ("instruction", "output"):
        if not getattr(example, name).strip():
            raise Rejected("empty", f"{name} is empty" + (" after cleaning" if changed else ""))
    instruction, input = fold(example.instruction), fold(example.input)
    threshold = cfg.clean.instruction_like_input
    if threshold is not None and example.input:
        score = similarity(instruction, input)
        if score >= threshold:
            raise Rejected(
                "instruction_like_input",
                f"instruction and input are {score:.0%} similar "
                f"(data.clean.instruction_like_input={threshold})",
            )
    history = "\x1f".join(fold(m["content"]) for m in example.messages or [])
    prompt = f"{history}\x1e{instruction}\x1e{input}"
    return Checked(record=example, changed=changed, prompt=prompt, answers=fold(example.output),
                   answer=example.output)


SFT = RecordKind(name="sft", check=check_example, reasons=REASONS, shapes=SFT_SHAPES,
                 fields=COLUMN_NAMES, digest_tag=b"", answer_checks=True)


class _Quarantine:
    """quarantine/<split>.jsonl (JSON lines byte for byte, other records as one JSON line
    each) and .tsv (where from: file and line, or "row N"; and why)."""

    def __init__(self, out_dir: Path, split: str) -> None:
        folder = out_dir / "quarantine"
        folder.mkdir(parents=True, exist_ok=True)
        self.lines = open(folder / f"{split}.jsonl", "wb")  # noqa: SIM115
        self.index = open(folder / f"{split}.tsv", "w", encoding="utf-8")  # noqa: SIM115
        self.index.write("quarantine_line\tsource\tline\treason\tdetail\n")
        self.count = 0

    def add(
        self, raw: bytes | dict[str, Any], source: str, number: int | str, reason: str,
        detail: str,
    ) -> None:
        self.count += 1
        if isinstance(raw, dict):  # a null of a columnar file is a field left out
            raw = orjson.dumps({k: v for k, v in raw.items() if v is not None}, default=str)
        self.lines.write(raw if raw.endswith(b"\n") else raw + b"\n")
        detail = detail.replace("\t", " ").replace("\n", " ")
        self.index.write(f"{self.count}\t{source}\t{number}\t{reason}\t{detail}\n")

    def close(self) -> None:
        self.lines.close()
        self.index.close()


def validate_splits(
    sources: dict[str, list[str]],
    out_dir: Path,
    cfg: DataConfig,
    *,
    kind: RecordKind = SFT,
    count_tokens: Callable[[list[str]], list[int]] | None = None,
    progress: bool = True,
) -> DataReport:
    """Validate and clean every line of every split (train first: the leakage check needs it)
    as records of `kind` (SFT examples, or preference.PAIRS / preference.KTO).

    Writes out_dir/<split>.jsonl (cleaned records), out_dir/quarantine/ and returns the
    counts; raises DataError only for missing files; call report.check() to enforce the
    thresholds. count_tokens (answers -> token counts) is needed for min_output_tokens.
    """
    if kind.answer_checks and cfg.clean.min_output_tokens and count_tokens is None:
        raise ValueError("data.clean.min_output_tokens needs the base model's tokenizer")
    check_sources(sources)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = _Validation(cfg=cfg, kind=kind, out_dir=out_dir, count_tokens=count_tokens,
                      progress=progress)
    data_digest = hashlib.sha256(kind.digest_tag)
    splits: dict[str, SplitCounts] = {}
    for split in sorted(sources, key=lambda s: SPLITS.index(s) if s in SPLITS else len(SPLITS)):
        splits[split], split_sha = _validate_split(run, split, sources[split])
        data_digest.update(split.encode() + b"\0" + split_sha)
    return DataReport(
        sha256=data_digest.hexdigest(),
        source_sha256=run.source_digest.hexdigest(),
        splits=splits,
        problems=run.problems,
        min_kept_fraction=cfg.min_kept_fraction,
        shapes=kind.shapes,
        first_wrong_kind=run.first_wrong_kind,
    )


@dataclass
class _Validation:
    """One validation's settings and what it carries from split to split."""

    cfg: DataConfig
    kind: RecordKind
    out_dir: Path
    count_tokens: Callable[[list[str]], list[int]] | None
    progress: bool
    steps: Steps = field(init=False)
    train_prompts: set[bytes] = field(default_factory=set)  # leakage keys of the train split
    problems: list[str] = field(default_factory=list)  # the first MAX_REPORTED rejections
    first_wrong_kind: str | None = None  # "file:line: detail" of the first such line
    source_digest: Any = field(default_factory=hashlib.sha256)  # every file's bytes, as read

    def __post_init__(self) -> None:
        self.steps = cleaning_steps(self.cfg.clean)
        if not (self.kind.answer_checks and self.cfg.clean.min_output_tokens):
            self.count_tokens = None  # no answer is counted


class _Split:
    """One split being validated: its counters, dedup keys, quarantine and cleaned output."""

    def __init__(self, run: _Validation, name: str) -> None:
        clean = run.cfg.clean
        self.run, self.name = run, name
        self.counts = SplitCounts()
        self.reasons: Counter[str] = Counter()
        self.rules: Counter[str] = Counter()
        self.seen_exact: set[bytes] = set()
        self.seen_near: set[bytes] = set()
        minhash = clean.dedup == "minhash" and run.kind.answer_checks
        self.similar = NearDuplicates(clean.near_threshold) if minhash else None
        self.quarantine = _Quarantine(run.out_dir, name)
        self.out = open(run.out_dir / f"{name}.jsonl", "wb")  # noqa: SIM115
        self.digest = hashlib.sha256()

    def reject(
        self, raw: bytes | dict[str, Any], source: str, number: int | str, rejected: Rejected
    ) -> None:
        reason, detail, run = rejected.reason, rejected.detail, self.run
        self.reasons[reason] += 1
        self.quarantine.add(raw, source, number, reason, detail)
        if len(run.problems) < MAX_REPORTED:
            run.problems.append(f"{source}:{number}: {detail} [{reason}]")
        if reason in WRONG_KIND and run.first_wrong_kind is None:
            run.first_wrong_kind = f"{source}:{number}: {detail}"

    def admit(
        self, checked: Checked, doc: int, n_tokens: int | None, source: str, number: int | str
    ) -> None:
        """Write a checked record unless it is too short, a repeat or a leak (raise Rejected).
        doc: its index among the chunk's checked records (MinHash's document)."""
        clean = self.run.cfg.clean
        if n_tokens is not None and n_tokens < clean.min_output_tokens:
            raise Rejected("too_short", f"answer has {n_tokens} tokens, under "
                           f"data.clean.min_output_tokens={clean.min_output_tokens}")
        line = checked.record.model_dump_json(exclude_none=True).encode() + b"\n"
        if clean.dedup != "off":
            self._check_repeat(line, checked, doc, source, number)
        prompt_key = _digest(checked.prompt)
        if self.name == "train":
            self.run.train_prompts.add(prompt_key)
        elif clean.leakage and prompt_key in self.run.train_prompts:
            raise Rejected("leak", "its prompt also appears in the training split")
        self.rules.update(checked.changed)
        if checked.changed:
            self.counts.cleaned += 1
        else:
            self.counts.kept += 1
        self.out.write(line)
        self.digest.update(line)

    def _check_repeat(
        self, line: bytes, checked: Checked, doc: int, source: str, number: int | str
    ) -> None:
        """Raise Rejected for a repeat of an earlier record; else remember this one. A record
        left out later (a leak) is remembered too: a second copy is a duplicate of the first."""
        clean = self.run.cfg.clean
        exact = hashlib.blake2b(line, digest_size=16).digest()
        near = _digest(checked.prompt + "\x1f" + checked.answers)
        if exact in self.seen_exact:
            raise Rejected("duplicate", "same as an earlier line")
        if clean.dedup != "exact" and near in self.seen_near:
            raise Rejected("near_duplicate",
                           "same as an earlier line up to case, spacing and punctuation")
        match = self.similar.match(doc) if self.similar is not None else None
        if match is not None:
            raise Rejected("near_duplicate", f"near duplicate of {match[0]}: word-trigram "
                           f"similarity ~{match[1]:.0%} (data.clean.near_threshold="
                           f"{clean.near_threshold})")
        self.seen_exact.add(exact)
        self.seen_near.add(near)
        if self.similar is not None:
            self.similar.keep(doc, source, number)

    def close(self) -> None:
        self.out.close()
        self.quarantine.close()

    def result(self) -> tuple[SplitCounts, bytes]:
        """(counts, SHA-256 of the cleaned records written), once closed."""
        counts = self.counts
        counts.quarantined = self.quarantine.count
        counts.reasons = {r: self.reasons[r] for r in self.run.kind.reasons if self.reasons[r]}
        counts.rules = {r: self.rules[r] for r in RULES if self.rules[r]}
        return counts, self.digest.digest()


def _validate_split(run: _Validation, name: str, files: list[str]) -> tuple[SplitCounts, bytes]:
    """One split's lines, file after file: (counts, SHA-256 of the cleaned records written)."""
    split = _Split(run, name)
    try:
        for file in files:
            file_digest = hashlib.sha256()
            for source, unit, chunk in _chunks(run, file, split.counts, file_digest):
                _validate_chunk(split, source, unit, chunk)
            run.source_digest.update(f"{name}\0{file}\0".encode() + file_digest.digest())
    finally:
        split.close()
    return split.result()


def _validate_chunk(split: _Split, source: str, unit: str, chunk: list[formats.Item]) -> None:
    """Check each line on its own, count the answers' tokens and MinHash the chunk at once,
    then admit the records in line order."""
    run = split.run
    checked: list[tuple[bytes | dict[str, Any], int | str, Checked | Rejected]] = []
    for number, raw, payload in chunk:
        where = unit + str(number) if unit else number
        try:
            checked.append((raw, where, run.kind.check(_decoded(payload, run.cfg), run.cfg,
                                                       run.steps)))
        except Rejected as r:
            checked.append((raw, where, r))
    usable = [c for _, _, c in checked if isinstance(c, Checked)]
    counted = run.count_tokens is not None and usable
    lengths = iter(run.count_tokens([c.answer for c in usable]) if counted else [])
    if split.similar is not None:  # MinHash signatures of the whole chunk at once
        split.similar.check_chunk([c.prompt + "\x1e" + c.answers for c in usable])
    doc = -1
    for raw, number, result in checked:  # in line order
        if isinstance(result, Rejected):
            split.reject(raw, source, number, result)
            continue
        doc += 1
        try:
            split.admit(result, doc, next(lengths, None), source, number)
        except Rejected as r:
            split.reject(raw, source, number, r)
    if split.similar is not None:
        split.similar.commit()


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _chunks(
    run: _Validation, source: str, counts: SplitCounts, digest: Any
) -> Iterator[tuple[str, str, list[formats.Item]]]:
    """(file, "" for lines or "row ", items) in chunks of CHUNK: items as loraflow.data.formats
    reads them; blank lines are counted here and not yielded. Whole-file problems found while
    reading (a broken JSON array, a CSV without our columns) raise DataError."""
    fmt = formats.source_format(source)
    files = dataset_files(source) if fmt == "arrow" else [source]
    if fmt == "arrow":  # the folder's listing is part of its identity
        with open_source(join(source, "state.json")) as f:
            digest.update(f.read())
    for file in files:
        unit = "row " if fmt in formats.ROW_FORMATS else ""
        chunk: list[formats.Item] = []
        try:
            for item in _items(run, file, fmt, digest):
                counts.read += 1
                if isinstance(item[2], bytes) and not item[2].strip():
                    counts.blank += 1
                    continue
                chunk.append(item)
                if len(chunk) >= CHUNK:
                    yield file, unit, chunk
                    chunk = []
        except formats.FileProblem as exc:
            raise DataError(str(exc)) from None
        if chunk:
            yield file, unit, chunk


def _items(run: _Validation, file: str, fmt: str, digest: Any) -> Iterator[formats.Item]:
    """One file's items; its bytes hashed into `digest` as read (Parquet and Arrow, which are
    read from their footer/schema first, are hashed in one pass before). Of a columnar file,
    the columns of the kind's fields are read."""
    cfg = run.cfg
    ours = {name: cfg.columns.get(name, name) for name in run.kind.fields}  # field -> column
    mapped = set(ours.values())
    with (
        open_source(file) as f,
        tqdm(
            total=source_size(file),
            desc=f"validate {Path(file).name}",
            unit="B",
            unit_scale=True,
            disable=not run.progress,
            leave=False,
        ) as bar,
    ):
        if fmt in ("parquet", "arrow"):
            while block := f.read(formats.READ):
                digest.update(block)
                bar.update(len(block))
            f.seek(0)
            try:
                reader = formats.parquet_file(f) if fmt == "parquet" else formats.arrow_stream(f)
            except Exception as exc:  # noqa: BLE001 - pyarrow's errors: the file is broken
                raise DataError(f"{file} cannot be read as {fmt}: {exc}") from None
            names = list(reader.schema_arrow.names if fmt == "parquet" else reader.schema.names)
            columns = formats.wanted_columns(names, mapped)
            if columns is None:
                raise DataError(formats.no_columns(file, names, ours))
            batches = (reader.iter_batches(batch_size=formats.BATCH, columns=columns)
                       if fmt == "parquet" else iter(reader))
            yield from formats.arrow_batches_items(batches, None if fmt == "parquet" else columns)
            return
        stream = formats.Hashing(f, digest, bar.update)
        if fmt == "json":
            buffered = io.BufferedReader(stream, formats.READ)
            if buffered.peek(formats.HEAD).lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"{":
                # one object per line under a .json name, as many exporters write it
                yield from formats.jsonl_items(buffered, "jsonl", cfg.max_line_bytes, file)
            else:
                yield from formats.json_array_items(buffered, file)
        elif fmt in ("csv", "tsv"):
            buffered = io.BufferedReader(stream, formats.READ)
            yield from _csv_items(buffered, file, fmt, cfg, ours)
        else:
            yield from formats.jsonl_items(
                io.BufferedReader(stream, formats.READ), fmt, cfg.max_line_bytes, file
            )


def _csv_items(
    stream: IO[bytes], file: str, fmt: str, cfg: DataConfig, ours: dict[str, str]
) -> Iterator[formats.Item]:
    delimiter = "\t" if fmt == "tsv" else ","
    items = formats.csv_items(stream, file, delimiter, cfg.columns.get("messages", "messages"))
    first = next(items, None)
    if first is not None and not set(ours.values()) & set(first[1]):  # type: ignore[arg-type]
        raise DataError(formats.no_columns(file, list(first[1]), ours))
    if first is not None:
        yield first
        yield from items


def _decoded(payload: bytes | dict[str, Any] | None, cfg: DataConfig) -> Any:
    """The record of a JSON line (bytes; None when it is over data.max_line_bytes), or the
    record a row format (CSV, Parquet, ...) already decoded; raise Rejected."""
    if isinstance(payload, dict):
        return payload
    if payload is None:
        raise Rejected("too_long", f"line is over data.max_line_bytes={cfg.max_line_bytes}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected("invalid_utf8", f"not valid UTF-8 (byte {exc.start})") from None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise Rejected("not_json", f"not JSON ({exc.msg} at column {exc.colno})") from None
