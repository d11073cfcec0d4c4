"""Validating and cleaning instruction data, streamed record by record.

Sources are JSON Lines (plain, .gz, .zst), JSON arrays, Parquet, CSV/TSV or save_to_disk
folders, local or on S3 (loraflow.data.formats reads them); a file that is not what its name
says stops validation first, with one message naming it and the fix (sources.check_sources).
Every record read is accounted for: blank, kept as is, kept after cleaning (with the names of
the rules that changed it), or quarantined with a reason. Quarantined JSON lines are written
byte for byte to quarantine/<split>.jsonl, records of the other formats as one JSON line each
(fix them and resubmit that file), and the n-th row of quarantine/<split>.tsv says where the
n-th came from (file and line, or "row N" for Parquet, CSV and Arrow) and why. The cleaned
examples are written as <split>.jsonl, the exact input of tokenization and evaluation, so what
was checked is what is trained on. The shapes a record may take: loraflow.data.records.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import orjson
from pydantic import BaseModel
from tqdm import tqdm

from loraflow.config import COLUMN_NAMES, DataConfig
from loraflow.data import formats
from loraflow.data.cleaning import RULES, clean_example, cleaning_steps, fold, similarity
from loraflow.data.minhash import NearDuplicates
from loraflow.data.records import SPLITS, DataError, Example, Rejected, to_example
from loraflow.data.sources import check_sources, dataset_files, join, open_source, source_size

MAX_REPORTED = 20
CHUNK = 2048  # lines cleaned and token-counted together

# Quarantine reasons, in the order the checks run.
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
    shapes: str = SFT_SHAPES  # what a line must look like, for the error message
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
    count_tokens: Callable[[list[str]], list[int]] | None = None,
    progress: bool = True,
) -> DataReport:
    """Validate and clean every line of every split (train first: the leakage check needs it).

    Writes out_dir/<split>.jsonl (cleaned examples), out_dir/quarantine/ and returns the
    counts; raises DataError only for missing files; call report.check() to enforce the
    thresholds. count_tokens (answers -> token counts) is needed for min_output_tokens.
    """
    if cfg.clean.min_output_tokens and count_tokens is None:
        raise ValueError("data.clean.min_output_tokens needs the base model's tokenizer")
    check_sources(sources)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = cleaning_steps(cfg.clean)
    source_digest, data_digest = hashlib.sha256(), hashlib.sha256()
    train_prompts: set[bytes] = set()
    splits: dict[str, SplitCounts] = {}
    problems: list[str] = []
    wrong_kind: list[str] = []
    for split in sorted(sources, key=lambda s: SPLITS.index(s) if s in SPLITS else len(SPLITS)):
        splits[split], split_sha = _validate_split(
            split, sources[split], out_dir, cfg, steps, count_tokens, train_prompts, problems,
            source_digest, progress, wrong_kind,
        )  # fmt: skip
        data_digest.update(split.encode() + b"\0" + split_sha)
    return DataReport(
        sha256=data_digest.hexdigest(),
        source_sha256=source_digest.hexdigest(),
        splits=splits,
        problems=problems,
        min_kept_fraction=cfg.min_kept_fraction,
        first_wrong_kind=wrong_kind[0] if wrong_kind else None,
    )


def _validate_split(
    split: str,
    split_sources: list[str],
    out_dir: Path,
    cfg: DataConfig,
    steps: list[tuple[str, Callable[[str], str]]],
    count_tokens: Callable[[list[str]], list[int]] | None,
    train_prompts: set[bytes],
    problems: list[str],
    source_digest: Any,
    progress: bool,
    wrong_kind: list[str],
) -> tuple[SplitCounts, bytes]:
    """One split's lines, file after file: (counts, SHA-256 of the cleaned examples written)."""
    clean = cfg.clean
    counts = SplitCounts()
    reasons: Counter[str] = Counter()
    rules: Counter[str] = Counter()
    seen_exact: set[bytes] = set()
    seen_near: set[bytes] = set()
    similar = NearDuplicates(clean.near_threshold) if clean.dedup == "minhash" else None
    quarantine = _Quarantine(out_dir, split)
    out = open(out_dir / f"{split}.jsonl", "wb")  # noqa: SIM115
    split_digest = hashlib.sha256()

    def reject(
        raw: bytes | dict[str, Any], source: str, number: int | str, reason: str, detail: str
    ) -> None:
        reasons[reason] += 1
        quarantine.add(raw, source, number, reason, detail)
        if len(problems) < MAX_REPORTED:
            problems.append(f"{source}:{number}: {detail} [{reason}]")
        if reason in WRONG_KIND and not wrong_kind:
            wrong_kind.append(f"{source}:{number}: {detail}")

    try:
        for split_source in split_sources:
            file_digest = hashlib.sha256()
            for source, unit, chunk in _chunks(split_source, cfg, counts, file_digest, progress):
                checked = []  # (raw, number, example or why it was rejected, rules, prompt)
                for number, raw, payload in chunk:
                    try:
                        checked.append((raw, unit + str(number) if unit else number,
                                        *_check_item(payload, cfg, steps)))
                    except Rejected as r:
                        checked.append((raw, unit + str(number) if unit else number, r, [], ""))
                usable = [c for c in checked if isinstance(c[2], Example)]
                answers = [c[2].output for c in usable]
                lengths = iter(count_tokens(answers) if clean.min_output_tokens and answers else [])
                # folded answers, once: for the near key and the MinHash documents
                outputs = [fold(c[2].output) for c in usable] if clean.dedup != "off" else []
                if similar is not None:  # MinHash signatures of the whole chunk at once
                    docs = zip(usable, outputs, strict=True)
                    similar.check_chunk([c[4] + "\x1e" + output for c, output in docs])
                doc = -1
                for raw, number, example, changed, prompt in checked:  # in line order
                    if isinstance(example, Rejected):
                        reject(raw, source, number, example.reason, example.detail)
                        continue
                    doc += 1
                    n_tokens = next(lengths, None)
                    if n_tokens is not None and n_tokens < clean.min_output_tokens:
                        reject(
                            raw, source, number, "too_short",
                            f"answer has {n_tokens} tokens, under "
                            f"data.clean.min_output_tokens={clean.min_output_tokens}",
                        )  # fmt: skip
                        continue
                    prompt_key = _digest(prompt)
                    line_out = example.model_dump_json(exclude_none=True).encode() + b"\n"
                    if clean.dedup != "off":
                        exact = hashlib.blake2b(line_out, digest_size=16).digest()
                        near = _digest(prompt + "\x1f" + outputs[doc])
                        if exact in seen_exact:
                            reject(raw, source, number, "duplicate", "same as an earlier line")
                            continue
                        if clean.dedup != "exact" and near in seen_near:
                            reject(
                                raw, source, number, "near_duplicate",
                                "same as an earlier line up to case, spacing and punctuation",
                            )  # fmt: skip
                            continue
                        match = similar.match(doc) if similar is not None else None
                        if match is not None:
                            reject(
                                raw, source, number, "near_duplicate",
                                f"near duplicate of {match[0]}: word-trigram similarity "
                                f"~{match[1]:.0%} (data.clean.near_threshold="
                                f"{clean.near_threshold})",
                            )  # fmt: skip
                            continue
                        seen_exact.add(exact)
                        seen_near.add(near)
                        if similar is not None:
                            similar.keep(doc, source, number)
                    if split == "train":
                        train_prompts.add(prompt_key)
                    elif clean.leakage and prompt_key in train_prompts:
                        reject(
                            raw, source, number, "leak",
                            "its prompt also appears in the training split",
                        )  # fmt: skip
                        continue
                    for rule in changed:
                        rules[rule] += 1
                    if changed:
                        counts.cleaned += 1
                    else:
                        counts.kept += 1
                    out.write(line_out)
                    split_digest.update(line_out)
                if similar is not None:
                    similar.commit()
            source_digest.update(f"{split}\0{split_source}\0".encode() + file_digest.digest())
    finally:
        out.close()
        quarantine.close()
    counts.quarantined = quarantine.count
    counts.reasons = {r: reasons[r] for r in REASONS if reasons[r]}
    counts.rules = {r: rules[r] for r in RULES if rules[r]}
    return counts, split_digest.digest()


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _chunks(
    source: str, cfg: DataConfig, counts: SplitCounts, digest: Any, progress: bool
) -> Iterator[tuple[str, str, list[formats.Item]]]:
    """(file, "" for lines or "row ", items) in chunks of CHUNK: items as loraflow.formats
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
            for item in _items(file, fmt, cfg, digest, progress):
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


def _items(
    file: str, fmt: str, cfg: DataConfig, digest: Any, progress: bool
) -> Iterator[formats.Item]:
    """One file's items; its bytes hashed into `digest` as read (Parquet and Arrow, which are
    read from their footer/schema first, are hashed in one pass before)."""
    mapped = {cfg.columns.get(name, name) for name in COLUMN_NAMES}
    with (
        open_source(file) as f,
        tqdm(
            total=source_size(file),
            desc=f"validate {Path(file).name}",
            unit="B",
            unit_scale=True,
            disable=not progress,
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
                raise DataError(formats.no_columns(file, names, cfg.columns | {
                    n: n for n in COLUMN_NAMES if n not in cfg.columns}))
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
            yield from _csv_items(buffered, file, fmt, cfg, mapped)
        else:
            yield from formats.jsonl_items(
                io.BufferedReader(stream, formats.READ), fmt, cfg.max_line_bytes, file
            )


def _csv_items(
    stream: IO[bytes], file: str, fmt: str, cfg: DataConfig, mapped: set[str]
) -> Iterator[formats.Item]:
    delimiter = "\t" if fmt == "tsv" else ","
    items = formats.csv_items(stream, file, delimiter, cfg.columns.get("messages", "messages"))
    first = next(items, None)
    if first is not None and not mapped & set(first[1]):  # type: ignore[arg-type]
        raise DataError(formats.no_columns(file, list(first[1]), cfg.columns | {
            n: n for n in COLUMN_NAMES if n not in cfg.columns}))
    if first is not None:
        yield first
        yield from items


def _check_item(
    payload: bytes | dict[str, Any] | None, cfg: DataConfig,
    steps: list[tuple[str, Callable[[str], str]]],
) -> tuple[Example, list[str], str]:
    """Parse, shape, clean and check one line on its own: (example, rules that changed it,
    its folded prompt for the dedup and leakage keys); raise Rejected."""
    return _check_record(decoded(payload, cfg), cfg, steps)


def decoded(payload: bytes | dict[str, Any] | None, cfg: DataConfig) -> Any:
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


def _check_record(
    record: Any, cfg: DataConfig, steps: list[tuple[str, Callable[[str], str]]]
) -> tuple[Example, list[str], str]:
    """Shape, clean and check one decoded record on its own (see _check_item)."""
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
    return example, changed, f"{history}\x1e{instruction}\x1e{input}"
