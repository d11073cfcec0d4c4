"""Notice new training data in a local directory or an s3:// prefix, once per content.

A file is reported when it is complete (its size stayed the same across two polls, or a
marker file `<name><marker>` exists beside it) and its SHA-256 was never reported before; the
hashes already reported live in a state file, so the same bytes never retrain twice, under any
name, across restarts. No Prefect here: the caller decides what a landing does (the
`loraflow watch` command emits a Prefect event that a deployment trigger turns into a run).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from loraflow.data.records import DataError
from loraflow.data.sources import open_source, s3_client, split_s3_uri

STATE_VERSION = 1
DATA_LANDED = "loraflow.data.landed"  # the Prefect event; prefect.yaml's trigger expects it
# Preference data users give back (reviewers' chosen/rejected pairs, thumbs up/down): `loraflow
# watch --feedback` emits this instead, and prefect.yaml starts an align-only run on the file.
FEEDBACK_LANDED = "loraflow.feedback.landed"


@dataclass(frozen=True)
class Landed:
    """A complete data file seen for the first time (by content)."""

    uri: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Listed:
    uri: str
    size: int
    version: str  # mtime or ETag: unchanged -> no need to hash again


class Watcher:
    def __init__(
        self,
        location: str,
        state_file: Path,
        pattern: str = "*.jsonl",
        marker: str | None = None,
    ) -> None:
        """location: a directory (created if missing) or an s3://bucket/prefix; pattern: which
        file names count; marker: a suffix (e.g. ".done") whose file says "complete"; None:
        wait for a size that is the same on two polls in a row."""
        if not location.startswith("s3://"):
            # absolute: the URI in an event must mean the same file to every worker
            location = str(Path(location).absolute())
            if Path(location).exists() and not Path(location).is_dir():
                raise FileNotFoundError(
                    f"watch location {location!r} is not a directory; give a directory "
                    "(created if missing) or an s3://bucket/prefix"
                )
            Path(location).mkdir(parents=True, exist_ok=True)
        self.location, self.pattern, self.marker = location, pattern, marker
        self.state_file = Path(state_file)
        self.state = self._load()

    def poll(
        self,
        on_landed: Callable[[Landed], object],
        on_copy: Callable[[Landed, str], object] | None = None,
    ) -> list[Landed]:
        """One look at the location; call on_landed for each new complete file, then remember
        its hash. If on_landed raises, that file is not remembered and comes again next poll.
        A complete file whose bytes were seen before under another name is a copy: recorded
        in the state's "copies" (uri -> the first uri) and passed to on_copy with that uri."""
        listing = self._list()
        names = {item.uri for item in listing}
        landed: list[Landed] = []
        try:
            self._scan(listing, names, on_landed, on_copy, landed)
        finally:  # what was emitted before a failure stays remembered
            self._save()
        return landed

    def _scan(
        self,
        listing: list[Listed],
        names: set[str],
        on_landed: Callable[[Landed], object],
        on_copy: Callable[[Landed, str], object] | None,
        landed: list[Landed],
    ) -> None:
        pending = self.state["pending"]
        for item in listing:
            if self.marker:
                if item.uri + self.marker not in names and not self._exists(item.uri + self.marker):
                    continue
            elif pending.get(item.uri) != [item.size, item.version]:
                pending[item.uri] = [item.size, item.version]  # changed since the last look
                continue
            known = self.state["files"].get(item.uri)
            if known and known[:2] == [item.size, item.version]:
                continue  # hashed before, unchanged
            sha256 = hash_source(item.uri)
            event = Landed(uri=item.uri, sha256=sha256, size=item.size)
            first = self.state["seen"].get(sha256)
            if first is None:
                on_landed(event)  # raises -> nothing recorded, the file comes again
                self.state["seen"][sha256] = item.uri
                landed.append(event)
            elif first != item.uri and item.uri not in self.state.setdefault("copies", {}):
                self.state["copies"][item.uri] = first
                if on_copy is not None:
                    on_copy(event, first)
            self.state["files"][item.uri] = [item.size, item.version, sha256]
        for uri in set(pending) - names:
            del pending[uri]

    def _list(self) -> list[Listed]:
        if self.location.startswith("s3://"):
            bucket, prefix = split_s3_uri(self.location.rstrip("/") + "/")
            pages = s3_client().get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix
            )
            return [
                Listed(f"s3://{bucket}/{obj['Key']}", obj["Size"], obj["ETag"])
                for page in pages
                for obj in page.get("Contents", [])
                if self._wanted(obj["Key"].rsplit("/", 1)[-1])
            ]
        return [
            Listed(str(path), stat.st_size, str(stat.st_mtime_ns))
            for path in sorted(Path(self.location).iterdir())
            if path.is_file() and self._wanted(path.name)
            for stat in [path.stat()]
        ]

    def _wanted(self, name: str) -> bool:
        return not name.startswith(".") and fnmatch.fnmatch(name, self.pattern)

    def _exists(self, uri: str) -> bool:
        if uri.startswith("s3://"):
            bucket, key = split_s3_uri(uri)
            return s3_client().list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)[
                "KeyCount"
            ] > 0
        return Path(uri).is_file()

    def _load(self) -> dict:
        if not self.state_file.is_file():
            return {"version": STATE_VERSION, "seen": {}, "files": {}, "pending": {},
                    "copies": {}}
        state = json.loads(self.state_file.read_text())
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"{self.state_file}: state version {state.get('version')!r}, expected "
                f"{STATE_VERSION}; move the file away to start watching afresh"
            )
        return state

    def _save(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1, sort_keys=True))
        tmp.replace(self.state_file)  # a crash never leaves half a state file


