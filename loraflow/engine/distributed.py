"""Data parallelism for the training engine under torchrun: one process a GPU (NCCL), or a few
CPU processes (gloo) for tests. Each optimizer step's rows are split between the ranks; the
LoRA gradients (a few MB) are summed in one all-reduce per step; rank 0 alone writes files.
With launch.parallelism=fsdp the base weights are sharded across the ranks instead of whole on
each (FSDP2, shard_model); FSDP then sums the gradients itself, in backward.

    torchrun --standalone --nproc-per-node 4 -m loraflow.engine --config engine.json
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \
        --rdzv-endpoint HOST:29400 --rdzv-id RUN -m loraflow.engine --config engine.json
"""

from __future__ import annotations

import gc
import json
import os
import socket
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

HEARTBEAT_PREFIX = "loraflow/heartbeat"
T = TypeVar("T")


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

    def print(self, message: str) -> None:
        """A line for the person watching, once (rank 0), on stderr beside the progress bar."""
        if self.main:
            print(f"loraflow.engine: {message}", file=sys.stderr, flush=True)


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
        # FSDP's modules sit in reference cycles with their collectives' state; freed only at
        # exit, after the group, a rank could abort ("terminate called without an active
        # exception", seen with gloo when the other rank was still writing).
        gc.collect()
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
    if sharded(params):  # FSDP's reduce-scatter in backward summed the gradients already
        total = loss.detach().float().reshape(1).clone()
        dist.all_reduce(total)
        return total[0]
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


