"""Runs the flow's tasks and keeps, for the summary, each one's final state and wall time."""

from __future__ import annotations

import time
from typing import Any

from prefect import Task


class StepLog:
    def __init__(self) -> None:
        self.steps: dict[str, dict[str, Any]] = {}

    def __call__(self, task: Task[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run the task; record `Completed` or `Cached` and seconds; re-raise its failure."""
        start = time.perf_counter()
        state = task(*args, return_state=True, **kwargs)
        self.steps[task.name] = {
            "state": state.name,
            "seconds": round(time.perf_counter() - start, 3),
        }
        return state.result(raise_on_failure=True)
