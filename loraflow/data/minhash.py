"""Near-duplicate examples by MinHash (data.clean.dedup=minhash), streamed chunk by chunk.

An example is the set of its folded text's word trigrams; two examples are near duplicates when
the Jaccard similarity of those sets is at least data.clean.near_threshold. Each example gets a
signature of 64 MinHash values by one permutation hashing (one hash per trigram, numpy over a
chunk of examples at once); 8 bands of 8 values find candidates among all earlier examples (for
classic MinHash a pair at similarity 0.9 shares a band with probability 0.99, at 0.6 with 0.13),
and a candidate counts only when the share of equal values of the two signatures, an estimate of
their similarity, reaches the threshold. The first of a group is kept; later ones are
quarantined naming it. Memory: ~240 bytes per kept example (16-bit signatures, band keys), ~340
at the peak while arrays grow (measured at 1M examples).
"""

from __future__ import annotations

import hashlib
from array import array

import numpy as np

HASHES, BANDS = 64, 8
BIN_BITS = HASHES.bit_length() - 1  # a trigram's bin: the top BIN_BITS bits of its hash
ROWS = HASHES // BANDS
SHINGLE = 3  # words per shingle
EMPTY = 0xFFFFFFFF  # a bin no trigram fell into
EMPTY16 = EMPTY & 0xFFFF  # the same, in the stored 16-bit signatures
MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9], dtype=np.uint64)


class _Words(dict[str, int]):
    """word -> a 64-bit hash (deterministic, unlike hash()), each word hashed once."""

    def __missing__(self, word: str) -> int:
        value = self[word] = int.from_bytes(
            hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little"
        )
        return value


class _SortedRuns:
    """uint64 keys with the example each came from, as sorted runs merged when they double:
    a streaming index with O(log n) vectorised lookups and 12 bytes per key."""

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []

    def find(self, keys: np.ndarray) -> np.ndarray:
        """For each key, an example stored under it, or -1."""
        found = np.full(len(keys), -1, dtype=np.int64)
        for run_keys, run_ids in self.runs:
            at = np.minimum(np.searchsorted(run_keys, keys), len(run_keys) - 1)
            hit = (run_keys[at] == keys) & (found < 0)
            found[hit] = run_ids[at[hit]]
        return found

    def add(self, keys: np.ndarray, ids: np.ndarray) -> None:
        while self.runs and len(self.runs[-1][0]) <= len(keys):
            run_keys, run_ids = self.runs.pop()
            keys, ids = np.concatenate([run_keys, keys]), np.concatenate([run_ids, ids])
        order = np.argsort(keys, kind="stable")
        self.runs.append((keys[order], ids[order].astype(np.int32)))