def rank_share(items: list[T], ranks: Ranks, size: int = 1) -> list[tuple[list[T], bool]]:
    """This rank's share of items run through the model in passes (validation): every
    world_size-th item, in chunks of up to `size`, as (chunk, counted). Every rank makes as many
    passes as rank 0, which has the most: under FSDP each forward gathers weights from all
    ranks, so a rank short of a chunk runs a spare one (items[0]) that it does not count."""
    mine = items[ranks.rank :: ranks.world_size]
    most = len(items[:: ranks.world_size])
    return [(mine[start : start + size], True) if start < len(mine) else ([items[0]], False)
            for start in range(0, most, size)]


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
    makes it so whatever the initialisation does). Sharded (FSDP) ones came from rank 0 when
    they were loaded."""
    if not ranks.distributed or sharded(params):
        return
    with torch.no_grad():
        for p in params:
            buffer = p.data.to(comm_device(ranks))
            dist.broadcast(buffer, src=0)
            p.data.copy_(buffer)


# ---------------------------------------------------------------------------- FSDP


def sharded(params: Any) -> bool:
    """Whether FSDP shards these parameters (DTensors) across the ranks."""
    return any(isinstance(p, DTensor) for p in params)


def shard_model(model: torch.nn.Module, ranks: Ranks) -> int:
    """FSDP2 (launch.parallelism=fsdp): shard the model across the ranks (shard_layers) and fill
    the shards with rank 0's weights (fill_from_rank0). Rank 0 holds the loaded model in CPU
    memory; the others hold it on the meta device (no memory). Returns how many weights this
    rank holds."""
    full = model.state_dict() if ranks.main else {}
    shard_layers(model, ranks)
    fill_from_rank0(model, full, ranks)
    return held_weights(model)


def shard_layers(model: torch.nn.Module, ranks: Ranks) -> None:
    """Shard each decoder layer, then the decoder (embeddings, final norm), across the ranks;
    moves no weights (meta ones stay meta). The output head stays whole on every GPU: the
    engine calls it outside the decoder, a chunk of tokens at a time, and FSDP keeps the
    root's (embeddings') weights gathered for the whole step, so sharding a frozen head of the
    same size would not lower the peak. A fill_* function then puts the weights on the GPU."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    causal_lm = model.get_base_model()
    decoder, head = causal_lm.model, causal_lm.get_output_embeddings()
    if any(p.requires_grad for p in head.parameters()):  # its gradients would not be summed
        raise ValueError("launch.parallelism=fsdp cannot train the output head (lm_head in "
                         "lora.target_modules). Fix: leave it out, or launch.parallelism=ddp.")
    if head.weight is decoder.get_input_embeddings().weight:  # tied: the head gets its own copy
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    mesh = init_device_mesh(comm_device(ranks).type, (ranks.world_size,))
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(decoder, mesh=mesh)
    for module in decoder.modules():
        if isinstance(module, FSDPModule):
            # Sum, as sync_gradients does: each rank's loss is already divided by the whole
            # step's answer tokens. (Only SUM: gloo has no pre-multiplied sum.)
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def fill_from_rank0(model: torch.nn.Module, full: dict[str, torch.Tensor], ranks: Ranks) -> None:
    """Every rank's shards (and whole head, and buffers) from rank 0's `full` state dict, taken
    before shard_layers; `full` is empty on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    device = comm_device(ranks)
    head = model.get_base_model().get_output_embeddings()
    if ranks.main:
        head.to(device)
    else:
        head.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True))
    # Buffers outside the state dict (rotary frequencies) are still on the meta device.
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                rank0s = (buffer.to(device) if ranks.main
                          else torch.empty(buffer.shape, dtype=buffer.dtype, device=device))
                dist.broadcast(rank0s, src=0)
                module._buffers[name] = rank0s


def fill_parameter(name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
    """A random weight as a fresh LoRA model's: LoRA A Kaiming-uniform, B zero, norm weights 1
    (a Llama has no biases), every other matrix normal(0, 0.02)."""
    if "lora_A" in name:
        torch.nn.init.kaiming_uniform_(tensor, a=5**0.5, generator=generator)
    elif "lora_B" in name:
        tensor.zero_()
    elif tensor.dim() == 1:
        tensor.fill_(1.0)
    else:
        tensor.normal_(0.0, 0.02, generator=generator)


@torch.no_grad()
def fill_random(model: torch.nn.Module, ranks: Ranks, seed: int = 0) -> None:
    """Benchmarks: a model built on the meta device and sharded (shard_layers) gets its memory
    on this rank's device and small random weights generated there, shard by shard, never
    whole anywhere: normal(0, 0.02) matrices, norms at one, LoRA as PEFT starts it (A
    Kaiming-uniform, B zero). The head, whole on every rank, is the same on all of them; the
    rotary frequencies are computed as the model's own constructor does."""
    device = comm_device(ranks)
    model.to_empty(device=device)
    shards = torch.Generator(device).manual_seed(seed + 1 + ranks.rank)
    same = torch.Generator(device).manual_seed(seed)
    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        generator = shards if isinstance(param, DTensor) else same
        if local.numel() == 0:  # a rank's share of a small tensor can be empty
            continue
        fill_parameter(name, local, generator)
    for module in model.modules():
        if any(b is not None for b in module._buffers.values()):
            # Only computed buffers (a Llama's rotary inv_freq): rebuild their module on the
            # device, from its config, and take its buffers; to_empty left garbage in ours.
            with torch.device(device):
                fresh = type(module)(module.config)
            for name in module._buffers:
                module._buffers[name] = fresh._buffers[name].to(device)


def held_weights(model: torch.nn.Module) -> int:
    """How many of the model's weights this rank holds (its shards, and whole tensors)."""
    return sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel()
               for p in model.parameters())


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor FSDP shards (a DTensor) gathered whole; any other tensor as it is. A
    collective for a DTensor: every rank calls it."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """The same state with FSDP's sharded tensors gathered whole (every rank calls it, with
    the same keys in the same order)."""
    return {k: whole(v) if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of `full` where `like` is sharded (FSDP), else `full` itself. Every
    rank has `full` (share_checkpoint), so no data moves between ranks."""
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh,
                             like.placements, src_data_rank=None)


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
