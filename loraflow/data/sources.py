"""Where data comes from: local files, folders (save_to_disk) or s3:// objects, streamed,
fingerprinted by content, each checked whole before any record is read; the one place an S3
client is made (storage and the watcher use it too)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from loraflow.data import formats
from loraflow.data.records import SPLITS, DataError
from loraflow.hashing import sha256_file, sha256_tree


def source_size(source: str) -> int:
    if source.startswith("s3://"):
        bucket, key = split_s3_uri(source)
        return int(s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    return Path(source).stat().st_size


def split_s3_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def s3_client(endpoint_url: str | None = None, **options: Any) -> Any:
    """A boto3 S3 client; the endpoint from the argument, else AWS_ENDPOINT_URL, else AWS."""
    import boto3  # only when data lives in S3

    return boto3.client("s3", endpoint_url=endpoint_url, **options)


def join(folder: str, name: str) -> str:
    """A path or s3:// key inside a folder."""
    return folder.rstrip("/") + "/" + name


def dataset_files(source: str) -> list[str]:
    """The Arrow files of a save_to_disk folder (local or s3://), in its state.json's order."""
    try:
        with open_source(join(source, "state.json")) as f:
            state = json.loads(f.read())
        names = [entry["filename"] for entry in state["_data_files"]]
    except Exception as exc:  # noqa: BLE001 - missing, unreadable or another JSON: one message
        hint = ""
        if not source.startswith("s3://") and (Path(source) / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in Path(source).iterdir() if p.is_dir())
            hint = (f" It is a DatasetDict: point each split at its own folder "
                    f"({', '.join(join(source, s) for s in splits)}).")
        raise DataError(
            f"{source} is not a folder written by datasets' save_to_disk: no readable "
            f"state.json listing its Arrow files ({type(exc).__name__}: {exc}).{hint}"
        ) from None
    return [join(source, name) for name in names]


def source_fingerprint(source: str) -> str:
    """What identifies a source's bytes: the SHA-256 of a local file (a folder: of its files),
    the ETag and size of an S3 object (a HEAD request, nothing downloaded; a folder: of its
    state.json and Arrow files)."""
    if source.startswith("s3://"):
        if formats.source_format(source) == "arrow":
            return "|".join(map(source_fingerprint, [join(source, "state.json"),
                                                     *dataset_files(source)]))
        bucket, key = split_s3_uri(source)
        head = s3_client().head_object(Bucket=bucket, Key=key)
        return f"s3:{head['ETag']}:{head['ContentLength']}"
    path = Path(source)
    if path.is_dir():
        return sha256_tree(path)
    return sha256_file(path) if path.is_file() else f"missing:{source}"


@contextmanager
def open_source(source: str) -> Iterator[IO[bytes]]:
    """A binary stream of a local file or an s3:// object (read in chunks, never whole)."""
    if source.startswith("s3://"):
        bucket, key = split_s3_uri(source)
        body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        with tempfile.SpooledTemporaryFile(max_size=64 << 20) as spool:
            shutil.copyfileobj(body, spool, 1 << 20)
            spool.seek(0)
            yield spool  # type: ignore[misc]
    else:
        with open(source, "rb") as f:
            yield f


def head_of(source: str) -> tuple[bytes, int]:
    """(the first formats.HEAD bytes, the size) of a file, local or s3:// (a ranged GET)."""
    if source.startswith("s3://"):
        bucket, key = split_s3_uri(source)
        size = source_size(source)
        if size == 0:
            return b"", 0
        body = s3_client().get_object(Bucket=bucket, Key=key,
                                      Range=f"bytes=0-{formats.HEAD - 1}")
        return body["Body"].read(), size
    with open(source, "rb") as f:
        return f.read(formats.HEAD), Path(source).stat().st_size


def check_splits(section: Any, name: str = "data") -> None:
    """check_sources on a config section's train/validation/test (`data`, or `align`): what a
    run checks before it starts any work."""
    prefix = "" if name == "data" else f"{name}."
    check_sources({prefix + split: list(getattr(section, split)) for split in SPLITS})


def check_sources(sources: dict[str, list[str]]) -> None:
    """Every source exists and is what its name says, before any record is read: one
    DataError listing each file that is missing, empty, not UTF-8, binary, or compressed or
    shaped otherwise than its name says, each with its fix."""
    problems = []
    for split, srcs in sources.items():
        for src in srcs:
            fmt = formats.source_format(src)
            if not src.startswith("s3://") and not Path(src).exists():
                problems.append(f"  - {split}: {src} does not exist")
            elif fmt == "unknown":
                problems.append(
                    f"  - {split}: {src}: unknown format; name it .jsonl, .jsonl.gz, .jsonl.zst, "
                    ".json, .parquet, .csv or .tsv after what it holds, or point at a "
                    "save_to_disk folder"
                )
            elif fmt == "arrow":
                try:
                    dataset_files(src)
                except DataError as exc:
                    problems.append(f"  - {split}: {exc}")
            else:
                try:
                    problem = formats.diagnose(src, *head_of(src), fmt)
                except formats.FileProblem as exc:
                    problem = f"{src} {exc}"
                if problem:
                    problems.append(f"  - {split}: {problem}")
    if problems:
        raise DataError(
            "data files cannot be read:\n"
            + "\n".join(problems)
            + "\nSet data.train / data.validation / data.test to existing files (local paths "
            "or s3:// URIs): .jsonl, .jsonl.gz, .jsonl.zst, .json, .parquet, .csv, .tsv or a "
            "save_to_disk folder."
        )
