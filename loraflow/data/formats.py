"""Reading instruction data in the formats users keep it in, streamed with bounded memory.

A source is a local path or an s3:// URI: JSON Lines (.jsonl, .jsonl.gz, .jsonl.zst), a JSON
array of records (.json), Parquet (.parquet), CSV/TSV with a header row (.csv, .tsv), or a
`datasets` folder written by `save_to_disk` (Arrow IPC stream files listed in its state.json;
read with pyarrow, `datasets` itself is not needed). Each yields its items in order, where an
item is (number, raw, payload): a JSON line as bytes (number: its line; payload None when over
max_line_bytes), or a record already decoded as a dict (number: its row, or for .json the line
where it starts). The bytes of every file are hashed as they are read (compressed files as
stored), which is what caching and lineage key on.

Before any item, `diagnose` looks at the first bytes of a file and names, in one message, a
file that cannot be what its name says: empty, UTF-16/32, binary, compressed under another
name, a JSON array or a CSV/TSV table named .jsonl; with the command that fixes it.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import io
import json
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

import orjson

HEAD = 1 << 16  # bytes looked at by diagnose()
READ = 1 << 20  # bytes read at a time
BATCH = 2048  # rows decoded together from Parquet/Arrow

Item = tuple[int, bytes | dict[str, Any], bytes | dict[str, Any] | None]

SUFFIXES = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".jsonl.gz": "jsonl.gz", ".ndjson.gz": "jsonl.gz",
    ".jsonl.zst": "jsonl.zst", ".ndjson.zst": "jsonl.zst", ".json": "json",
    ".parquet": "parquet", ".csv": "csv", ".tsv": "tsv",
}  # fmt: skip
ROW_FORMATS = ("parquet", "csv", "tsv", "arrow")  # located by row, not line

MAGIC = (  # (leading bytes, what the file is, the suffix it should have or None)
    (b"\x1f\x8b", "gzip-compressed", ".jsonl.gz"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", ".jsonl.zst"),
    (b"PAR1", "a Parquet file", ".parquet"),
    (b"BZh", "bzip2-compressed", None),
    (b"\xfd7zXZ\x00", "xz-compressed", None),
    (b"PK\x03\x04", "a zip archive", None),
    (b"ARROW1", "an Arrow IPC file", None),
    (b"\xff\xff\xff\xff", "an Arrow IPC stream", None),
)
BOMS = (  # longest first: the UTF-32 LE mark starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


class FileProblem(ValueError):
    """A whole file is not what its name says; the message names it and says the fix."""


def source_format(source: str) -> str:
    """The format a source's name says, "arrow" for a folder (save_to_disk)."""
    name = PurePosixPath(source.removeprefix("s3://")).name.lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return SUFFIXES[suffix]
    if source.startswith("s3://"):
        return "arrow" if source.endswith("/") or "." not in name else "unknown"
    return "arrow" if Path(source).is_dir() else "unknown"


# --- whole-file diagnosis ---------------------------------------------------------------


