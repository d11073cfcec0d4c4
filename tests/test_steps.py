"""The flow's step runner: a run the Prefect server already declared dead does no more work."""

import pytest

pytestmark = pytest.mark.integration


def test_a_run_the_server_declared_crashed_stops_before_its_next_step(prefect_server):
    """The crash automation marked a healthy `loraflow run` Crashed while it trained, and the
    run went on to register a version. Now the next step finds the verdict and stops."""
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run
    from prefect.states import Crashed

    from tasks.steps import DeclaredDeadError, StepLog

    done = []

    @task
    def work(name: str) -> str:
        done.append(name)
        return name

    @flow
    def pipeline() -> None:
        step = StepLog()
        assert step(work, "train") == "train"
        with get_client(sync_client=True) as client:  # what infra/automations.yaml does
            client.set_flow_run_state(flow_run.id, Crashed(message="no heartbeat for 120 s"),
                                      force=True)  # fmt: skip
        step(work, "register")

    with pytest.raises(DeclaredDeadError, match=r"marked this flow run Crashed \(no heartbeat "
                       r"for 120 s\) while it was still working; it stops before work"):
        pipeline()
    assert done == ["train"]
