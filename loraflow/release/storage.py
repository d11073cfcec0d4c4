"""Object storage behind one small interface: a local directory (file://) or any S3 endpoint
(s3://bucket/prefix through boto3: AWS, MinIO, Ceph, moto).

A push uploads every file, then the manifest of SHA-256 per file last: a version directory
with a manifest is complete; one without is not. Re-pushing identical files uploads nothing.
On S3, large files go up in parts, and every object's SHA-256 checksum, computed by the server,
is compared with the local one after upload. A pull downloads and re-hashes every file.
Credentials come from boto3's usual chain and are never logged or put in a message.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from loraflow.data.sources import s3_client
from loraflow.hashing import file_manifest, sha256_file

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
MB = 1 << 20
Progress = Callable[[int], None]  # called with a number of bytes done


class StoragePermanentError(RuntimeError):
    """A storage error that retrying cannot fix (no such bucket, bad credentials)."""


class StorageIntegrityError(OSError):
    """Stored bytes do not hash to what the manifest says (an OSError: a re-upload may fix it)."""


class StorageUnreachableError(OSError):
    """The S3 endpoint does not answer (an OSError: transient, the push task retries it)."""


class UnsafeKeyError(StoragePermanentError):
    """A key that would reach outside its root: absolute, with `..`, or through a symlink."""


def check_key(key: str, where: str) -> str:
    """key, if it is a plain relative path of named parts ("model/config.json"); else
    UnsafeKeyError naming where it came from. Every key a store reads or writes passes here:
    a manifest from the store is as trustworthy as the store, no more."""
    parts = key.split("/") if isinstance(key, str) else [""]
    if (
        not isinstance(key, str)
        or key.startswith("/")
        or "\\" in key
        or "\0" in key
        or any(part in ("", ".", "..") for part in parts)
        or re.match(r"[A-Za-z]:", key)
    ):
        raise UnsafeKeyError(
            f"{where}: refused key {key!r}: keys must be relative paths without '..', '.', "
            "empty parts, backslashes or a leading '/'. The manifest (or the name it was built "
            "from) was tampered with or is broken; nothing was written outside its directory. "
            "Fix: push the version again from a trusted copy."
        )
    return key


def inside(base: Path, key: str, where: str) -> Path:
    """base / key after check_key, refused if it resolves (symlinks followed) outside base."""
    target = Path(base) / check_key(key, where)
    if not target.resolve().is_relative_to(Path(base).resolve()):
        raise UnsafeKeyError(
            f"{where}: refused key {key!r}: {target} resolves to {target.resolve()}, outside "
            f"{Path(base).resolve()} (a symbolic link on the way). Fix: remove the link."
        )
    return target


class ObjectStore(Protocol):
    root: str

    def check(self) -> None:
        """Reachable, with credentials that work (raises the storage errors above)."""

    def put(self, local: Path, key: str, sha256: str, progress: Progress | None = None) -> bool:
        """Upload unless an object with this SHA-256 is there; True when bytes were sent."""

    def get(self, key: str, local: Path) -> None: ...

    def read_json(self, key: str) -> Any: ...


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.base = Path(root)
        self.root = self.base.as_uri()

    def put(self, local: Path, key: str, sha256: str, progress: Progress | None = None) -> bool:
        target = inside(self.base, key, self.root)
        if progress:
            progress(Path(local).stat().st_size)
        if target.is_file() and sha256_file(target) == sha256:
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        with (
            open(local, "rb") as src,
            tempfile.NamedTemporaryFile(dir=target.parent, delete=False, prefix=".part-") as tmp,
        ):
            shutil.copyfileobj(src, tmp, 1 << 20)
        Path(tmp.name).replace(target)  # atomic within one filesystem
        return True

    def check(self) -> None:
        """Nothing to reach: a local directory (created by the first put)."""

    def get(self, key: str, local: Path) -> None:
        source = inside(self.base, key, self.root)
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, local)

    def read_json(self, key: str) -> Any:
        return json.loads(inside(self.base, key, self.root).read_text(encoding="utf-8"))


class S3Store:
    def __init__(
        self,
        bucket: str,
        prefix: str,
        endpoint_url: str | None,
        multipart_threshold_mb: int = 64,
        multipart_chunk_mb: int = 64,
    ) -> None:
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.root = f"s3://{bucket}/{self.prefix}".rstrip("/")
        # boto3 retries throttling, 5xx and dropped connections itself (3 attempts); the push
        # task adds its own backoff on top. Permanent errors (403, no bucket) are not retried.
        self.client = s3_client(endpoint_url, config=Config(retries={"max_attempts": 3}))
        # the endpoint in use: given, else $AWS_ENDPOINT_URL, else AWS's (recorded on push)
        self.endpoint = self.client.meta.endpoint_url
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold_mb * MB,
            multipart_chunksize=multipart_chunk_mb * MB,
        )

    def _key(self, key: str) -> str:
        check_key(key, self.root)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, local: Path, key: str, sha256: str, progress: Progress | None = None) -> bool:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        size = Path(local).stat().st_size
        try:
            head = self._head(key)
            if head and self._matches(head, local, sha256, size):
                if progress:
                    progress(size)
                return False
            # upload_file goes multipart above the threshold, parts uploaded in parallel; the
            # server computes a SHA-256 checksum of every part, verified below.
            self.client.upload_file(
                str(local),
                self.bucket,
                self._key(key),
                ExtraArgs={"Metadata": {"sha256": sha256}, "ChecksumAlgorithm": "SHA256"},
                Config=self.transfer,
                Callback=progress,
            )
            self._verify(local, key, sha256, size)
        except S3UploadFailedError as exc:  # wraps the ClientError that says why
            raise _classify(exc.__cause__ or exc.__context__ or exc, self.bucket) from exc
        except (ClientError, BotoCoreError) as exc:
            self._raise_clear(exc)
            raise
        return True

    def check(self) -> None:
        """The bucket answers with these credentials: a clear error now, not after training."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchBucket"):
                raise StoragePermanentError(
                    f"bucket {self.bucket!r} does not exist at {self.endpoint} ({self.root}). "
                    "Fix: create it, or set storage.root to an existing bucket."
                ) from exc
            self._raise_clear(exc)
            raise

    def _raise_clear(self, exc: BaseException) -> None:
        """A refused or unreachable request as an error that says what to fix; else return."""
        from botocore.exceptions import ConnectionClosedError, EndpointConnectionError

        if isinstance(exc, EndpointConnectionError | ConnectionClosedError):
            raise StorageUnreachableError(
                f"object storage at {self.endpoint} cannot be reached ({self.root}). Fix: start "
                "the S3 server, or point storage.endpoint_url (or AWS_ENDPOINT_URL) at it."
            ) from exc
        _raise_permanent(exc, self.bucket)

    def _head(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(
                Bucket=self.bucket, Key=self._key(key), ChecksumMode="ENABLED"
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def _matches(self, head: dict[str, Any], local: Path, sha256: str, size: int) -> bool:
        """The stored object is this file: same size, same SHA-256 metadata and, where the
        server reports one, the server's own SHA-256 of the bytes it holds."""
        if head["ContentLength"] != size or head.get("Metadata", {}).get("sha256") != sha256:
            return False
        stored = head.get("ChecksumSHA256")
        if stored is None:
            return True
        stored = stored.split("-")[0]  # AWS marks a multipart checksum with -<parts>
        whole = base64.b64encode(bytes.fromhex(sha256)).decode()
        return stored == whole or stored == self._composite(local, size)

    def _verify(self, local: Path, key: str, sha256: str, size: int) -> None:
        """After an upload the server's SHA-256 of what it stored must be ours: the whole
        file's, or for a multipart upload the SHA-256 of the parts' SHA-256s."""
        head = self._head(key)
        if head is None:
            raise StorageIntegrityError(f"{self.root}/{key} is missing right after its upload")
        if head.get("ChecksumSHA256") is None:  # older Ceph, some MinIO set-ups
            log.warning("%s reports no SHA-256 checksum; verified by size only", self.endpoint)
        if not self._matches(head, local, sha256, size):
            raise StorageIntegrityError(
                f"{self.root}/{key}: the server's SHA-256 ({head.get('ChecksumSHA256')}) or size "
                f"({head['ContentLength']} bytes) is not that of {local} ({size} bytes); the "
                "upload was corrupted. A retry uploads it again."
            )

    def _composite(self, local: Path, size: int) -> str:
        from s3transfer.utils import ChunksizeAdjuster

        chunk = ChunksizeAdjuster().adjust_chunksize(self.transfer.multipart_chunksize, size)
        digest = hashlib.sha256()
        with open(local, "rb") as f:
            while part := f.read(chunk):
                digest.update(hashlib.sha256(part).digest())
        return base64.b64encode(digest.digest()).decode()

    def get(self, key: str, local: Path) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, self._key(key), str(local))
        except (ClientError, BotoCoreError) as exc:
            self._raise_clear(exc)
            raise

    def read_json(self, key: str) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            self._raise_clear(exc)
            raise
        return json.loads(body)


PERMANENT_CODES = (
    "NoSuchBucket",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidBucketName",
    "403",  # a HEAD request's refusal carries no error body, only the status
)


def _classify(exc: BaseException, bucket: str) -> BaseException:
    """Permanent refusals become StoragePermanentError (not retried); the rest stays as is."""
    from botocore.exceptions import NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return StoragePermanentError(
            "no AWS credentials found for object storage. Fix: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (in the environment or the file $LORAFLOW_CREDENTIALS_FILE "
            "names), AWS_PROFILE, or run where an instance role applies."
        )
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    if code in PERMANENT_CODES:
        return StoragePermanentError(
            f"object storage refused the request ({code}) for bucket {bucket!r}. Fix: check that "
            "the bucket exists and that AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (from the "
            "environment or $LORAFLOW_CREDENTIALS_FILE) are the S3 server's keys for it."
        )
    return exc


def _raise_permanent(exc: BaseException, bucket: str) -> None:
    """Raise the StoragePermanentError for exc if it is one; otherwise return."""
    mapped = _classify(exc, bucket)
    if mapped is not exc:
        raise mapped from exc


def open_store(
    root: str,
    endpoint_url: str | None = None,
    multipart_threshold_mb: int = 64,
    multipart_chunk_mb: int = 64,
) -> ObjectStore:
    parsed = urlparse(root)
    if parsed.scheme == "file":
        return LocalStore(Path(parsed.path))
    if parsed.scheme == "s3":
        return S3Store(
            parsed.netloc, parsed.path, endpoint_url, multipart_threshold_mb, multipart_chunk_mb
        )
    raise ValueError(f"storage root {root!r}: expected file:///path or s3://bucket/prefix")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}/{key}" if prefix else key


