"""Back up the stack (its three databases and every object in its buckets) into a folder, and
restore such a folder into a fresh stack. Run through infra/backup.sh DIR and
`RESTORE_FROM=DIR infra/local-stack.sh` (infra/README.md), which give it the servers' variables:
the database URLs (PREFECT_API_DATABASE_CONNECTION_URL, MLFLOW_BACKEND_STORE_URI,
MLFLOW_AUTH_DATABASE_URI), the S3 endpoint (AWS_ENDPOINT_URL) and the servers' S3 keys.

The folder: manifest.json (every file with its SHA-256), one dump per database (pg_dump's
custom format, or a SQLite copy made with SQLite's backup API), and objects/<sha256>, one file
per distinct object content. No password is in it, but MLflow's user store is (its password
hashes), and every model: it is made readable by its owner only."""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import boto3

DATABASES = {  # the name in the backup: the variable its server reads
    "prefect": "PREFECT_API_DATABASE_CONNECTION_URL",
    "mlflow": "MLFLOW_BACKEND_STORE_URI",
    "mlflow_auth": "MLFLOW_AUTH_DATABASE_URI",
}
CHUNK = 8 << 20


class BackupError(Exception):
    pass


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def postgres_program(name: str) -> str:
    """pg_dump, pg_restore or psql: from POSTGRES_BIN, PATH, or Debian's newest server folder."""
    if bin_dir := os.environ.get("POSTGRES_BIN"):
        return str(Path(bin_dir) / name)
    if found := shutil.which(name):
        return found
    folders = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    if not folders:
        raise BackupError(f"{name} is not installed (apt-get install postgresql-client)")
    return str(folders[-1] / name)


