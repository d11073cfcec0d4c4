"""Tokenizing validated examples into prompt + completion ids, stored once as Parquet.

Each example is (input_ids, prompt_len): the prompt's ids, then the answer's ids and EOS. The
training engine derives labels from them: IGNORE_INDEX on the prompt, so loss is taken on the answer
and on the EOS token only (that is what teaches the model to stop); padding is added per batch
and masked there, never stored. One example a row: packing is the engine's (train.batching),
so it can reshuffle each epoch.

The result lives under a folder named by the content hash of the cleaned data, the tokenizer,
the template and these settings: a later run with the same inputs reuses it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from array import array
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import BaseModel
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from loraflow.data.pretokens import PretokenEncoder
from loraflow.data.prompts import PromptTemplate, prompt_renderer
from loraflow.data.records import Example, read_jsonl

FORMAT_VERSION = "3"  # bump when the files written here change shape
Encoded = tuple[list[int], int]  # one tokenized example: (input_ids, prompt_len)
IGNORE_INDEX = -100  # the label of a token no loss is taken on (PyTorch's cross-entropy default)
BATCH = 1024  # examples rendered and encoded together
ROW_GROUP = 16384  # rows per Parquet row group



class TokenizeSettings(BaseModel):
    """Everything besides data, tokenizer and template that changes the tokenized files."""

    max_length: int
    truncation: str = "drop"


class TokenizeReport(BaseModel):
    counts: dict[str, int]  # examples stored per split
    too_long: dict[str, int]  # over max_length and left out (truncation=drop)
    truncated: dict[str, int]  # cut to max_length, part of the answer kept (truncation=truncate)
    completion_truncated_away: dict[str, int]  # cut so that no answer token is left: left out
    tokens: dict[str, int]  # tokens stored
    label_tokens: dict[str, int]  # tokens that carry a label (answer + EOS)
    rows: dict[str, int]  # Parquet rows, one an example
    settings: TokenizeSettings




def cache_key(
    data_sha256: str, tokenizer_sha: str, template: PromptTemplate, settings: TokenizeSettings
) -> str:
    payload = [FORMAT_VERSION, data_sha256, tokenizer_sha, template.model_dump(),
               settings.model_dump()]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class Encoder:
    """Renders and encodes examples in batches: the same ids as tokenizer(...), without building
    Python BatchEncodings; by pre-token lookup (loraflow.pretokens) where the tokenizer allows,
    through its Rust backend otherwise.

    encode() = texts() (render) -> run() (the ids) -> assemble() (prompt + answer + EOS);
    tokenize_splits runs run() in a second thread, so that the Rust tokenizer, which releases
    the GIL, overlaps the Python steps of the batches around it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: PromptTemplate) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; the model could not learn to stop")
        self.render = prompt_renderer(tokenizer, template)
        self.prompt_specials = template.kind == "alpaca"
        self.eos = tokenizer.eos_token_id
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        if self.backend is not None:  # what tokenizer(...) does on every call
            self.backend.no_truncation()
            self.backend.no_padding()
        self.tokenizer = tokenizer
        self.pretokens = PretokenEncoder.of(self.backend)

    def texts(self, examples: list[Example]) -> tuple[list[str], list[str]]:
        """(prompts, answers): the prompt and the answer are encoded apart, so the prompt's ids
        are exactly those the model is given at inference."""
        return [self.render(e) for e in examples], [e.output for e in examples]

    def run(self, texts: tuple[list[str], list[str]]) -> tuple[list[list[int]], list[list[int]]]:
        """The tokenizer's work: (prompt ids, answer ids) per example."""
        (prompts, answers), specials = texts, self.prompt_specials
        if self.backend is None:
            return (
                self.tokenizer(prompts, add_special_tokens=specials)["input_ids"],
                self.tokenizer(answers, add_special_tokens=False)["input_ids"],
            )
        return self._ids(prompts, specials), self._ids(answers, False)

    def _ids(self, texts: list[str], specials: bool) -> list[list[int]]:
        """Ids by pre-token lookup where it applies (ASCII text, byte-level BPE), the Rust
        tokenizer for the rest; both give the same ids."""
        fast = self.pretokens
        ids = [fast.encode(text, specials) for text in texts] if fast else [None] * len(texts)
        rest = [i for i, found in enumerate(ids) if found is None]
        if rest:  # encode_batch_fast: encode_batch's ids without the character offsets
            encoded = self.backend.encode_batch_fast(
                [texts[i] for i in rest], add_special_tokens=specials
            )
            for i, encoding in zip(rest, encoded, strict=True):
                ids[i] = encoding.ids
        return ids  # type: ignore[return-value]

    def assemble(
        self, encoded: tuple[list[list[int]], list[list[int]]]
    ) -> list[tuple[list[int], int]]:
        """(input_ids, prompt_len) per example: prompt ids, answer ids, EOS."""
        return [
            (prompt + answer + [self.eos], len(prompt))
            for prompt, answer in zip(*encoded, strict=True)
        ]

    def encode(self, examples: list[Example]) -> list[tuple[list[int], int]]:
        """(input_ids, prompt_len) per example: prompt ids, answer ids, EOS."""
        return self.assemble(self.run(self.texts(examples)))