def push_tree(
    store: ObjectStore,
    dirs: dict[str, Path],
    prefix: str,
    extra: dict[str, Any],
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Upload each directory under prefix/<name>/, then prefix/manifest.json; return it.

    progress is called with bytes done (skipped files count as done)."""
    if prefix:
        check_key(prefix, f"push to {store.root}")
    files: dict[str, str] = {}
    uploaded = 0
    for name, local_dir in dirs.items():
        for rel, digest in file_manifest(local_dir).items():
            key = check_key(f"{name}/{rel}", f"push of {local_dir}")
            files[key] = digest
            uploaded += store.put(Path(local_dir) / rel, _join(prefix, key), digest, progress)
    manifest = {**extra, "files": files}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MANIFEST
        path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        store.put(path, _join(prefix, MANIFEST), sha256_file(path))
    return {"manifest": manifest, "uploaded": uploaded, "uri": f"{store.root}/{prefix}"}


def pull_tree(store: ObjectStore, prefix: str, dest: Path, under: str = "") -> dict[str, Any]:
    """Download a pushed version into dest and verify every file against its manifest's SHA-256.
    Files already in dest with the right hash are kept; a mismatch stops with the file named.
    under: only the files whose key starts with it (one export, "exports/gguf-f16/")."""
    if prefix:
        check_key(prefix, f"pull from {store.root}")
    manifest = store.read_json(_join(prefix, MANIFEST))
    dest = Path(dest)
    where = f"{store.root}/{_join(prefix, MANIFEST)}"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise StorageIntegrityError(f"{where}: no 'files' mapping; push the version again")
    files = {key: digest for key, digest in files.items() if key.startswith(under)}
    if not files:
        raise StorageIntegrityError(f"{where}: no file under {under!r} in this version")
    for key in files:  # every key checked before any byte is written
        inside(dest, key, where)
    downloaded = 0
    for key, digest in sorted(files.items()):
        target = inside(dest, key, where)  # again: a link made by an earlier file counts
        if target.is_file() and sha256_file(target) == digest:
            continue
        partial = target.with_name(target.name + ".partial")
        store.get(_join(prefix, key), partial)
        got = sha256_file(partial)
        if got != digest:
            partial.unlink()
            raise StorageIntegrityError(
                f"{store.root}/{_join(prefix, key)}: downloaded bytes hash to {got}, the "
                f"manifest says {digest}. The stored copy is corrupt; push the version again."
            )
        partial.replace(target)
        downloaded += 1
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return {"manifest": manifest, "downloaded": downloaded, "dest": str(dest)}
