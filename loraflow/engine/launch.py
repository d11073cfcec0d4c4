"""Starting the engine and reading how it ended: the launch command (plain Python for one
process, torchrun for several), the process supervised while its metrics are relayed, and its
exit turned into an error that says whether a retry can help (the failure protocol). The same
launch as a Ray Train job: loraflow.engine.ray_job."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loraflow.config import TrainConfig
from loraflow.engine.config import (
    EXIT_CODES,
    EXIT_DIVERGED,
    EXIT_HUNG,
    EXIT_OOM,
    EXIT_REFUSED,
    EngineConfig,
    halve_micro_batch,
)

ENGINE = ("-m", "loraflow.engine")  # what the launch runs, `python -m loraflow.engine ...`
MetricRelay = Callable[[list[dict[str, Any]]], None]


def launch_command(engine_args: list[str], gpus_per_node: int, nodes: int,
                   rdzv_endpoint: str, run_id: str, entry: tuple[str, ...] = ENGINE) -> list[str]:
    """The command that starts the engine: plain Python for one process, torchrun for more
    (on one machine with a free local port; across machines through a c10d rendezvous that
    every machine's launch names the same way)."""
    engine = [*entry, *engine_args]
    if gpus_per_node * nodes == 1:
        return [sys.executable, *engine]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
              str(gpus_per_node), "--max-restarts", "0"]
    if nodes == 1:
        return [*launch, "--standalone", *engine]
    return [*launch, "--nnodes", str(nodes), "--rdzv-backend", "c10d", "--rdzv-endpoint",
            rdzv_endpoint, "--rdzv-id", run_id, *engine]


class TrainingError(RuntimeError):
    """The training engine failed; the message says where its output is."""


class TrainingOOM(TrainingError):
    """Out of memory: the next attempt halves the micro-batch (same effective batch)."""


class TrainingCrashed(TrainingError):
    """The engine died (killed, crashed): the next attempt resumes from its last checkpoint."""


class TrainingStopped(TrainingError):
    """The engine stopped itself (NaN, unrecovered loss spike, hang): never retried blindly."""


def after_oom(train: TrainConfig, run_dir: Path) -> TrainConfig:
    """The train settings for the next attempt in run_dir: the micro-batch halved once for
    each out-of-memory failure there (accumulation doubled, same effective batch)."""
    adapt = run_dir / "adapt.json"
    if not adapt.is_file():
        return train
    try:
        return halve_micro_batch(train, json.loads(adapt.read_text())["halvings"])
    except ValueError as exc:  # nothing left to halve: a training failure, not a bad config
        raise TrainingError(str(exc)) from exc


def launch(engine: EngineConfig, run_key: str, relay_to: str, relay: MetricRelay,
           while_running: Callable[[], object] | None = None) -> dict[str, Any] | None:
    """Write engine.json into the run directory, start the engine on this machine's share of
    the processes (launch.gpus_per_node, launch.nodes) and supervise it (run_engine). The
    result of rank 0's machine; None on another machine. (launch.backend=ray:
    loraflow.engine.ray_job.launch_on_ray.)"""
    run_dir, where = Path(engine.output_dir), engine.launch
    config_file = write_config(engine)
    processes = max(where.gpus_per_node or 0, 1)  # 0 GPUs or unset: one process
    command = launch_command(["--config", str(config_file)], processes, where.nodes,
                             where.rdzv_endpoint, run_key)
    return run_engine(command, run_dir, relay_to, relay, while_running)


def write_config(engine: EngineConfig) -> Path:
    """engine.json in the run directory: what every engine process reads."""
    config_file = Path(engine.output_dir) / "engine.json"
    config_file.write_text(engine.model_dump_json(indent=2))
    return config_file


def run_engine(
    command: list[str], run_dir: Path, relay_to: str, relay: MetricRelay,
    while_running: Callable[[], object] | None = None,
) -> dict[str, Any] | None:
    """Start the engine (launch_command), hand metrics.jsonl's new steps to `relay` every few
    seconds (and call `while_running`, e.g. to share new checkpoints); turn how it ended into
    an error that says whether a retry can help. `relay_to` names where the metrics go (an
    MLflow run id), so a rerun relays to a new one. A relay that raises (a sweep's pruner
    stopping the trial) ends the engine and passes the error on."""
    (run_dir / "result.json").unlink(missing_ok=True)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        while True:
            finished = process.poll() is not None
            relay_metrics(run_dir, relay_to, relay)
            if while_running is not None and not finished:
                while_running()
            if finished:
                break
            time.sleep(2.0)
    except BaseException:  # the relay stopped the run (a sweep's pruner) or we were interrupted
        stop(process)
        raise
    return engine_ending(run_dir, process.returncode)


def engine_ending(run_dir: Path, returncode: int) -> dict[str, Any] | None:
    """rank 0's result (None on a machine without it) when the launch exited 0; otherwise the
    error that says what happened and whether a retry can help."""
    if returncode == 0:  # rank 0 writes the result; other machines have none
        result = run_dir / "result.json"
        return json.loads(result.read_text()) if result.is_file() else None
    failure = first_failure(run_dir)
    # torchrun exits 1 whatever its workers did: the ranks' failure files say what happened.
    code = EXIT_CODES.get(failure.get("kind"), returncode)
    where = f"(config, metrics and checkpoints in {run_dir})"
    if code == EXIT_OOM:
        adapt = run_dir / "adapt.json"
        halvings = json.loads(adapt.read_text())["halvings"] + 1 if adapt.is_file() else 1
        adapt.write_text(json.dumps({"halvings": halvings}))
        raise TrainingOOM(f"{failure.get('message', 'out of memory')} {where}")
    if code in (EXIT_DIVERGED, EXIT_HUNG, EXIT_REFUSED):
        raise TrainingStopped(f"{failure.get('message', 'training stopped')} {where}")
    raise TrainingCrashed(
        f"the training engine exited with code {returncode}; its "
        f"output is above {where}; a retry resumes from the last checkpoint"
    )


def stop(process: subprocess.Popen, grace_seconds: float = 10.0) -> None:
    """End the engine (torchrun passes SIGTERM on to its workers): a run whose relay raised
    leaves no process training behind it. Its checkpoints stay for a resume."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace_seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def first_failure(run_dir: Path) -> dict[str, Any]:
    """The failure report that explains the run's end: with several ranks, an OOM (which a
    retry can fix) before a hang or divergence, and rank 0's before the others'."""
    reports = [json.loads(p.read_text()) for p in sorted(run_dir.glob("failure*.json"))]
    order = list(EXIT_CODES)
    reports.sort(key=lambda r: (order.index(r["kind"]) if r.get("kind") in order else 9,
                                r.get("rank", 0)))
    return reports[0] if reports else {}


def relay_metrics(run_dir: Path, relay_to: str, relay: MetricRelay) -> None:
    """Hand the steps not relayed yet to `relay` in one batch. The last relayed step is kept
    in the run directory: a resumed attempt repeats steps after its checkpoint, and a tracker
    keeps the first value of each step rather than two (per destination)."""
    metrics_file, mark = run_dir / "metrics.jsonl", run_dir / "relayed.json"
    if not metrics_file.is_file():
        return
    seen = json.loads(mark.read_text()) if mark.is_file() else {}
    done = seen["step"] if seen.get("run_id") == relay_to else 0
    records = [r for r in map(json.loads, (line for line in metrics_file.read_text()
                                           .splitlines() if line.endswith("}")))
               if r["step"] > done]
    if records:
        relay(records)
        mark.write_text(json.dumps({"run_id": relay_to,
                                    "step": max(r["step"] for r in records)}))
