"""Packing tokenized examples into sequences of a fixed maximum length, boundaries kept.

A pack is the concatenation of whole examples (an example is never split) with each
example's length (`seq_lens`) and prompt length (`prompt_lens`), from which position ids that
restart at every example, document ids and completion-only labels follow, so a training loop
can keep attention inside each example. Nothing is padded on disk; a batch is padded when it
is built. The on-disk form is Parquet: one row per example {input_ids, prompt_len}, or one row
per pack {input_ids, seq_lens, prompt_lens}; read_tokenized reads both back as examples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

IGNORE = -100

Example = tuple[list[int], int]  # (input_ids, prompt_len), as the training engine uses them


class Pack(NamedTuple):
    input_ids: list[int]
    seq_lens: list[int]
    prompt_lens: list[int]


class Packer:
    """Best-fit packing over a bounded set of open packs, so it streams: each example goes
    into the open pack it fills best; a pack is emitted when full, or when too many are open
    (the fullest goes first)."""

    def __init__(self, capacity: int, open_limit: int = 64) -> None:
        self.capacity, self.open_limit = capacity, open_limit
        self.open: list[Pack] = []

    def add(self, ids: list[int], prompt_len: int) -> list[Pack]:
        if len(ids) > self.capacity:
            raise ValueError(
                f"an example of {len(ids)} tokens cannot fit a pack of {self.capacity}"
            )
        best, room = None, self.capacity + 1
        for pack in self.open:
            left = self.capacity - len(pack.input_ids)
            if len(ids) <= left < room:
                best, room = pack, left
        if best is None:
            best = Pack([], [], [])
            self.open.append(best)
        best.input_ids.extend(ids)
        best.seq_lens.append(len(ids))
        best.prompt_lens.append(prompt_len)
        done = []
        if len(best.input_ids) == self.capacity:
            self.open.remove(best)
            done.append(best)
        if len(self.open) > self.open_limit:
            fullest = max(self.open, key=lambda p: len(p.input_ids))
            self.open.remove(fullest)
            done.append(fullest)
        return done

    def flush(self) -> list[Pack]:
        done, self.open = self.open, []
        return done


def position_ids(seq_lens: list[int]) -> list[int]:
    """0, 1, ... restarting at every example of the pack."""
    return [i for n in seq_lens for i in range(n)]


def document_ids(seq_lens: list[int]) -> list[int]:
    """Which example of the pack each token belongs to (for a block-diagonal attention mask)."""
    return [doc for doc, n in enumerate(seq_lens) for _ in range(n)]


def labels(input_ids: list[int], seq_lens: list[int], prompt_lens: list[int]) -> list[int]:
    """input_ids with IGNORE on every example's prompt: loss on completions (and EOS) only."""
    out, start = list(input_ids), 0
    for n, p in zip(seq_lens, prompt_lens, strict=True):
        out[start : start + p] = [IGNORE] * p
        start += n
    return out


def unpack(pack: Pack) -> list[Example]:
    out, start = [], 0
    for n, p in zip(pack.seq_lens, pack.prompt_lens, strict=True):
        out.append((pack.input_ids[start : start + n], p))
        start += n
    return out


def collate_packed(packs: list[Pack], pad_id: int) -> dict[str, Any]:
    """A padded batch of packs: input_ids, labels (IGNORE on prompts and padding),
    position_ids restarting per example, document_ids (-1 on padding) and seq_lens."""
    import torch

    width = max(len(p.input_ids) for p in packs)
    batch = {
        "input_ids": torch.full((len(packs), width), pad_id, dtype=torch.long),
        "labels": torch.full((len(packs), width), IGNORE, dtype=torch.long),
        "position_ids": torch.zeros((len(packs), width), dtype=torch.long),
        "document_ids": torch.full((len(packs), width), -1, dtype=torch.long),
    }
    for row, p in enumerate(packs):
        n = len(p.input_ids)
        batch["input_ids"][row, :n] = torch.tensor(p.input_ids)
        batch["labels"][row, :n] = torch.tensor(labels(*p))
        batch["position_ids"][row, :n] = torch.tensor(position_ids(p.seq_lens))
        batch["document_ids"][row, :n] = torch.tensor(document_ids(p.seq_lens))
    batch["seq_lens"] = [list(p.seq_lens) for p in packs]
    return batch


def read_packs(path: Path) -> list[Pack]:
    """The packs of a packed <split>.parquet."""
    import pyarrow.parquet as pq  # not needed by the engine unless it reads Parquet

    table = pq.read_table(path)
    if "seq_lens" not in table.column_names:
        raise ValueError(f"{path} is not packed (no seq_lens column); set data.packing=true")
    return [Pack(*row) for row in zip(*(table[c].to_pylist() for c in Pack._fields), strict=True)]


def read_tokenized(path: Path) -> list[Example]:
    """Every example of a tokenized <split>.parquet, packed or not, as (input_ids, prompt_len)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if "seq_lens" in table.column_names:
        return [ex for pack in read_packs(path) for ex in unpack(pack)]
    ids = table["input_ids"].to_pylist()
    return list(zip(ids, table["prompt_len"].to_pylist(), strict=True))
