"""The ids of a byte-level BPE tokenizer (GPT-2, SmolLM2) for ASCII text, by pre-token lookup.

Such a tokenizer cuts text into pre-tokens with one regex (words with their leading space,
numbers, punctuation runs, white space) and runs BPE on each pre-token on its own, so a text's
ids are its pre-tokens' ids one after the other. Pre-tokens repeat (they are words), so each
distinct one is encoded once, by the tokenizer itself, and looked up after that: ~4x less CPU
than the tokenizer's own encode, which builds a string, offsets and masks for every token.

It applies only where that holds exactly, which `PretokenEncoder.of` checks: no normalizer, the
ByteLevel pre-tokenizer with its own regex, BPE without dropout, added tokens without
strip/single-word rules; then it compares itself with the tokenizer on probe texts. It takes
ASCII text only: there the regex's classes (\\p{L}, \\p{N}, \\s) are exactly the stdlib `re`
classes below; any other text is left to the tokenizer (encode returns None).
"""

from __future__ import annotations

import json
import re
from itertools import chain
from typing import Any

WHITE = "\\t\\n\\x0b\\x0c\\r "  # what \s matches in ASCII text
# tokenizers' ByteLevel(use_regex=True) pattern (GPT-2's), spelled for ASCII text
BYTE_LEVEL = re.compile(
    rf"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{WHITE}A-Za-z0-9]+"
    rf"|[{WHITE}]+(?![^{WHITE}])|[{WHITE}]+"
)
MAX_PIECES = 1 << 18  # the lookup table (~60 MiB full) is emptied when it grows past this
PROBES = (
    "Hello, world! It's a test: we'll see; I'd say they're fine, you've done 'it'.",
    "  two  spaces,\ttab\n\nnew lines\r\nCRLF   trailing   ",
    "### Instruction:\nSummarise #123 in 1 sentence.\n\n### Input:\n\n\n### Output:\n",
    "numbers 3.14159 -42 1,000,000 0x1F 2024-01-31T12:00:00Z",
    '{"name": "Ann O\'Neil", "qty": 3, "email": "ann@example.com"}',
    'ctrl\x00\x01\x1f\x7f chars ~`!@#$%^&*()_+-={}[]|\\:;"<>?,./ end',
    "'S 'T 'RE CAPS's isn'T x'll'd 'm",
    " \n \t\x0b\x0c leading white space and a final one ",
    "",
)


class _Pieces(dict[str, list[int]]):
    """Pre-token -> ids, asking the tokenizer for a pre-token not seen before."""

    def __init__(self, backend: Any) -> None:
        super().__init__()
        self.backend = backend

    def __missing__(self, piece: str) -> list[int]:
        ids = self[piece] = self.backend.encode(piece, add_special_tokens=False).ids
        return ids


class PretokenEncoder:
    """encode(text, specials) -> the tokenizer's ids for an ASCII text, or None for any other
    (the caller encodes that one with the tokenizer). One instance per thread: its lookup
    table is not locked."""

    def __init__(self, backend: Any, added: dict[str, int]) -> None:
        self.backend = backend
        self.pieces = _Pieces(backend)
        self.added = added
        names = sorted(added, key=len, reverse=True)  # leftmost-longest, as the tokenizer
        self.added_pattern = re.compile("|".join(map(re.escape, names))) if names else None
        core = backend.encode("a", add_special_tokens=False).ids
        full = backend.encode("a", add_special_tokens=True).ids
        at = next(i for i in range(len(full) - len(core) + 1) if full[i : i + len(core)] == core)
        self.prefix, self.suffix = full[:at], full[at + len(core) :]

    @classmethod
    def of(cls, backend: Any) -> PretokenEncoder | None:
        """An encoder for this Rust tokenizer (tokenizers.Tokenizer), or None where its ids
        cannot be had by pre-token lookup."""
        if backend is None:
            return None
        spec = json.loads(backend.to_str())
        pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
        if (
            spec.get("normalizer") is not None
            or pre.get("type") != "ByteLevel"
            or not pre.get("use_regex", True)
            or pre.get("add_prefix_space")
            or model.get("type") != "BPE"
            or model.get("dropout")
        ):
            return None
        added = spec.get("added_tokens") or []
        if any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added):
            return None
        try:
            encoder = cls(backend, {t["content"]: t["id"] for t in added})
        except StopIteration:  # a post-processor that does not keep the text's ids together
            return None
        texts = [*PROBES, "".join(t["content"] + " x " for t in added[:8]) + PROBES[0]]
        for specials in (False, True):
            mine = [encoder.encode(text, specials) for text in texts]
            if mine != [e.ids for e in backend.encode_batch(texts, add_special_tokens=specials)]:
                return None
        return encoder

    def encode(self, text: str, specials: bool) -> list[int] | None:
        if not text.isascii():
            return None
        if len(self.pieces) > MAX_PIECES:
            self.pieces.clear()
        if self.added_pattern is None or self.added_pattern.search(text) is None:
            ids = self._plain(text)
        else:
            ids, start = [], 0
            for match in self.added_pattern.finditer(text):
                ids += self._plain(text[start : match.start()])
                ids.append(self.added[match.group()])
                start = match.end()
            ids += self._plain(text[start:])
        return self.prefix + ids + self.suffix if specials else ids

    def _plain(self, text: str) -> list[int]:
        return list(chain.from_iterable(map(self.pieces.__getitem__, BYTE_LEVEL.findall(text))))