def diagnose(source: str, head: bytes, size: int, fmt: str) -> str | None:
    """What is wrong with the whole file whose first bytes are `head`, or None."""
    if size == 0:
        return f"{source} is empty (0 bytes). Fix: point the split at the file with the " \
            "examples, or leave this one out."
    magic = _magic(head)
    if fmt in ("jsonl.gz", "jsonl.zst"):
        want = "gzip-compressed" if fmt == "jsonl.gz" else "zstd-compressed"
        if magic is None or magic[1] != want:
            what = magic[1] if magic else _kind_words(head)
            fix = f"mv {source} {_renamed(source, magic[2] if magic and magic[2] else '.jsonl')}"
            return f"{source} is named {fmt.removeprefix('jsonl')} but is {what}, not " \
                f"{want}. Fix: {fix}"
        inner, ended = _decompressed_head(head, fmt)
        if not inner and ended:
            return f"{source} decompresses to nothing (0 bytes). Fix: point the split at " \
                "the file with the examples."
        if not inner:
            if size > len(head):
                return None  # nothing out of the first bytes yet: left to the reading
            return f"{source} cannot be decompressed: it is damaged or cut short. Fix: copy " \
                "it again"
        head = inner
        magic = _magic(head)
        if magic is not None:
            return f"{source} holds {magic[1]} data inside its compression, not JSON Lines. " \
                "Fix: decompress it and store the inner file under its own extension."
    elif fmt == "parquet":
        if not head.startswith(b"PAR1"):
            what = magic[1] if magic else _kind_words(head)
            if magic and magic[2]:
                fix = f"mv {source} {_renamed(source, magic[2])}"
            elif head.lstrip()[:1] == b"{":
                fix = f"mv {source} {_renamed(source, '.jsonl')} (it looks like JSON Lines)"
            else:
                fix = "point the split at a Parquet file, or rename the file after its format"
            return f"{source} is named .parquet but is {what} (no PAR1 magic). Fix: {fix}"
        return None
    elif magic is not None:
        fix = (
            f"mv {source} {_renamed(source, magic[2])}"
            if magic[2]
            else "decompress or convert it to JSON Lines, JSON, CSV or Parquet"
        )
        return f"{source} is {magic[1]}, not text as its name says. Fix: {fix}"
    kind = _text_kind(head)
    if kind is not None and kind != "UTF-8":
        if kind == "binary":
            return f"{source} is a binary file, not text (NUL or control bytes in its first " \
                f"{min(len(head), HEAD)} bytes). Fix: point the split at a JSON Lines, JSON, " \
                "CSV, TSV or Parquet file, or a save_to_disk folder."
        return f"{source} is {kind} text, not UTF-8. Fix: iconv -f {_iconv_name(kind)} -t " \
            f"UTF-8 {source} > {_renamed(source, '.utf8' + _suffix(source))} and use that file."
    if fmt.startswith("jsonl") and _looks_like_array(head):
        return f"{source} is a JSON array of records, not JSON Lines (one object per line). " \
            f"Fix: mv {source} {_renamed(source, '.json')} (read as an array), or " \
            f"jq -c '.[]' {source} > {_renamed(source, '.lines.jsonl')}"
    if fmt.startswith("jsonl") and (table := _table_kind(head)):
        suffix, header = table
        return f"{source} is a {suffix[1:].upper()} table (header row: {header}), not JSON " \
            f"Lines (one object per line). Fix: mv {source} {_renamed(source, suffix)} (read " \
            "as a table with a header row)"
    return None


def _magic(head: bytes) -> tuple[bytes, str, str | None] | None:
    return next((m for m in MAGIC if head.startswith(m[0])), None)


