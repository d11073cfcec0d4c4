"""Runs the flow's tasks and keeps, for the summary, each one's final state and wall time."""

from __future__ import annotations

import time
from typing import Any, ParamSpec, TypeVar

from prefect import Task

P = ParamSpec("P")
R = TypeVar("R")


class StepLog:
    def __init__(self) -> None:
        self.steps: dict[str, dict[str, Any]] = {}

    def __call__(self, task: Task[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the task with these arguments (typed as the task's own); record `Completed` or
        `Cached` and seconds; re-raise its failure."""
        start = time.perf_counter()
        state = task(*args, return_state=True, **kwargs)  # type: ignore[call-overload]
        self.steps[task.name] = {
            "state": state.name,
            "seconds": round(time.perf_counter() - start, 3),
        }
        return state.result(raise_on_failure=True)