def encode_example(
    tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, example: Example
) -> Encoded:
    """(input_ids, prompt_len) of one example, exactly as tokenize_splits stores it."""
    return Encoder(tokenizer, template).encode([example])[0]


def _batches(path: Path) -> Iterator[list[Example]]:
    batch: list[Example] = []
    for example in read_jsonl(path):
        batch.append(example)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _encoded(encoder: Encoder, path: Path) -> Iterator[list[tuple[list[int], int]]]:
    """The split's examples encoded, batch after batch. The tokenizer runs in a second thread
    (it releases the GIL) on batch k+1 while this one reads batch k+2 and the caller stores
    batch k, so the Rust encoding never waits for our Python and both cores are used."""
    batches = _batches(path)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize") as pool:
        batch = next(batches, None)
        running = pool.submit(encoder.run, encoder.texts(batch)) if batch else None
        while running is not None:
            batch = next(batches, None)
            texts = encoder.texts(batch) if batch else None
            encoded = running.result()
            running = pool.submit(encoder.run, texts) if texts else None
            yield encoder.assemble(encoded)


class _ParquetOut:
    """Rows buffered in flat int32 buffers and written as zstd row groups (building Arrow list
    arrays from offsets + values, not from Python lists of lists)."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        ids = pa.list_(pa.int32())
        lists, scalars = ("input_ids",), ("prompt_len",)
        self.pa, self.lists, self.scalars = pa, lists, scalars
        self.schema = pa.schema([(n, ids) for n in lists] + [(n, pa.int32()) for n in scalars])
        self.writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        self.rows = 0
        self._reset()

    def _reset(self) -> None:
        self.values = {n: array("i") for n in (*self.lists, *self.scalars)}
        self.offsets = {n: array("i", [0]) for n in self.lists}
        self.pending = 0

    def add(self, *row: list[int] | int) -> None:
        for name, value in zip((*self.lists, *self.scalars), row, strict=True):
            if name in self.offsets:
                self.values[name].extend(value)  # type: ignore[arg-type]
                self.offsets[name].append(len(self.values[name]))
            else:
                self.values[name].append(value)  # type: ignore[arg-type]
        self.pending += 1
        if self.pending >= ROW_GROUP:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        import numpy as np

        pa, columns = self.pa, []
        for name in self.lists:
            offsets = pa.array(np.frombuffer(self.offsets[name], dtype=np.int32))
            values = pa.array(np.frombuffer(self.values[name], dtype=np.int32))
            columns.append(pa.ListArray.from_arrays(offsets, values))
        columns += [pa.array(np.frombuffer(self.values[n], dtype=np.int32)) for n in self.scalars]
        self.writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))
        self.rows += self.pending
        self._reset()

    def close(self) -> None:
        self.flush()
        self.writer.close()


def read_tokenized(path: Path) -> list[Encoded]:
    """The (input_ids, prompt_len) of every example of a <split>.parquet written here."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["input_ids", "prompt_len"])
    return list(zip(table["input_ids"].to_pylist(), table["prompt_len"].to_pylist(), strict=True))