def _text_kind(head: bytes) -> str | None:
    """'UTF-8', 'UTF-16 ...', 'UTF-32 ...' or 'binary' for text-or-not, None when empty."""
    if not head:
        return None
    for bom, name in BOMS:
        if head.startswith(bom):
            return f"{name} (byte-order mark {bom.hex(' ').upper()})"
    sample = head[:4096]
    if b"\x00" in sample:
        n = len(sample)
        by_lane = [sample[i::4].count(0) / max(1, len(sample[i::4])) for i in range(4)]
        if n >= 8 and min(by_lane[1:]) > 0.9 and by_lane[0] < 0.1:
            return "UTF-32 (little-endian, no byte-order mark)"
        if n >= 8 and min(by_lane[:3]) > 0.9 and by_lane[3] < 0.1:
            return "UTF-32 (big-endian, no byte-order mark)"
        even, odd = sample[0::2].count(0) / (n / 2), sample[1::2].count(0) / (n / 2)
        if odd > 0.6 and even < 0.1:
            return "UTF-16 (little-endian, no byte-order mark)"
        if even > 0.6 and odd < 0.1:
            return "UTF-16 (big-endian, no byte-order mark)"
        if sample.count(0) > max(8, n // 100):  # a stray NUL or two: left to the line checks
            return "binary"
    control = sum(sample.count(bytes([c])) for c in range(32) if c not in (9, 10, 12, 13))
    if control > 0.1 * len(sample):
        return "binary"
    try:  # the cut at the end of the sample may split a character
        sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(sample) - 4 and _not_utf8_share(sample) > 0.3:
            return "binary"
        # every line with a byte over 127 broken: the whole file is in an 8-bit encoding (one
        # bad line among good ones is left to the line-by-line check)
        lines = [ln for ln in sample.split(b"\n")[:-1] if not ln.isascii()]
        if len(lines) >= 2 and all(not _utf8(ln) for ln in lines):
            return "Windows-1252 or Latin-1 (8-bit)"
    return "UTF-8"


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _kind_words(head: bytes) -> str:
    kind = _text_kind(head)
    return "binary" if kind == "binary" else f"{kind} text" if kind else "empty"


def _iconv_name(kind: str) -> str:
    """iconv's name of the encoding _text_kind found."""
    if kind.startswith("Windows-1252"):
        return "WINDOWS-1252"
    name = kind.split()[0]
    if "little-endian" in kind:
        return name + "LE"
    if "big-endian" in kind:
        return name + "BE"
    return name


def _not_utf8_share(sample: bytes) -> float:
    text = sample.decode("utf-8", "replace")
    return text.count("\ufffd") / max(1, len(text))


def _looks_like_array(head: bytes) -> bool:
    first = head.lstrip(b"\xef\xbb\xbf \t\r\n").split(b"\n", 1)[0].strip()
    return first == b"[" or first.startswith((b"[{", b"[ {"))


def _table_kind(head: bytes) -> tuple[str, str] | None:
    """(".csv" or ".tsv", the header's first cells) when the first lines are a table with a
    header row rather than JSON objects: no line starts with `{` and every line splits into
    the header's number (2 or more) of cells."""
    lines = head.decode("utf-8", "replace").lstrip("\ufeff").splitlines()
    if len(head) >= HEAD:  # the last line may be cut short
        lines = lines[:-1]
    lines = [ln for ln in lines if ln.strip()][:20]
    if len(lines) < 2 or any(ln.lstrip().startswith(("{", "[")) for ln in lines):
        return None
    for delimiter, suffix in (("\t", ".tsv"), (",", ".csv")):
        rows = list(csv.reader(lines, delimiter=delimiter))
        width = len(rows[0])
        if width >= 2 and all(len(row) == width for row in rows):
            header = ", ".join(rows[0][:4]) + (", ..." if width > 4 else "")
            return suffix, header
    return None


def _decompressed_head(head: bytes, fmt: str) -> tuple[bytes, bool]:
    """(what the first bytes decompress to, whether the compressed stream ended there)."""
    try:
        if fmt == "jsonl.gz":
            gz = zlib.decompressobj(wbits=31)
            return gz.decompress(head, HEAD), gz.eof
        import zstandard

        zst = zstandard.ZstdDecompressor().decompressobj()
        return zst.decompress(head)[:HEAD], zst.eof
    except Exception as exc:  # noqa: BLE001 - zlib's or zstandard's error: a broken file
        raise FileProblem(
            f"cannot be decompressed as {fmt} ({exc}): it is damaged. Fix: copy it again "
            f"(check it with {'gzip' if fmt == 'jsonl.gz' else 'zstd'} -t)"
        ) from None


def _suffix(source: str) -> str:
    name = PurePosixPath(source).name
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), "")


def _renamed(source: str, suffix: str) -> str:
    """The source's name with `suffix` instead of its own data suffix (.jsonl, .json, ...)."""
    own = _suffix(source)
    return (source[: len(source) - len(own)] if own else source) + suffix


# --- streams ----------------------------------------------------------------------------


