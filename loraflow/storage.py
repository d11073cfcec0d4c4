"""Object storage behind one small interface: a local directory (file://) or any S3 endpoint
(s3://bucket/prefix through boto3: AWS, MinIO, Ceph, moto).

A push uploads every file, then the manifest of SHA-256 per file last: a version directory
with a manifest is complete; one without is not. Re-pushing identical files uploads nothing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from loraflow.lineage import file_manifest, sha256_file

MANIFEST = "manifest.json"


class StoragePermanentError(RuntimeError):
    """A storage error that retrying cannot fix (no such bucket, bad credentials)."""


class ObjectStore(Protocol):
    root: str

    def put(self, local: Path, key: str, sha256: str) -> bool:
        """Upload unless an object with this SHA-256 is there; True when bytes were sent."""

    def get(self, key: str, local: Path) -> None: ...

    def read_json(self, key: str) -> Any: ...


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.base = Path(root)
        self.root = self.base.as_uri()

    def put(self, local: Path, key: str, sha256: str) -> bool:
        target = self.base / key
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

    def get(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.base / key, local)

    def read_json(self, key: str) -> Any:
        return json.loads((self.base / key).read_text(encoding="utf-8"))


class S3Store:
    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.root = f"s3://{bucket}/{self.prefix}".rstrip("/")
        # boto3 retries throttling and 5xx itself; the push task adds its own backoff on top.
        self.client = boto3.client(
            "s3", endpoint_url=endpoint_url, config=Config(retries={"max_attempts": 3})
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, local: Path, key: str, sha256: str) -> bool:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            if head.get("Metadata", {}).get("sha256") == sha256:
                return False
        except ClientError as exc:
            if exc.response["Error"]["Code"] not in ("404", "NoSuchKey", "NotFound"):
                raise _classify(exc, self.bucket) from exc
        try:
            # upload_file switches to multipart for large files on its own.
            self.client.upload_file(
                str(local), self.bucket, self._key(key), ExtraArgs={"Metadata": {"sha256": sha256}}
            )
        except S3UploadFailedError as exc:  # wraps the ClientError that says why
            raise _classify(exc.__cause__ or exc.__context__ or exc, self.bucket) from exc
        return True

    def get(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        self.client.download_file(self.bucket, self._key(key), str(local))

    def read_json(self, key: str) -> Any:
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        return json.loads(body)


def _classify(exc: Exception, bucket: str) -> Exception:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    if code in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return StoragePermanentError(
            f"object storage refused the request ({code}) for bucket {bucket!r}. Fix: check that "
            "the bucket exists and the AWS credentials in the environment may write to it."
        )
    return exc


def open_store(root: str, endpoint_url: str | None = None) -> ObjectStore:
    parsed = urlparse(root)
    if parsed.scheme == "file":
        return LocalStore(Path(parsed.path))
    if parsed.scheme == "s3":
        return S3Store(parsed.netloc, parsed.path, endpoint_url)
    raise ValueError(f"storage root {root!r}: expected file:///path or s3://bucket/prefix")


def push_tree(
    store: ObjectStore,
    dirs: dict[str, Path],
    prefix: str,
    extra: dict[str, Any],
    progress: Callable[[str], None] = lambda key: None,
) -> dict[str, Any]:
    """Upload each directory under prefix/<name>/, then prefix/manifest.json; return it."""
    files: dict[str, str] = {}
    uploaded = 0
    for name, local_dir in dirs.items():
        for rel, digest in file_manifest(local_dir).items():
            key = f"{name}/{rel}"
            files[key] = digest
            progress(key)
            uploaded += store.put(Path(local_dir) / rel, f"{prefix}/{key}", digest)
    manifest = {**extra, "files": files}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MANIFEST
        path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        store.put(path, f"{prefix}/{MANIFEST}", sha256_file(path))
    return {"manifest": manifest, "uploaded": uploaded, "uri": f"{store.root}/{prefix}"}