def tokenize_splits(
    data_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    template: PromptTemplate,
    settings: TokenizeSettings | int,
    out_dir: Path,
    splits: tuple[str, ...] = ("train", "validation"),
    progress: bool = True,
) -> TokenizeReport:
    """Write out_dir/<split>.parquet, out_dir/lengths.npz (every example's full length, for the
    histogram) and out_dir/report.json; return the report."""
    import numpy as np

    if isinstance(settings, int):
        settings = TokenizeSettings(max_length=settings)
    max_length = settings.max_length
    encoder = Encoder(tokenizer, template)
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = ("counts", "too_long", "truncated", "completion_truncated_away", "tokens")
    numbers: dict[str, dict[str, int]] = {f: {} for f in (*fields, "label_tokens", "rows")}
    lengths: dict[str, np.ndarray] = {}
    for split in splits:
        n = dict.fromkeys((*fields, "label_tokens"), 0)
        split_lengths = array("i")
        out = _ParquetOut(out_dir / f"{split}.parquet")
        bar = tqdm(desc=f"tokenize {split}", unit="ex", disable=not progress, leave=False)
        try:
            for batch in _encoded(encoder, Path(data_dir) / f"{split}.jsonl"):
                for ids, prompt_len in batch:
                    split_lengths.append(len(ids))
                    if len(ids) > max_length:
                        if settings.truncation == "drop":
                            n["too_long"] += 1
                            continue
                        if prompt_len >= max_length:
                            n["completion_truncated_away"] += 1
                            continue
                        n["truncated"] += 1
                        ids = ids[:max_length]
                    n["counts"] += 1
                    n["tokens"] += len(ids)
                    n["label_tokens"] += len(ids) - prompt_len
                    out.add(ids, prompt_len)
                bar.update(len(batch))
        finally:
            out.close()
            bar.close()
        for field, value in n.items():
            numbers[field][split] = value
        numbers["rows"][split] = out.rows
        lengths[split] = np.frombuffer(split_lengths, dtype=np.int32)
    np.savez_compressed(out_dir / "lengths.npz", **lengths)
    report = TokenizeReport(**numbers, settings=settings)
    (out_dir / "report.json").write_text(report.model_dump_json(indent=2))
    return report


def tokenize_cached(
    cache_root: Path,
    data_dir: Path,
    data_sha256: str,
    tokenizer: PreTrainedTokenizerBase,
    tokenizer_sha: str,
    template: PromptTemplate,
    settings: TokenizeSettings,
    progress: bool = True,
) -> tuple[Path, TokenizeReport, bool]:
    """(folder, report, reused): tokenize into cache_root/<content key>/ unless it is there."""
    folder = Path(cache_root) / cache_key(data_sha256, tokenizer_sha, template, settings)
    if (folder / "report.json").is_file():
        report = TokenizeReport.model_validate_json((folder / "report.json").read_text())
        return folder, report, True
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    report = tokenize_splits(data_dir, tokenizer, template, settings, staging, progress=progress)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)  # a folder with report.json is complete
    return folder, report, False


def plot_lengths(lengths_file: Path, max_length: int, out: Path) -> Path:
    """A histogram PNG of example lengths in tokens per split, with the max_length cut-off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.load(lengths_file)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    top = max([max_length, *(int(data[s].max()) for s in data.files if data[s].size)])
    bins = np.linspace(0, top, 60)
    for split in data.files:
        over = int((data[split] > max_length).sum())
        ax.hist(
            data[split], bins=bins, alpha=0.6, label=f"{split} (n={data[split].size}, {over} over)"
        )
    ax.axvline(max_length, color="red", linestyle="--", label=f"max_length={max_length}")
    ax.set_xlabel("tokens per example (prompt + answer + EOS)")
    ax.set_ylabel("examples")
    ax.set_title("Example lengths")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