class Hashing(io.RawIOBase):
    """A binary stream read through, its bytes fed to `digest` and to `seen(n)` (progress)."""

    def __init__(self, stream: IO[bytes], digest: Any, seen: Callable[[int], Any]) -> None:
        self.stream, self.digest, self.seen = stream, digest, seen

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.stream.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        if n:
            self.digest.update(data)
            self.seen(n)
        return n


class Prefetch(io.RawIOBase):
    """A stream read ahead by a second thread, a few blocks at most: decompression (zlib and
    zstd release the GIL) overlaps the validation of the lines before, so a compressed file
    costs no more wall time per record than a plain one on a machine with a core to spare."""

    def __init__(self, stream: IO[bytes], blocks: int = 4) -> None:
        import queue
        import threading

        self.queue: queue.Queue[bytes | BaseException] = queue.Queue(blocks)
        self.stopped = threading.Event()
        self.pending = b""
        self.thread = threading.Thread(target=self._fill, args=(stream,), daemon=True,
                                       name="loraflow-decompress")
        self.thread.start()

    def _fill(self, stream: IO[bytes]) -> None:
        try:
            while not self.stopped.is_set():
                block = stream.read(READ)
                self._put(block)
                if not block:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, raised there
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> None:
        import queue

        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self.pending:
            item = self.queue.get()
            if isinstance(item, BaseException):
                raise item
            self.pending = item
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        super().close()


def _binary(stream: IO[bytes], fmt: str) -> IO[bytes]:
    """The decompressed bytes of a JSON Lines file, buffered for fast line iteration."""
    if fmt == "jsonl.gz":
        inner: IO[bytes] = gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[arg-type]
    elif fmt == "jsonl.zst":
        import zstandard

        inner = zstandard.ZstdDecompressor().stream_reader(stream, read_size=READ)
    else:
        return stream
    return io.BufferedReader(Prefetch(inner), READ)


def jsonl_items(
    stream: IO[bytes], fmt: str, max_line_bytes: int, source: str = ""
) -> Iterator[Item]:
    """JSON lines of a (possibly compressed) stream; blank lines as payload b""."""
    number, broken = 0, (EOFError, OSError, zlib.error)
    if fmt == "jsonl.zst":
        import zstandard

        broken += (zstandard.ZstdError,)
    lines = _binary(stream, fmt)
    try:
        for number, raw in enumerate(lines, start=1):
            line = raw.removeprefix(b"\xef\xbb\xbf") if number == 1 else raw
            line = line.rstrip(b"\r\n")
            yield number, raw, line if len(line) <= max_line_bytes else None
    except broken as exc:  # a cut or damaged compressed stream
        raise FileProblem(
            f"{source}: cannot be decompressed after line {number} ({exc}): it is damaged or "
            "cut short. Fix: copy it again"
        ) from None
    finally:
        if lines is not stream:
            lines.close()  # the read-ahead thread stops


