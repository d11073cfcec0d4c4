"""Runs the flow's tasks and keeps, for the summary, each one's final state and wall time.
Before each step it asks the Prefect server whether this flow run is still running there: a run
the server already declared dead (Crashed by infra/automations.yaml, Cancelled) stops instead
of registering, pushing or promoting behind the back of the run that replaced it."""

from __future__ import annotations

import time
from typing import Any, ParamSpec, TypeVar

from prefect import Task

P = ParamSpec("P")
R = TypeVar("R")


class DeclaredDeadError(RuntimeError):
    """The Prefect server holds this flow run in a final state while it still works."""


class StepLog:
    def __init__(self) -> None:
        self.steps: dict[str, dict[str, Any]] = {}

    def __call__(self, task: Task[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the task with these arguments (typed as the task's own); record `Completed` or
        `Cached` and seconds; re-raise its failure."""
        check_still_running(task.name)
        start = time.perf_counter()
        state = task(*args, return_state=True, **kwargs)  # type: ignore[call-overload]
        self.steps[task.name] = {
            "state": state.name,
            "seconds": round(time.perf_counter() - start, 3),
        }
        return state.result(raise_on_failure=True)


def check_still_running(step: str) -> None:
    """Raise DeclaredDeadError when the server holds the current flow run in a final state."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if not flow_run.id:
        return
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run.id).state
    if state is not None and state.is_final():
        why = state.message or "no message"
        raise DeclaredDeadError(
            f"the Prefect server marked this flow run {state.name} ({why}) while it was still "
            f"working; it stops before {step} so that nothing "
            "is registered or promoted by a run the server counts as ended. If it was healthy, "
            "check infra/automations.yaml against the run's heartbeats "
            "(PREFECT_FLOWS_HEARTBEAT_FREQUENCY)."
        )
