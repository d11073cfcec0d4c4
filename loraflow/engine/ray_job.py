"""The engine as a Ray Train job (launch.backend=ray): one Ray worker a machine, holding that
machine's GPUs, all placed at once on distinct machines (one placement group) or not at all;
each starts the launch torchrun would start on its machine (launch_command), meeting at a
rendezvous on the first worker's machine. Ray restarts the whole group when a worker or a
machine is lost, and the engine resumes from its last checkpoint in the run directory, which
every Ray node sees at the same path (shared storage, as Ray Train's own storage_path needs).
Imported only for launch.backend=ray: `pip install 'loraflow[ray]'`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loraflow.config import LaunchConfig
from loraflow.engine.config import EngineConfig
from loraflow.engine.launch import (
    MetricRelay,
    TrainingCrashed,
    TrainingError,
    engine_ending,
    first_failure,
    launch_command,
    relay_metrics,
    write_config,
)

START_TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Ray Train's wait for its workers


class RayClusterError(TrainingError):
    """The Ray cluster cannot take this training: unreachable, too small, or busy."""


class EngineCrashed(RuntimeError):
    """A machine's engine died without saying why (killed, crashed): Ray restarts the group."""


def launch_on_ray(
    engine: EngineConfig, run_key: str, relay_to: str, relay: MetricRelay,
    while_running: Callable[[], object] | None = None,
) -> dict[str, Any]:
    """launch() on the Ray cluster at launch.ray_address: write engine.json, check that the
    cluster can hold the request, run the job while relaying metrics from the run directory
    (as run_engine does), and turn how it ended into the same errors as a torchrun launch."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    launch = engine.launch
    config_file = write_config(engine)
    run_dir = config_file.parent
    (run_dir / "result.json").unlink(missing_ok=True)
    connect(launch.ray_address)
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        gpus = launch.gpus_per_node
        if gpus is None:  # the cluster decides: one GPU a machine where it has GPUs
            gpus = 1 if any(n["Resources"].get("GPU", 0) for n in nodes) else 0
        share = machine_share(gpus)
        check_fits(nodes, share, launch.nodes, launch.ray_address)
        # The engine makes its own process group (NCCL or gloo) under torchrun: a plain
        # data-parallel trainer (TorchTrainer's base) starts the workers and makes none.
        trainer = DataParallelTrainer(
            run_machine,
            train_loop_config={"config_file": str(config_file), "processes": max(gpus, 1),
                               "machines": launch.nodes, "run_key": run_key},
            scaling_config=ScalingConfig(
                num_workers=launch.nodes, use_gpu=gpus > 0, resources_per_worker=share,
                # distinct machines; one machine: wherever it fits
                placement_strategy="STRICT_SPREAD" if launch.nodes > 1 else "PACK"),
            run_config=RunConfig(
                name=f"loraflow-{run_key}", storage_path=str(run_dir / "ray"),
                failure_config=FailureConfig(
                    max_failures=launch.ray_max_failures,
                    # a placement that times out is retried only when told to wait forever
                    controller_failure_limit=-1 if launch.ray_wait_seconds is None else 0)),
        )
        outcome: dict[str, BaseException] = {}

        def fit() -> None:
            try:
                trainer.fit()
            except BaseException as exc:  # handed to the relaying thread below
                outcome["error"] = exc

        with start_timeout(launch.ray_wait_seconds):
            job = threading.Thread(target=fit, name="loraflow-ray-job", daemon=True)
            job.start()
            while job.is_alive():
                relay_metrics(run_dir, relay_to, relay)
                if while_running is not None:
                    while_running()
                job.join(2.0)
        relay_metrics(run_dir, relay_to, relay)
    finally:  # also when a relay raised (a sweep's pruner): the job's actors end with us
        ray.shutdown()
    error = outcome.get("error")
    if error is not None:
        if not isinstance(error, Exception):  # KeyboardInterrupt and the like, as they are
            raise error
        raise explain(error, launch, share) from error
    return engine_ending(run_dir, 0 if not first_failure(run_dir) else 1)


def connect(address: str) -> None:
    """ray.init on the cluster (HOST:PORT from one of its nodes, ray://HOST:PORT through Ray
    Client from anywhere), or an error that says it is unreachable (a port that takes no
    connection fails in seconds; Ray would retry for a minute)."""
    import ray

    if ":" in address.removeprefix("ray://"):
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as exc:
            raise RayClusterError(
                f"the Ray cluster at {address} (launch.ray_address) is unreachable: {exc}. "
                "Fix: start its head (`ray start --head --port PORT`) or set "
                "launch.ray_address to the HOST:PORT its head printed.") from exc
    try:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    except (ConnectionError, RuntimeError) as exc:
        raise RayClusterError(
            f"could not join the Ray cluster at {address} (launch.ray_address): {exc}. Fix: "
            "start it, or set launch.ray_address to its head's HOST:PORT.") from exc


def machine_share(gpus: int) -> dict[str, float]:
    """What one machine's worker holds: its GPUs (none: one CPU process)."""
    return {"CPU": 1.0, "GPU": float(gpus)} if gpus else {"CPU": 1.0}


