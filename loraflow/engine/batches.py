"""Examples to rows to tensors: the seeded example stream, padded or packed rows (the one
packer), collation with answer-only labels (every assistant turn of a conversation: the
example's label spans) and the per-example attention mask.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, NamedTuple

import torch

from loraflow.config import TrainConfig
from loraflow.data.tokenization import IGNORE_INDEX, Encoded, read_tokenized
from loraflow.engine.distributed import Ranks


def read_examples(data_dir: Path, split: str) -> list[Encoded]:
    """The examples of one split (<split>.parquet, as loraflow.data.tokenization writes it); a split
    without its file has none."""
    path = Path(data_dir) / f"{split}.parquet"
    return read_tokenized(path) if path.is_file() else []


class Unit(NamedTuple):
    """A preference item: sequences that train together, in one row, never split by packing.
    dpo/orpo: (prompt + chosen, prompt + rejected); kto: (prompt + completion, prompt + another
    example's completion, whose log ratio estimates KTO's KL reference point)."""

    examples: tuple[Encoded, ...]
    desirable: bool = True


Item = Encoded | Unit  # what the stream yields: an SFT example or a preference unit


def item_examples(item: Item) -> tuple[Encoded, ...]:
    return item.examples if isinstance(item, Unit) else (item,)


def shared_prefix(item: Item) -> int:
    """Tokens at the front of a preference unit that collate lays out once for all of its
    sequences: the prompt but its last token, when every sequence has the same prompt (each
    keeps its own copy of the prompt's last token, whose hidden state predicts its answer's
    first token, so every log-probability is the one the sequence has alone). 0 for an SFT
    example or a unit whose prompts differ."""
    if not isinstance(item, Unit):
        return 0
    (ids, prompt_len, *spans), *others = item.examples
    if (prompt_len < 2 or spans
            or any(len(o) > 2 or o[1] != prompt_len or o[0][:prompt_len] != ids[:prompt_len]
                   for o in others)):
        return 0
    return prompt_len - 1


def item_len(item: Item) -> int:
    """Tokens the item takes in a row (a unit's shared prompt counted once)."""
    examples = item_examples(item)
    return sum(len(e[0]) for e in examples) - shared_prefix(item) * (len(examples) - 1)


def read_items(data_dir: Path, split: str, objective: str) -> list[Item]:
    """A split as the objective trains on it: SFT examples, or preference units read from the
    prompt_ids/chosen_ids/rejected_ids (or prompt_ids/completion_ids/desirable) columns that
    loraflow.data.preference writes. Refuses data of the other kind, naming the fix."""
    parquet = Path(data_dir) / f"{split}.parquet"
    if not parquet.is_file():
        return []
    import pyarrow.parquet as pq

    columns = pq.read_schema(parquet).names
    kind = ("pairs" if "chosen_ids" in columns else "kto" if "completion_ids" in columns
            else "sft")
    wanted = {"sft": "sft", "dpo": "pairs", "orpo": "pairs", "kto": "kto"}[objective]
    if kind != wanted:
        raise ValueError(
            f"{parquet} holds {kind} data but train.objective={objective} trains on {wanted} "
            f"data. Fix: set train.objective to "
            f"{ {'sft': 'sft', 'pairs': 'dpo or orpo', 'kto': 'kto'}[kind] }, or point the "
            "engine at data tokenized for this objective (preference records: "
            "loraflow.data.preference; SFT: loraflow.data.tokenization).")
    if kind == "sft":
        return read_examples(data_dir, split)  # type: ignore[return-value]
    table = pq.read_table(parquet).to_pydict()
    prompts = table["prompt_ids"]
    if kind == "pairs":
        return [Unit(((p + c, len(p)), (p + r, len(p))))
                for p, c, r in zip(prompts, table["chosen_ids"], table["rejected_ids"],
                                   strict=True)]
    completions = table["completion_ids"]
    # KL pairs as TRL builds them: each prompt with the previous example's completion
    return [Unit(((p + c, len(p)), (p + completions[i - 1], len(p))), bool(d))
            for i, (p, c, d) in enumerate(zip(prompts, completions, table["desirable"],
                                             strict=True))]


class ExampleStream:
    """Examples in a fresh seeded order each epoch; `position` (examples consumed) is all a
    checkpoint needs to resume the exact same stream."""

    def __init__(self, examples: list[Encoded], seed: int, position: int = 0) -> None:
        self.examples, self.seed, self.position = examples, seed, position
        self._epoch, self._order = -1, list(range(len(examples)))

    def peek(self) -> Encoded:
        epoch, offset = divmod(self.position, len(self.examples))
        if epoch != self._epoch:
            self._order = list(range(len(self.examples)))
            random.Random(self.seed + epoch).shuffle(self._order)
            self._epoch = epoch
        return self.examples[self._order[offset]]

    def take(self) -> Encoded:
        example = self.peek()
        self.position += 1
        return example


def next_micro_batch(
    stream: ExampleStream, cfg: TrainConfig, packed: bool, count: int | None = None
) -> list[list[Encoded]]:
    """`count` rows (default: one micro-batch) of examples: one example a row (padded), or as
    many as fit in seq_len (packed)."""
    count = count or cfg.micro_batch_size
    if not packed:
        return [[stream.take()] for _ in range(count)]
    rows = []
    for _ in range(count):
        row = [stream.take()]
        used = item_len(row[0])
        while used + item_len(stream.peek()) <= cfg.seq_len:
            used += item_len(stream.peek())
            row.append(stream.take())
        rows.append(row)
    return rows


def step_rows(
    stream: ExampleStream, cfg: TrainConfig, packed: bool, ranks: Ranks
) -> list[list[list[Encoded]]]:
    """One optimizer step's rows for every rank, micro-step by micro-step: each micro-step has
    micro_batch_size x world_size rows, of which rank r trains the r-th micro_batch_size."""
    return [next_micro_batch(stream, cfg, packed, cfg.micro_batch_size * ranks.world_size)
            for _ in range(cfg.grad_accum_steps)]


def rows_per_step(cfg: TrainConfig, ranks: Ranks) -> int:
    """The effective batch: rows in one optimizer step over all ranks."""
    return cfg.micro_batch_size * cfg.grad_accum_steps * ranks.world_size


def label_ranges(example: Encoded | tuple[list[int], int]) -> list[tuple[int, int]]:
    """[start, end) token ranges of an example that carry labels: its label spans (a
    conversation's earlier assistant turns), then its answer and EOS after prompt_len. An
    (input_ids, prompt_len) pair has the answer's alone."""
    ids, prompt_len, *rest = example
    spans = rest[0] if rest else ()
    return [*zip(spans[::2], spans[1::2], strict=True), (prompt_len, len(ids))]


def collate(rows: list[list[Item]], pad_id: int, width: int | None = None) -> dict[str, Any]:
    """Tensors for rows of one or more examples (or preference units) each, padded at the end
    to `width` (default: the longest row). Labels are IGNORE_INDEX on padding and on prompts
    but their label spans; position ids restart at 0 for every example; doc_ids number the
    examples of a row (padding is -1). With preference units also seq_ids (the sequence each
    token belongs to, numbered over the micro-batch in row order, so a unit's sequences are
    consecutive; -1 on padding), desirable (one flag per unit) and branch_ids: a unit whose
    sequences share their prompt is one document laid out as [prompt but its last token]
    (branch 0) then each sequence's rest from that token on (branch 1, 2), positions
    continuing from the prompt for each; a token sees branch 0 and its own branch
    (attention_mask_for), so the prompt is computed once instead of once per sequence."""
    width = width or max(sum(item_len(item) for item in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    doc_ids = torch.full(shape, -1, dtype=torch.long)
    seq_ids = torch.full(shape, -1, dtype=torch.long)
    branch_ids = torch.zeros(shape, dtype=torch.long)
    seq, desirable = 0, []
    for r, row in enumerate(rows):
        start, doc = 0, 0
        for item in row:
            examples, shared = item_examples(item), shared_prefix(item)
            if isinstance(item, Unit):
                desirable.append(item.desirable)
            if shared:  # the trunk; it carries no labels
                end = start + shared
                input_ids[r, start:end] = torch.tensor(examples[0][0][:shared])
                position_ids[r, start:end] = torch.arange(shared)
                doc_ids[r, start:end], seq_ids[r, start:end] = doc, seq
                start = end
            for k, example in enumerate(examples):
                ids = example[0][shared:]
                end = start + len(ids)
                input_ids[r, start:end] = torch.tensor(ids)
                for first, last in label_ranges(example):
                    labels[r, start + first - shared : start + last - shared] = torch.tensor(
                        example[0][first:last])
                position_ids[r, start:end] = torch.arange(shared, shared + len(ids))
                # a shared unit is one document with a branch per sequence
                doc_ids[r, start:end] = doc if shared else doc + k
                seq_ids[r, start:end] = seq
                if shared:
                    branch_ids[r, start:end] = k + 1
                seq, start = seq + 1, end
            doc += 1 if shared else len(examples)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
             "doc_ids": doc_ids}
    if desirable:
        batch |= {"seq_ids": seq_ids, "desirable": torch.tensor(desirable),
                  "branch_ids": branch_ids}
    return batch


def attention_mask_for(doc_ids: torch.Tensor, attn_impl: str,
                       branch_ids: torch.Tensor | None = None) -> Any:
    """Causal attention inside each example only (padding attends to padding, so no row is
    empty); with branch_ids (a preference unit's shared prompt, see collate) a token sees its
    unit's branch 0 and its own branch, never a sibling sequence. A flex_attention BlockMask
    on GPU also skips the masked blocks' compute."""
    if attn_impl == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def same_example(b: Any, h: Any, q: Any, kv: Any) -> Any:
            return (doc_ids[b, q] == doc_ids[b, kv]) & (kv <= q)

        def same_branch(b: Any, h: Any, q: Any, kv: Any) -> Any:
            return same_example(b, h, q, kv) & (
                (branch_ids[b, kv] == 0) | (branch_ids[b, kv] == branch_ids[b, q]))

        rows, width = doc_ids.shape
        return create_block_mask(same_example if branch_ids is None else same_branch,
                                 B=rows, H=None, Q_LEN=width, KV_LEN=width,
                                 device=doc_ids.device)
    width = doc_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=doc_ids.device).tril()
    mask = (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal
    if branch_ids is not None:
        mask &= (branch_ids[:, None, :] == 0) | (branch_ids[:, None, :] == branch_ids[:, :, None])
    return mask[:, None]


def answer_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def row_counts(rows: list[list[Item]]) -> tuple[int, int]:
    """(answer tokens, real tokens) of rows, as collate() would lay them out: the loss
    predicts every label but a row's first token. Real tokens are the sequences' own (a
    unit's shared prompt counts for each sequence, as a layout without sharing feeds it, so
    tokens/s compares with other trainers). Lets each rank know the whole step's counts from
    the rows alone, with no communication."""
    answers = real = 0
    for row in rows:
        for d, example in enumerate(e for item in row for e in item_examples(item)):
            for first, last in label_ranges(example):
                answers += max(0, last - max(first, 1 if d == 0 else 0))
            real += len(example[0])
    return answers, real