def signatures(docs: list[str], words: _Words) -> np.ndarray:
    """(len(docs), HASHES) uint32 MinHash values of each doc's word trigrams, by one
    permutation hashing: one hash per trigram, its top bits pick one of HASHES bins, and each
    bin keeps its smallest value (EMPTY where none of the doc's trigrams fell)."""
    if not docs:
        return np.empty((0, HASHES), dtype=np.uint32)
    flat: list[int] = []
    counts = np.empty(len(docs), dtype=np.int64)
    for i, doc in enumerate(docs):
        tokens = doc.split()
        flat += map(words.__getitem__, tokens)
        if len(tokens) < SHINGLE:  # a short text is one shingle, padded
            flat += [0] * (SHINGLE - len(tokens))
        counts[i] = max(len(tokens), SHINGLE) - SHINGLE + 1
    hashed = np.array(flat, dtype=np.uint64)
    # a shingle starts at every word but the last SHINGLE-1 of its doc
    word_starts = np.cumsum(counts + SHINGLE - 1) - (counts + SHINGLE - 1)
    at = np.arange(counts.sum()) + np.repeat(word_starts - (np.cumsum(counts) - counts), counts)
    shingles = hashed[at] * MIX[0] + hashed[at + 1] * MIX[1] + hashed[at + 2] * MIX[2]
    shingles ^= shingles >> np.uint64(29)  # mix the high bits into the low ones
    shingles *= MIX[0]
    # (doc, bin, value) in one sortable word: the first of each (doc, bin) is its minimum
    doc = np.repeat(np.arange(len(docs), dtype=np.uint64), counts)
    bin_of = shingles >> np.uint64(64 - BIN_BITS)
    packed = (doc << np.uint64(32 + BIN_BITS)) | (bin_of << np.uint64(32))
    packed |= shingles & np.uint64(0xFFFFFFFF)
    packed.sort()
    group = packed >> np.uint64(32)
    first = np.flatnonzero(np.concatenate([[True], group[1:] != group[:-1]]))
    out = np.full((len(docs), HASHES), EMPTY, dtype=np.uint32)
    rows = (group[first] >> np.uint64(BIN_BITS)).astype(np.int64)
    bins = (group[first] & np.uint64(HASHES - 1)).astype(np.int64)
    out[rows, bins] = (packed[first] & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    return out


def estimate(a: np.ndarray, b: np.ndarray) -> float:
    """The Jaccard similarity two signatures estimate: the share of equal values among the bins
    filled in either (compared as stored, in 16 bits)."""
    a, b = a.astype(np.uint16), b.astype(np.uint16)
    filled = (a != EMPTY16) | (b != EMPTY16)
    return float(np.sum((a == b) & filled) / max(1, np.sum(filled)))


class NearDuplicates:
    """check_chunk(docs) once per chunk, then match(i) / keep(i, source, line) in line order
    for the chunk's docs that reach the dedup check; commit() after the chunk."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.words = _Words()
        self.bands = [_SortedRuns() for _ in range(BANDS)]
        self.kept_signatures = np.empty((1024, HASHES), dtype=np.uint16)  # grown by doubling
        self.kept = 0  # examples in the index (committed)
        self.sources: list[str] = []
        self.source_of, self.line_of = array("H"), array("q")  # where each kept example is
        self._pending: list[int] = []

    def check_chunk(self, docs: list[str]) -> None:
        self.signatures = signatures(docs, self.words)
        self.keys = np.stack(  # (BANDS, len(docs)); the band's number mixed in: one key space
            [_band_keys(self.signatures[:, b * ROWS : (b + 1) * ROWS], b) for b in range(BANDS)]
        )
        earlier = np.stack([band.find(self.keys[b]) for b, band in enumerate(self.bands)])
        # per doc, as Python ints: line-by-line work below stays out of numpy's scalar path
        self.doc_keys = self.keys.T.tolist()
        self.doc_earlier = [
            [c for c in row if c >= 0] if any_hit else []
            for row, any_hit in zip(earlier.T.tolist(), (earlier >= 0).any(axis=0), strict=True)
        ]
        self._chunk_index: dict[int, int] = {}  # band key -> kept example, this chunk's
        self._pending = []

    def match(self, i: int) -> tuple[str, float] | None:
        """(file:line of the earlier example, estimated similarity) if doc i of the chunk is a
        near duplicate of an earlier kept example, else None."""
        index = self._chunk_index
        candidates = self.doc_earlier[i] + [index[k] for k in self.doc_keys[i] if k in index]
        if not candidates:
            return None
        mine = self.signatures[i]
        best: tuple[str, float] | None = None
        for c in sorted(set(candidates)):
            similarity = estimate(self._signature(c), mine)
            if similarity >= self.threshold and (best is None or similarity > best[1]):
                best = (f"{self.sources[self.source_of[c]]}:{self.line_of[c]}", similarity)
        return best

    def keep(self, i: int, source: str, line: int) -> None:
        kept = len(self.line_of)
        if not self.sources or self.sources[-1] != source:
            self.sources.append(source)
        self.source_of.append(len(self.sources) - 1)
        self.line_of.append(line)
        self._pending.append(i)
        for key in self.doc_keys[i]:
            self._chunk_index.setdefault(key, kept)

    def commit(self) -> None:
        """Add the chunk's kept examples to the index of earlier ones."""
        if not self._pending:
            return
        rows = np.array(self._pending)
        first, end = self.kept, self.kept + len(rows)
        if end > len(self.kept_signatures):
            grown = np.empty((2 * end, HASHES), dtype=np.uint16)
            grown[:first] = self.kept_signatures[:first]
            self.kept_signatures = grown
        self.kept_signatures[first:end] = self.signatures[rows]
        self.kept = end
        ids = np.arange(first, end)
        for b, band in enumerate(self.bands):
            band.add(self.keys[b, rows], ids)
        self._pending = []

    def _signature(self, index: int) -> np.ndarray:
        if index < self.kept:
            return self.kept_signatures[index]
        return self.signatures[self._pending[index - self.kept]].astype(np.uint16)


def _band_keys(band: np.ndarray, number: int) -> np.ndarray:
    """One uint64 per row of a band's values (an FNV-style hash of them and the band's
    number, so that the bands' keys do not meet)."""
    key = np.full(len(band), number + 1, dtype=np.uint64)
    for column in range(band.shape[1]):
        key = (key ^ band[:, column].astype(np.uint64)) * np.uint64(0x100000001B3)
    return key