def hash_source(uri: str) -> str:
    digest = hashlib.sha256()
    with open_source(uri) as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_path(home: Path, location: str) -> Path:
    """One state file per watched location, under the loraflow home."""
    key = hashlib.sha256(location.rstrip("/").encode()).hexdigest()[:16]
    return Path(home) / "watch" / f"{key}.json"


def as_payload(landed: Landed) -> dict[str, object]:
    return asdict(landed)


class DataLocationError(DataError):
    """A data URI from an event or a run request lies outside the locations allowed."""


def check_data_uri(uri: str, allowed: list[str]) -> str:
    """uri if it lies under one of the allowed prefixes (a directory or s3://bucket/prefix),
    else DataLocationError naming them. Local paths are compared after resolving symlinks and
    `..`; s3:// URIs by whole key segments, and a key with `..` or `.` parts is refused (some
    S3 servers normalise it)."""
    if not allowed:
        raise DataLocationError(
            f"data_uri {uri!r} refused: this deployment allows no data locations. Fix: list "
            "where data may come from in the deployment's `allowed_data_prefixes` parameter "
            "(prefect.yaml; e.g. the watched directory or s3://bucket/prefix)."
        )
    for prefix in allowed:
        if _under(uri, prefix):
            return uri
    raise DataLocationError(
        f"data_uri {uri!r} refused: it is not under any location this deployment allows "
        f"({', '.join(allowed)}). Fix: put the data there, or add its location to the "
        "deployment's `allowed_data_prefixes` parameter (prefect.yaml) and deploy again."
    )


def _under(uri: str, prefix: str) -> bool:
    if uri.startswith("s3://") or prefix.startswith("s3://"):
        if not (uri.startswith("s3://") and prefix.startswith("s3://")):
            return False
        parts = uri.removeprefix("s3://").split("/")
        if any(part in ("", ".", "..") for part in parts):
            return False
        base = prefix.removeprefix("s3://").strip("/").split("/")
        return len(parts) > len(base) and parts[: len(base)] == base
    path = uri.removeprefix("file://")
    root = prefix.removeprefix("file://")
    if not os.path.isabs(path) or not os.path.isabs(root):
        return False  # a relative path means something else on each worker
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, real_root]) == real_root and real != real_root