def json_array_items(stream: IO[bytes], source: str) -> Iterator[Item]:
    """The elements of a JSON array, one at a time: a window of text at least as long as the
    element being decoded is kept, never the whole file. The number is the line the element
    starts on; an element that is not JSON ends the file (FileProblem: nothing after it can be
    found again)."""
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")  # type: ignore[arg-type]
    decode = json.JSONDecoder().raw_decode
    buf, pos, line, eof, want = "", 0, 1, False, READ

    def fill() -> None:
        nonlocal buf, pos, eof
        try:
            more = text.read(want)
        except UnicodeDecodeError as exc:
            raise FileProblem(f"{source}: not valid UTF-8 near line {line} ({exc.reason})") \
                from None
        if not more:
            eof = True
        buf, pos = buf[pos:] + more, 0

    def skip_space() -> str:
        nonlocal pos, line
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                line += buf[pos] == "\n"
                pos += 1
            if pos < len(buf) or eof:
                return buf[pos] if pos < len(buf) else ""
            fill()

    def expected(what: str) -> FileProblem:
        found = repr(buf[pos : pos + 20]) if pos < len(buf) else "the end of the file"
        return FileProblem(f"{source}:{line}: expected {what} in the JSON array, found {found}. "
                           "Fix: the file must be one JSON array of objects, [{...}, {...}]; "
                           "for one object per line, name it .jsonl")

    fill()
    if skip_space() != "[":
        raise expected("'[' (the array's start)")
    pos += 1
    first = True
    while True:
        c = skip_space()
        if c == "]":
            pos += 1
            if skip_space():
                raise expected("nothing after the array")
            return
        if not first:
            if c != ",":
                raise expected("',' or ']'")
            pos += 1
            skip_space()
        first = False
        while True:
            try:
                value, end = decode(buf, pos)
                if end < len(buf) or eof:  # a number cut at the window's end would decode
                    break
            except json.JSONDecodeError as exc:
                if eof:
                    raise FileProblem(
                        f"{source}:{line + buf.count(chr(10), pos, exc.pos)}: not JSON "
                        f"({exc.msg}); the rest of "
                        "the array cannot be read. Fix that element and run again."
                    ) from None
            want = min(want * 2, 1 << 30)
            fill()
        start = line
        line += buf.count("\n", pos, end)
        pos = end
        want = READ
        yield start, value, value


def csv_items(
    stream: IO[bytes], source: str, delimiter: str, messages: str = "messages"
) -> Iterator[Item]:
    """Rows of a CSV/TSV file with a header row, as {column: text}; rows numbered from 1 after
    the header. Empty cells are left out (missing); a cell of the `messages` column holding a
    JSON list is decoded."""
    csv.field_size_limit(min(sys.maxsize, 1 << 31))
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")  # type: ignore[arg-type]
    reader = csv.reader(text, delimiter=delimiter)
    row_number = 0
    try:
        header = next(reader, None)
        if header is None:
            return
        for row_number, row in enumerate(reader, start=1):
            if not any(row):
                continue
            # an empty cell is a missing value, as a null is in Parquet
            record = {k: v for k, v in zip(header, row, strict=False) if v != ""}
            cell = record.get(messages)
            if cell and cell.lstrip()[:1] == "[":
                with contextlib.suppress(orjson.JSONDecodeError):  # else: the wrong type
                    record[messages] = orjson.loads(cell)
            yield row_number, record, record
    except UnicodeDecodeError as exc:
        raise FileProblem(f"{source}: not valid UTF-8 after row {row_number} ({exc.reason}). "
                          "Fix: iconv -f <its encoding> -t UTF-8") from None
    except csv.Error as exc:
        raise FileProblem(f"{source}: row {row_number + 1} is not valid CSV ({exc})") from None


def arrow_batches_items(batches: Iterator[Any], columns: list[str] | None) -> Iterator[Item]:
    """Rows of Arrow record batches as dicts, numbered from 1."""
    number = 0
    for batch in batches:
        if columns is not None:
            batch = batch.select(columns)
        for record in batch.to_pylist():
            number += 1
            yield number, record, record


def parquet_file(stream: IO[bytes]) -> Any:
    import pyarrow.parquet as pq

    return pq.ParquetFile(stream)


def arrow_stream(stream: IO[bytes]) -> Any:
    import pyarrow as pa

    return pa.ipc.open_stream(stream)


def wanted_columns(names: list[str], mapped: set[str]) -> list[str] | None:
    """The columns to read of a columnar file: the mapped ones it has (None: it has none)."""
    found = [n for n in names if n in mapped]
    return found or None


def no_columns(source: str, names: list[str], mapped: dict[str, str]) -> str:
    shown = ", ".join(repr(n) for n in names[:12]) or "none"
    ours = ", ".join(sorted(set(mapped.values())))
    return (
        f"{source} has none of the columns {ours} (its columns: {shown}). Fix: map yours "
        "with data.columns, e.g. data.columns={instruction: question, output: answer}."
    )
