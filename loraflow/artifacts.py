"""What tasks hand each other: where bytes are (an MLflow artifact URI or a local path) and the
SHA-256 that identifies them, never the objects themselves."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ArtifactRef(BaseModel):
    uri: str
    sha256: str
    meta: dict[str, Any] = {}
