"""Content hashes: of bytes, never of paths. They key the pipeline's caches, name tokenized
data and let a load check that an adapter meets the base it was trained on.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(path: Path, cached: bool = True) -> str:
    """Hash of a file, or of a directory's relative file names and their bytes. cached=False
    reads every byte again (an integrity check must not trust an unchanged mtime)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    hash_file = sha256_file_cached if cached else sha256_file  # base weights: once a process
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        digest.update(hash_file(file).encode())
    return digest.hexdigest()


def file_manifest(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 for every file under root."""
    root = Path(root)
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


@cache
def code_version() -> str:
    """Hash of loraflow's own source: a code change invalidates every cached step."""
    package = Path(__file__).parent
    digest = hashlib.sha256()
    for file in sorted(package.rglob("*.py")):
        digest.update(file.relative_to(package).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def library_versions() -> dict[str, str]:
    names = ("torch", "transformers", "peft", "accelerate", "safetensors")
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


_file_hashes: dict[tuple[str, int, int], str] = {}


def sha256_file_cached(path: Path) -> str:
    """sha256_file, remembered per (path, size, mtime): base weights are hashed once a process."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _file_hashes:
        _file_hashes[key] = sha256_file(path)
    return _file_hashes[key]


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
)


def tokenizer_sha256(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (Path(model_dir) / name).is_file():
            digest.update(name.encode() + b"\0" + (Path(model_dir) / name).read_bytes())
    return digest.hexdigest()
