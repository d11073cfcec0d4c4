"""Cache keys from content, not paths.

A task's key is its own source, loraflow's code version and its inputs, where
- a `pathlib.Path` counts by the bytes of the file or directory it names,
- a reference carrying a `sha256` (a dataset, model or adapter) counts by that hash alone,
- `run_id` does not count (each pipeline run has its own MLflow run), nor `where` a GPU step
  runs (in process or on the gpu pool: the same work, logged to the same tracking store), nor
  the sweep `trial` a training reports its progress to (the training is the same),
- the MLflow tracking store does: cached results point at artifacts and logged models in it, so
  a run against another tracking server must not reuse them.
So renaming or moving a file changes nothing; changing one byte re-runs what depends on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects
from pydantic import BaseModel

from loraflow.hashing import code_version, sha256_tree

IGNORED = frozenset({"run_id", "where", "trial"})


def fingerprint(value: Any) -> Any:
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, Path):
        return {"sha256": sha256_tree(value)} if value.exists() else {"missing": str(value)}
    if isinstance(value, dict):
        if isinstance(value.get("sha256"), str):
            return {"sha256": value["sha256"]}
        return {str(k): fingerprint(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [fingerprint(v) for v in value]
    return value


@dataclass
class ContentInputs(CachePolicy):
    exclude: tuple[str, ...] = ()  # inputs that must not count, beyond run_id

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        content = {
            k: fingerprint(v)
            for k, v in inputs.items()
            if k not in IGNORED and k not in self.exclude
        }
        store = mlflow.get_tracking_uri()
        return hash_objects(code_version(), store, content, raise_on_failure=True)


CONTENT = TASK_SOURCE + ContentInputs()
