"""Where data comes from: local files or s3:// objects, streamed, fingerprinted by content;
the one place an S3 client is made (storage and the watcher use it too)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from loraflow.data.records import DataError
from loraflow.hashing import sha256_file


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


def source_fingerprint(source: str) -> str:
    """What identifies a source's bytes: the SHA-256 of a local file, the ETag and size of an
    S3 object (a HEAD request, nothing downloaded)."""
    if source.startswith("s3://"):
        bucket, key = split_s3_uri(source)
        head = s3_client().head_object(Bucket=bucket, Key=key)
        return f"s3:{head['ETag']}:{head['ContentLength']}"
    path = Path(source)
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


def check_sources(sources: dict[str, list[str]]) -> None:
    missing = [
        f"  - {split}: {src} does not exist"
        for split, srcs in sources.items()
        for src in srcs
        if not src.startswith("s3://") and not Path(src).is_file()
    ]
    if missing:
        raise DataError(
            "data files are missing:\n"
            + "\n".join(missing)
            + "\nFix: set data.train / data.validation / data.test to existing JSONL files "
            "(local paths or s3:// URIs)."
        )
