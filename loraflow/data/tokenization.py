"""Tokenizing validated examples into prompt + completion ids, stored once as Parquet.

Each example is (input_ids, prompt_len, label_spans): the prompt's ids, then the answer's ids
and EOS; label_spans lists flat [start, end, ...] token ranges inside the prompt that are
learned too: the earlier assistant turns of a conversation (their content and end-of-turn
token) under data.train_on=all_assistant_turns, empty otherwise. The training engine derives
labels from them: IGNORE_INDEX on the prompt but those spans, so loss is taken on the answers
and on their end-of-turn/EOS tokens only (that is what teaches the model to stop); padding is
added per batch and masked there, never stored. The prompt ids are those the model is given
at serving (the same rendering, tokenized as one text), checked by a preflight. One example a
row: packing is the engine's (train.batching), so it can reshuffle each epoch.

The result lives under a folder named by the content hash of the cleaned data, the tokenizer,
the template and these settings: a later run with the same inputs reuses it. The folder, its
key, its staging and its report.json are the same for preference records
(loraflow.data.preference tokenizes them with this module's Encoder).
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from loraflow.data.pretokens import PretokenEncoder
from loraflow.data.prompts import (
    PromptTemplate,
    TurnTemplateError,
    assistant_spans,
    encode_prompt,
    prompt_renderer,
    render_example,
    special_strings,
    turn_end,
)
from loraflow.data.records import Example, read_jsonl
from loraflow.staging import staged_dir

FORMAT_VERSION = "4"  # bump when the files written here change shape
# one tokenized example: (input_ids, prompt_len, label_spans), label_spans flat [start, end, ...]
Encoded = tuple[list[int], int, list[int]]
IGNORE_INDEX = -100  # the label of a token no loss is taken on (PyTorch's cross-entropy default)
BATCH = 1024  # examples rendered and encoded together
ROW_GROUP = 16384  # rows per Parquet row group
ItemT = TypeVar("ItemT")
ReportT = TypeVar("ReportT", bound=BaseModel)


class TokenizeSettings(BaseModel):
    """Everything besides data, tokenizer and template that changes the tokenized files."""

    max_length: int
    truncation: str = "drop"
    train_on: str = "all_assistant_turns"


class TokenizeReport(BaseModel):
    counts: dict[str, int]  # examples stored per split
    too_long: dict[str, int]  # over max_length and left out (truncation=drop)
    truncated: dict[str, int]  # cut to max_length, part of the answer kept (truncation=truncate)
    completion_truncated_away: dict[str, int]  # cut so that no answer token is left: left out
    tokens: dict[str, int]  # tokens stored
    label_tokens: dict[str, int]  # tokens that carry a label (answer + EOS)
    rows: dict[str, int]  # Parquet rows, one an example
    settings: TokenizeSettings


def cache_key(*parts: Any) -> str:
    """The name of a tokenized folder: the SHA-256 of everything that changes its files (a
    format version, the data's and the tokenizer's digests, template and settings, as JSON)."""
    return hashlib.sha256(json.dumps(list(parts), sort_keys=True).encode()).hexdigest()


def cached(
    folder: Path, report_type: type[ReportT], tokenize: Callable[[Path], ReportT]
) -> tuple[Path, ReportT, bool]:
    """(folder, report, reused): a folder with its report.json (written last) is complete and
    reused; else tokenize(staging) fills a staging folder that becomes `folder` when it ends
    well (loraflow.staging), so a failed or interrupted run leaves nothing half written."""
    if (folder / "report.json").is_file():
        return folder, report_type.model_validate_json((folder / "report.json").read_text()), True
    folder.parent.mkdir(parents=True, exist_ok=True)
    with staged_dir(folder, "tokenizing") as staging:
        report = tokenize(staging)
    return folder, report, False


def write_report(out_dir: Path, report: BaseModel) -> None:
    """out_dir/report.json, the last file of a tokenized folder (see cached)."""
    (out_dir / "report.json").write_text(report.model_dump_json(indent=2))


def batches(items: Iterable[ItemT], size: int) -> Iterator[list[ItemT]]:
    """`items` in lists of `size` (the last may be shorter)."""
    batch: list[ItemT] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


Texts = tuple[list[str], list[str], list[list[tuple[int, int]]]]
Ids = tuple[list[list[int]], list[list[int]], list[list[int]]]


class Encoder:
    """Renders and encodes examples in batches: the same ids as tokenizer(...), without building
    Python BatchEncodings; by pre-token lookup (loraflow.data.pretokens) where the tokenizer
    allows, through its Rust backend otherwise.

    encode() = texts() (render) -> run() (the ids) -> assemble() (prompt + answer + EOS);
    tokenize_splits runs run() in a second thread, so that the Rust tokenizer, which releases
    the GIL, overlaps the Python steps of the batches around it. A conversation's earlier
    assistant turns (train_on=all_assistant_turns) are found as character spans of the
    prompt (loraflow.data.prompts.assistant_spans) and mapped to tokens by the tokenizer's
    offsets. The preflight (on construction) checks on probe examples that the prompt ids are
    those served and that every answer's end-of-turn/EOS token is labelled."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, template: PromptTemplate,
        train_on: str = "all_assistant_turns",
    ) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; the model could not learn to stop")
        self.render = prompt_renderer(tokenizer, template)
        self.template, self.train_on = template, train_on
        self.prompt_specials = template.kind == "alpaca"
        self.eos = tokenizer.eos_token_id
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        if self.backend is not None:  # what tokenizer(...) does on every call
            self.backend.no_truncation()
            self.backend.no_padding()
        self.tokenizer = tokenizer
        self.pretokens = PretokenEncoder.of(self.backend)
        self.specials = special_strings(tokenizer)
        self.turn_end_token = self._turn_end_token()
        # what may end an earlier turn: the token the template ends an answer with, else EOS;
        # never another special token (a BOS or the next turn's start, written after answers
        # by templates with no end-of-turn of their own)
        self.turn_ends = [self.turn_end_token or tokenizer.eos_token]
        self.preflight()

    def texts(self, examples: list[Example]) -> Texts:
        """(prompts, answers, spans): the prompt and the answer are encoded apart, so the
        prompt's ids are exactly those the model is given at inference; spans: the earlier
        assistant turns' character spans in the prompt."""
        prompts = [self.render(e) for e in examples]
        spans = [
            self._spans(e, prompt) if e.messages else []
            for e, prompt in zip(examples, prompts, strict=True)
        ]
        return prompts, [e.output for e in examples], spans

    def _spans(self, example: Example, prompt: str) -> list[tuple[int, int]]:
        if self.train_on != "all_assistant_turns" or not any(
            m["role"] == "assistant" for m in example.messages or []
        ):
            return []
        if self.turn_end_token is not None and self.turn_end_token != self.tokenizer.eos_token:
            raise TurnTemplateError(
                f"the chat template ends an assistant turn with {self.turn_end_token!r} but the "
                f"tokenizer's EOS is {self.tokenizer.eos_token!r}: the earlier turns would "
                "teach the model to stop with one token and the final answers with the other, "
                "while generation stops on EOS only. Fix: set eos_token to "
                f"{self.turn_end_token!r} in the base model's tokenizer_config.json, or "
                "data.train_on=last_turn."
            )
        return assistant_spans(self.tokenizer, self.template, example, prompt, self.turn_ends)

    def run(self, texts: Texts) -> Ids:
        """The tokenizer's work: (prompt ids, answer ids, label spans) per example."""
        (prompts, answers, spans), specials = texts, self.prompt_specials
        if self.backend is None:
            if any(spans):
                raise ValueError("data.train_on=all_assistant_turns needs a fast (Rust) "
                                 "tokenizer for its offsets. Fix: data.train_on=last_turn")
            return (
                self.tokenizer(prompts, add_special_tokens=specials)["input_ids"],
                self.tokenizer(answers, add_special_tokens=False)["input_ids"],
                [[] for _ in prompts],
            )
        plain = [i for i, char_spans in enumerate(spans) if not char_spans]
        prompt_ids: list[list[int]] = [[] for _ in prompts]
        token_spans: list[list[int]] = [[] for _ in prompts]
        for i, ids in zip(plain, self._ids([prompts[i] for i in plain], specials), strict=True):
            prompt_ids[i] = ids
        for i, char_spans in enumerate(spans):
            if char_spans:  # one text, as served; the offsets place the turns
                encoding = self.backend.encode(prompts[i], add_special_tokens=specials)
                prompt_ids[i] = encoding.ids
                token_spans[i] = _token_spans(encoding.offsets, char_spans)
        return prompt_ids, self._ids(answers, False), token_spans

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

    def assemble(self, encoded: Ids) -> list[Encoded]:
        """(input_ids, prompt_len, label_spans) per example: prompt ids, answer ids, EOS."""
        return [
            (prompt + answer + [self.eos], len(prompt), spans)
            for prompt, answer, spans in zip(*encoded, strict=True)
        ]

    def encode(self, examples: list[Example]) -> list[Encoded]:
        """(input_ids, prompt_len, label_spans) per example: prompt ids, answer ids, EOS."""
        return self.assemble(self.run(self.texts(examples)))

    def _turn_end_token(self) -> str | None:
        """The special token the chat template writes after an assistant's answer, if any."""
        if self.template.kind != "chat":
            return None  # our layouts and Jinja prompts end at the prompt: EOS is appended
        answer = "Probe answer."
        messages = [{"role": "user", "content": "Probe question."},
                    {"role": "assistant", "content": answer}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        at = text.rfind(answer)
        if at < 0:
            return None
        end = turn_end(text, at + len(answer), self.specials)
        return text[at + len(answer) : end].strip() or None

    def preflight(self) -> None:
        """On probe examples, single-turn and a conversation: the prompt ids stored for
        training are the ids served (render_example + encode_prompt), and every answer's last
        token, its end-of-turn or EOS, carries a label; else stop naming the template."""
        probes = [
            Example(instruction="Probe question one.", input="with input", output="Answer."),
            Example(
                instruction="And the second?", output="Second answer.",
                messages=[{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "First question."},
                          {"role": "assistant", "content": "First answer."}],
            ),
        ]  # fmt: skip
        if self.turn_end_token not in (None, self.tokenizer.eos_token):
            probes = probes[:1]  # conversations are refused when met (see _spans)
        shown = _shown(self.template)
        for probe in probes:
            ids, prompt_len, spans = self.encode([probe])[0]
            served = encode_prompt(
                self.tokenizer, self.template, render_example(self.tokenizer, self.template, probe)
            )
            if ids[:prompt_len] != served:
                raise TurnTemplateError(
                    f"the prompt tokenized for training differs from the prompt tokenized at "
                    f"serving (template {shown!r}): the model would be trained on other ids "
                    "than it is asked with. Fix: a template that writes its special tokens "
                    "itself (chat, jinja) or alpaca, whose BOS the tokenizer adds."
                )
            if ids[-1] != self.eos:
                raise TurnTemplateError(f"an answer does not end with EOS (template {shown!r})")
            if self.turn_end_token is None or self.turn_end_token != self.tokenizer.eos_token:
                continue  # no end-of-turn token of the template's own to check in the spans
            for end in spans[1::2]:
                if ids[end - 1] != self.eos:
                    raise TurnTemplateError(
                        f"the end-of-turn token {self.tokenizer.eos_token!r} after an earlier "
                        f"assistant turn is not labelled (template {shown!r}): its tokens do "
                        "not fall on the turn's boundaries. Fix: data.train_on=last_turn."
                    )


def _shown(template: PromptTemplate) -> str:
    """A template as an error message shows it: its kind, and a Jinja template's text."""
    if template.jinja is None:
        return template.kind
    text = template.jinja if len(template.jinja) < 300 else template.jinja[:300] + " ..."
    return f"jinja {text!r}"


def _token_spans(offsets: list[tuple[int, int]], char_spans: list[tuple[int, int]]) -> list[int]:
    """Flat [start, end, ...] token ranges covering the character spans: a token is in a span
    when its characters overlap it (so a leading-space piece of the first word is in)."""
    out: list[int] = []
    for begin, finish in char_spans:
        inside = [t for t, (a, b) in enumerate(offsets) if b > a and a < finish and b > begin]
        if inside:
            out += [inside[0], inside[-1] + 1]
    return out


def encode_example(
    tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, example: Example,
    train_on: str = "all_assistant_turns",
) -> Encoded:
    """(input_ids, prompt_len, label_spans) of one example, exactly as tokenize_splits stores
    it."""
    return Encoder(tokenizer, template, train_on).encode([example])[0]


def _encoded(encoder: Encoder, path: Path) -> Iterator[list[tuple[list[int], int]]]:
    """The split's examples encoded, batch after batch. The tokenizer runs in a second thread
    (it releases the GIL) on batch k+1 while this one reads batch k+2 and the caller stores
    batch k, so the Rust encoding never waits for our Python and both cores are used."""
    examples = batches(read_jsonl(path), BATCH)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize") as pool:
        batch = next(examples, None)
        running = pool.submit(encoder.run, encoder.texts(batch)) if batch else None
        while running is not None:
            batch = next(examples, None)
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
        lists, scalars = ("input_ids", "label_spans"), ("prompt_len",)
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
    """The (input_ids, prompt_len, label_spans) of every example of a <split>.parquet written
    here (label_spans empty in files written before they existed)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    columns = [table[c].to_pylist() for c in ("input_ids", "prompt_len")]
    spans = table["label_spans"].to_pylist() if "label_spans" in table.column_names else None
    return list(zip(*columns, spans or [[] for _ in range(table.num_rows)], strict=True))


def tokenize_splits(
    data_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    template: PromptTemplate,
    settings: TokenizeSettings,
    out_dir: Path,
    splits: tuple[str, ...] = ("train", "validation"),
    progress: bool = True,
) -> TokenizeReport:
    """Write out_dir/<split>.parquet, out_dir/lengths.npz (every example's full length, for the
    histogram) and out_dir/report.json; return the report."""
    import numpy as np

    max_length = settings.max_length
    encoder = Encoder(tokenizer, template, settings.train_on)
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
                for ids, prompt_len, spans in batch:
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
                    n["label_tokens"] += len(ids) - prompt_len + sum(spans[1::2]) - sum(
                        spans[::2]
                    )
                    out.add(ids, spans, prompt_len)
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
    write_report(out_dir, report)
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
    key = cache_key(FORMAT_VERSION, data_sha256, tokenizer_sha, template.model_dump(),
                    settings.model_dump())
    return cached(Path(cache_root) / key, TokenizeReport, lambda out: tokenize_splits(
        data_dir, tokenizer, template, settings, out, progress=progress))


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