def libpq(url: str) -> tuple[str, dict[str, str]]:
    """A SQLAlchemy URL as libpq takes it: the password moved into PGPASSWORD, out of the
    command line (which every user of the machine can read)."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{parts.username}@{host}" + (f":{parts.port}" if parts.port else "")
    plain = urlunsplit(("postgresql", netloc, parts.path, parts.query, ""))
    return plain, os.environ | {"PGPASSWORD": parts.password or ""}


def sqlite_path(url: str) -> Path:
    return Path(url.split(":///", 1)[1])


def kind_of(url: str) -> str:
    if url.startswith("postgresql"):
        return "postgresql"
    if url.startswith("sqlite"):
        return "sqlite"
    raise BackupError(f"a database URL of an unknown kind: {url.split(':', 1)[0]}:…")


def run(args: list[str], env: dict[str, str], what: str) -> str:
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode:
        raise BackupError(f"{what} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout


def buckets() -> list[str]:
    return os.environ.get("BACKUP_BUCKETS", "mlflow models data").split()


def backup(folder: Path) -> dict:
    if folder.exists() and any(folder.iterdir()):
        raise BackupError(f"{folder} is not empty; back up into a new folder")
    (folder / "objects").mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    manifest: dict = {"format": 1, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "databases": {}, "objects": []}
    # The databases first, then the objects: a row names only objects written before it (an
    # artifact is uploaded before the run lists it; a version gets its loraflow.storage_uri tag
    # once its push is complete), so the objects copied after the dump hold everything the dump
    # refers to. Objects written meanwhile are extras that no row names. A release under way
    # is caught as the registry shows it: a version registered but not yet pushed has no tag.
    for name, variable in DATABASES.items():
        url = os.environ[variable]
        kind = kind_of(url)
        if kind == "postgresql":
            file = folder / f"{name}.pgdump"
            plain, env = libpq(url)
            # one transaction: a consistent snapshot while the servers keep writing
            run([postgres_program("pg_dump"), "--format=custom", "--no-owner", "--no-privileges",
                 f"--file={file}", f"--dbname={plain}"], env, f"pg_dump of {name}")
        else:
            file = folder / f"{name}.sqlite"
            source = sqlite3.connect(f"file:{sqlite_path(url)}?mode=ro", uri=True)
            target = sqlite3.connect(file)
            with target:
                source.backup(target)  # consistent even while the server writes
            source.close()
            target.close()
        manifest["databases"][name] = {"kind": kind, "file": file.name,
                                       "sha256": sha256_of(file), "bytes": file.stat().st_size}
    s3 = boto3.client("s3")
    for bucket in buckets():
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for listed in page.get("Contents", []):
                partial = folder / "objects" / ".partial"
                digest = hashlib.sha256()
                # ChecksumMode: botocore checks the bytes against the SHA-256 the object was
                # stored with (loraflow's pushes have one)
                body = s3.get_object(Bucket=bucket, Key=listed["Key"],
                                     ChecksumMode="ENABLED")["Body"]
                with partial.open("wb") as out:
                    for block in body.iter_chunks(CHUNK):
                        digest.update(block)
                        out.write(block)
                sha256 = digest.hexdigest()
                partial.replace(folder / "objects" / sha256)
                manifest["objects"].append({"bucket": bucket, "key": listed["Key"],
                                            "bytes": listed["Size"], "sha256": sha256})
    text = json.dumps(manifest, indent=1)
    (folder / "manifest.json.partial").write_text(text)
    (folder / "manifest.json.partial").replace(folder / "manifest.json")  # last: a whole backup
    return manifest


def check(folder: Path) -> dict:
    """The manifest, once every file it names has its recorded SHA-256."""
    manifest_file = folder / "manifest.json"
    if not manifest_file.is_file():
        raise BackupError(f"{folder} holds no manifest.json: not a finished infra/backup.sh backup")
    manifest = json.loads(manifest_file.read_text())
    files = [(folder / d["file"], d["sha256"]) for d in manifest["databases"].values()]
    files += [(folder / "objects" / o["sha256"], o["sha256"]) for o in manifest["objects"]]
    for path, sha256 in dict(files).items():
        if not path.is_file() or sha256_of(path) != sha256:
            raise BackupError(f"{path} is missing or changed since the backup (SHA-256 differs);"
                              " nothing was restored")
    return manifest


def is_empty(name: str, url: str) -> bool:
    if kind_of(url) == "sqlite":
        path = sqlite_path(url)
        return not path.exists() or path.stat().st_size == 0
    plain, env = libpq(url)
    count = run([postgres_program("psql"), "-X", "-tA", f"--dbname={plain}", "-c",
                 "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"],
                env, f"looking into {name}")
    return count.strip() == "0"


def restore(folder: Path) -> dict:
    manifest = check(folder)
    s3 = boto3.client("s3")
    # Refuse before changing anything: a restore replaces nothing, it fills a fresh stack.
    for name, entry in manifest["databases"].items():
        url = os.environ[DATABASES[name]]
        if kind_of(url) != entry["kind"]:
            raise BackupError(f"the backup's {name} database is {entry['kind']}, this stack's is "
                              f"{kind_of(url)}: restore into a stack of the same kind "
                              f"(STACK_DATABASE={entry['kind']})")
        if not is_empty(name, url):
            raise BackupError(f"this stack's {name} database is not empty: restore into a fresh "
                              "stack (RESTORE_FROM=DIR infra/local-stack.sh with a new "
                              "LORAFLOW_HOME)")
    for bucket in {o["bucket"] for o in manifest["objects"]}:
        if s3.list_objects_v2(Bucket=bucket, MaxKeys=1).get("KeyCount"):
            raise BackupError(f"bucket {bucket} is not empty: restore into a fresh stack")
    for obj in manifest["objects"]:
        checksum = base64.b64encode(bytes.fromhex(obj["sha256"])).decode()
        with (folder / "objects" / obj["sha256"]).open("rb") as body:
            # the server checks the bytes it received against the SHA-256 of the backup
            s3.put_object(Bucket=obj["bucket"], Key=obj["key"], Body=body,
                          ChecksumSHA256=checksum)
    for name, entry in manifest["databases"].items():
        url, file = os.environ[DATABASES[name]], folder / entry["file"]
        if entry["kind"] == "postgresql":
            plain, env = libpq(url)
            run([postgres_program("pg_restore"), "--no-owner", "--no-privileges",
                 "--exit-on-error", "--single-transaction", f"--dbname={plain}", str(file)],
                env, f"pg_restore of {name}")
        else:
            sqlite_path(url).parent.mkdir(parents=True, exist_ok=True)
            source, target = sqlite3.connect(file), sqlite3.connect(sqlite_path(url))
            with target:
                source.backup(target)
            source.close()
            target.close()
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["backup", "restore"])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        manifest = (backup if args.action == "backup" else restore)(args.folder)
    except BackupError as err:
        print(f"infra/backup.py {args.action}: {err}", file=sys.stderr)
        return 1
    size = sum(o["bytes"] for o in manifest["objects"]) / 1e6
    done = {"backup": "backed up into", "restore": "restored (every SHA-256 checked) from"}
    print(f"{done[args.action]} {args.folder}: databases {', '.join(manifest['databases'])}, "
          f"{len(manifest['objects'])} objects ({size:.1f} MB) in "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
