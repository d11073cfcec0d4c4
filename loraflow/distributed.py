"""Data parallelism for the training engine under torchrun: one process a GPU (NCCL), or a few
CPU processes (gloo) for tests. Each optimizer step's rows are split between the ranks; the
LoRA gradients (a few MB) are summed in one all-reduce per step; rank 0 alone writes files.

    torchrun --standalone --nproc-per-node 4 -m loraflow.train --config engine.json
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \
        --rdzv-endpoint HOST:29400 --rdzv-id RUN -m loraflow.train --config engine.json
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

HEARTBEAT_PREFIX = "loraflow/heartbeat"


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the engine's processes (one process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Ranks()  # one process, no process group


def init(device: str, timeout_s: float) -> Ranks:
    """Join the process group torchrun set up (WORLD_SIZE/RANK/LOCAL_RANK); one process
    otherwise. A collective that waits longer than `timeout_s` fails instead of hanging."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return SINGLE
    # NVLink multicast (NVLS) can take the host's GPUs out of service on shared machines;
    # LoRA's gradients are too small to gain from it. A user's own setting is kept.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    ranks = Ranks(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), world)
    if device == "cuda":
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo",
                            timeout=timedelta(seconds=timeout_s))
    heartbeat(ranks, 0, "started")
    return ranks


def shutdown(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


def comm_device(ranks: Ranks) -> torch.device:
    return torch.device("cuda", ranks.local_rank) if dist.get_backend() == "nccl" else \
        torch.device("cpu")


def sync_gradients(params: list[torch.nn.Parameter], loss: torch.Tensor,
                   ranks: Ranks) -> torch.Tensor:
    """Sum every rank's LoRA gradients and step loss in one all-reduce (a flat fp32 buffer);
    returns the summed loss. Each rank's loss is already divided by the whole step's answer
    tokens, so the sum is exactly the single-process gradient of the same rows."""
    if not ranks.distributed:
        return loss
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [loss.reshape(1).float()])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n
    return flat[-1]


def sum_values(values: list[float], ranks: Ranks) -> list[float]:
    """The sum over ranks of a few numbers (validation loss totals)."""
    if not ranks.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=comm_device(ranks))
    dist.all_reduce(t)
    return t.tolist()


def min_value(value: int, ranks: Ranks) -> int:
    """The smallest value over ranks (the micro-batch every GPU can hold)."""
    if not ranks.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=comm_device(ranks))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def share_checkpoint(path: Path | None, ranks: Ranks) -> Path | None:
    """Rank 0's checkpoint (or None) on every rank. Other ranks get its files over the process
    group, so several hosts need no shared filesystem: they land in a temporary folder."""
    if not ranks.distributed:
        return path
    files = {}
    if ranks.main and path is not None:
        files = {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    header = json.dumps({"name": path.name if path else None,
                         "sizes": {k: len(v) for k, v in files.items()}}).encode()
    blob = broadcast_bytes(header + b"\n" + b"".join(files.values()), ranks)
    if ranks.main:
        return path
    head, _, body = blob.partition(b"\n")
    meta = json.loads(head)
    if meta["name"] is None:
        return None
    local = Path(tempfile.mkdtemp(prefix=f"loraflow-rank{ranks.rank}-")) / meta["name"]
    offset = 0
    for name, size in meta["sizes"].items():
        target = local / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body[offset : offset + size])
        offset += size
    return local


def broadcast_bytes(data: bytes, ranks: Ranks) -> bytes:
    """Rank 0's bytes on every rank, as a uint8 tensor (no pickling)."""
    device = comm_device(ranks)
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if ranks.main
              else torch.empty(int(size.item()), dtype=torch.uint8, device=device))
    dist.broadcast(buffer, src=0)
    return bytes(buffer.cpu().numpy()) if not ranks.main else data


def broadcast_parameters(params: list[torch.nn.Parameter], ranks: Ranks) -> None:
    """Start every rank from rank 0's LoRA weights (the same seed gives the same ones; this
    makes it so whatever the initialisation does)."""
    if not ranks.distributed:
        return
    with torch.no_grad():
        for p in params:
            buffer = p.data.to(comm_device(ranks))
            dist.broadcast(buffer, src=0)
            p.data.copy_(buffer)


# ---------------------------------------------------------------------------- hang diagnosis


def _store() -> dist.Store | None:
    if not dist.is_initialized():
        return None
    return dist.PrefixStore(HEARTBEAT_PREFIX, dist.distributed_c10d._get_default_store())


def heartbeat(ranks: Ranks, step: int, phase: str) -> None:
    """Record in torchrun's key-value store where this rank is: the last step it finished and
    what it does now ("compute", "sync"). The watchdog reads every rank's to name the one that
    stopped."""
    store = _store() if ranks.distributed else None
    if store is not None:
        store.set(f"rank{ranks.rank}", json.dumps(
            {"step": step, "phase": phase, "host": socket.gethostname(), "pid": os.getpid()}))


def stalled_ranks(ranks: Ranks) -> str:
    """A sentence naming the ranks that are behind (for the watchdog's message)."""
    store = _store() if ranks.distributed else None
    if store is None:
        return ""
    try:
        store.set_timeout(timedelta(seconds=5))
        beats = {r: json.loads(store.get(f"rank{r}")) for r in range(ranks.world_size)}
    except Exception as exc:  # the store itself is gone: say so rather than guess
        return f" Could not read the other ranks' heartbeats ({type(exc).__name__}: {exc})."
    # Behind = fewest finished steps; among equals, not yet waiting in the all-reduce.
    order = {r: (b["step"], b["phase"] == "sync") for r, b in beats.items()}
    lowest = min(order.values())
    behind = [r for r, key in order.items() if key == lowest]
    if len(behind) == len(beats):
        return (f" Every rank finished step {lowest[0]} and is in phase "
                f"'{beats[0]['phase']}': the collective itself (NCCL/network) is stuck.")
    described = ", ".join(
        f"rank {r} ({beats[r]['host']} pid {beats[r]['pid']}, finished step {beats[r]['step']}, "
        f"phase '{beats[r]['phase']}')" for r in behind)
    return (f" Stopped: {described}; the other ranks wait for it in the gradient all-reduce.")



def launch_command(engine_args: list[str], gpus_per_node: int, nodes: int,
                   rdzv_endpoint: str, run_id: str) -> list[str]:
    """The command that starts the engine: plain Python for one process, torchrun for more
    (on one machine with a free local port; across machines through a c10d rendezvous that
    every machine's launch names the same way)."""
    engine = ["-m", "loraflow.train", *engine_args]
    if gpus_per_node * nodes == 1:
        return [sys.executable, *engine]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
              str(gpus_per_node), "--max-restarts", "0"]
    if nodes == 1:
        return [*launch, "--standalone", *engine]
    return [*launch, "--nnodes", str(nodes), "--rdzv-backend", "c10d", "--rdzv-endpoint",
            rdzv_endpoint, "--rdzv-id", run_id, *engine]