def check_fits(nodes: list[dict[str, Any]], share: dict[str, float], machines: int,
               address: str) -> None:
    """Fail at once when the cluster has fewer than `machines` nodes that can each hold
    `share`, however long one waited (Ray itself would wait for them, for ever with an
    autoscaler that cannot add them)."""
    fit = [n for n in nodes if all(n["Resources"].get(k, 0) >= v for k, v in share.items())]
    if len(fit) >= machines:
        return
    have = "; ".join(
        f"{n.get('NodeManagerAddress', '?')}: "
        + ", ".join(f"{k} {v:g}" for k, v in sorted(n["Resources"].items()) if k in share)
        for n in nodes)
    raise RayClusterError(
        f"launch.nodes={machines} needs {machines} distinct machines with "
        f"{', '.join(f'{k} {v:g}' for k, v in share.items())} each, but the Ray cluster at "
        f"{address} has {len(nodes)} node(s), {len(fit)} of them with that much ({have}). "
        "Fix: lower launch.nodes or launch.gpus_per_node, or add machines to the cluster.")


@contextmanager
def start_timeout(seconds: float | None) -> Iterator[None]:
    """Ray Train's wait for its placement (read from the driver's environment when the job
    starts), set to launch.ray_wait_seconds for this job only."""
    before = os.environ.get(START_TIMEOUT)
    if seconds is not None:
        os.environ[START_TIMEOUT] = str(seconds)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(START_TIMEOUT, None)
        else:
            os.environ[START_TIMEOUT] = before


def explain(error: Exception, launch: LaunchConfig, share: dict[str, float]) -> Exception:
    """The job's failure in words, as the launch's errors: a busy cluster, a machine lost, an
    engine that crashed (both retried by the pipeline from the last checkpoint)."""
    from ray.exceptions import NodeDiedError, RayActorError
    from ray.train import ControllerError, WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    if isinstance(error, ControllerError) and isinstance(
            error.controller_failure, WorkerGroupStartupTimeoutError):
        return RayClusterError(
            f"the Ray cluster at {launch.ray_address} did not free {launch.nodes} machine(s) "
            f"with {share} within launch.ray_wait_seconds={launch.ray_wait_seconds:g}: other "
            "jobs hold them, or a lost machine was not replaced. Fix: retry later, raise "
            "launch.ray_wait_seconds (null: wait as long as it takes), or add machines.")
    restarts = f"after {launch.ray_max_failures} restart(s) of the group (launch.ray_max_failures)"
    if isinstance(error, WorkerGroupError):
        failures = error.worker_failures
        # A worker whose machine went away: its actor died, or the controller's health check
        # could no longer reach it.
        lost = {rank: e for rank, e in failures.items() if isinstance(
            getattr(e, "health_check_failure", e), RayActorError | NodeDiedError)}
        if lost:
            return TrainingCrashed(
                f"a Ray worker's machine was lost (worker {', '.join(map(str, lost))}: "
                f"{first_line(next(iter(lost.values())))}) {restarts}; a retry resumes from "
                "the last checkpoint")
        rank, cause = next(iter(failures.items()))
        return TrainingCrashed(f"the engine crashed on Ray worker {rank}: {first_line(cause)} "
                               f"{restarts}; a retry resumes from the last checkpoint")
    return TrainingCrashed(f"the Ray job failed: {first_line(error)}")


def first_line(error: BaseException) -> str:
    """The error's sentence: its first line, or the last line of the traceback Ray hands back
    for an exception raised in a worker (the exception itself)."""
    text = str(error).strip()
    if text.startswith("Traceback"):
        return text.splitlines()[-1]
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------------------- on each machine


def run_machine(config: dict[str, Any]) -> None:
    """One machine's share of the training (Ray Train's per-worker function): the first
    worker's machine hosts the rendezvous; each starts the launch torchrun would start there.
    An engine that stopped itself (out of memory, diverged, hung, refused) ends the job
    normally, for the pipeline to read its failure report; a crash raises and Ray restarts
    the group."""
    import ray
    from ray.train import get_context
    from ray.train.collective import broadcast_from_rank_zero

    config_file = Path(config["config_file"])
    here = ray.util.get_node_ip_address()
    if not config_file.is_file():
        raise EngineCrashed(
            f"Ray node {here} does not see {config_file}: launch.backend=ray needs the run "
            "directory (LORAFLOW_HOME) on storage every Ray node mounts at the same path")
    first = get_context().get_world_rank() == 0
    endpoint = broadcast_from_rank_zero(f"{here}:{free_port(here)}" if first else None)
    command = launch_command(["--config", str(config_file)], config["processes"],
                             config["machines"], endpoint, config["run_key"])
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, preexec_fn=die_with_parent)
    code = process.wait()
    if code != 0 and not first_failure(config_file.parent):
        raise EngineCrashed(f"the engine on Ray node {here} exited with code {code}")


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """In the launched process: SIGTERM when the Ray worker that started it dies (Ray kills a
    group's workers to restart it; torchrun passes SIGTERM on to the engine)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
