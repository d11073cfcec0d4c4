"""What stops a run that cannot succeed: NaN/inf or a loss spike that does not recover, a
step that hangs (the watchdog), and the failure report each leaves for the launcher.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from loraflow.config import TrainConfig
from loraflow.engine import distributed
from loraflow.engine.config import EXIT_HUNG
from loraflow.engine.distributed import SINGLE, Ranks


class Diverged(RuntimeError):
    """The loss became NaN/inf or stayed spiked: retrying the same thing would not help."""


@dataclass
class Faults:
    """Faults for the tests of these guards, installed by a test's own entry point
    (tests/faulty_engine.py) before it calls the engine's main(): a real NaN loss or a hung
    rank cannot be summoned on demand. All off in every other run."""

    nan_at_step: int = 0  # this step's loss reads NaN
    stall_at_step: int = 3  # this step stalls for stall_seconds on rank stall_rank
    stall_seconds: float = 0.0
    stall_rank: int = 0

    def poison(self, step: int, loss: float) -> float:
        return float("nan") if step == self.nan_at_step else loss

    def stall(self, step: int, ranks: Ranks) -> None:
        if self.stall_seconds and step == self.stall_at_step and ranks.rank == self.stall_rank:
            time.sleep(self.stall_seconds)


FAULTS = Faults()


class Watchdog:
    """Ends the process with a clear message when no step finishes for `seconds` (a silent
    hang: a stuck kernel, a dead collective, a deadlocked loader). It is armed by the first
    finished step: the first one also pays for compilation and warm-up."""

    def __init__(self, seconds: float, out: Path, ranks: Ranks = SINGLE) -> None:
        self.seconds, self.out, self.ranks = seconds, out, ranks
        self.step, self.beat, self.stopped = 0, time.monotonic(), False
        if seconds > 0:
            threading.Thread(target=self._watch, daemon=True, name="watchdog").start()

    def progress(self, step: int) -> None:
        self.step, self.beat = step, time.monotonic()

    def _watch(self) -> None:
        while not self.stopped:
            time.sleep(min(1.0, self.seconds / 4))
            idle = time.monotonic() - self.beat
            if idle > self.seconds and self.step and not self.stopped:
                where = f" on rank {self.ranks.rank}" if self.ranks.distributed else ""
                message = (f"no progress for {idle:.1f} s after step {self.step}{where} "
                           f"(watchdog: train.watchdog_seconds={self.seconds}); the run was "
                           "stopped." + distributed.stalled_ranks(self.ranks) + " Check GPU "
                           "utilisation and the data loader; raise the limit if a step is "
                           "legitimately this slow.")
                write_failure(self.out, "hung", self.step, message, self.ranks)
                print(f"\nloraflow.engine: {message}", file=sys.stderr, flush=True)
                os._exit(EXIT_HUNG)


class SpikeGuard:
    """NaN/inf stops at once; a loss above spike_factor x its running mean for spike_patience
    steps in a row stops too (a spike that recovers is normal and ignored)."""

    def __init__(self, cfg: TrainConfig, mean: float | None = None, streak: int = 0) -> None:
        self.factor, self.patience = cfg.spike_factor, cfg.spike_patience
        self.mean, self.streak = mean, streak

    def check(self, loss: float, step: int, grad_norm: float | None = None) -> None:
        """Before the optimizer step. grad_norm (None under fp16's loss scaler, which skips
        non-finite steps itself): a finite loss with non-finite gradients stops the run here,
        before the update writes NaN into the adapter."""
        if not math.isfinite(loss):
            raise Diverged(f"loss is {loss} at step {step}")
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise Diverged(f"the gradients are not finite at step {step} (its loss {loss:.4g} "
                           "is); the update was not applied")
        if self.mean is not None and loss > self.factor * self.mean:
            self.streak += 1
            if self.streak >= self.patience:
                raise Diverged(f"loss {loss:.4g} at step {step} has stayed above "
                               f"{self.factor} x its running mean {self.mean:.4g} for "
                               f"{self.patience} steps")
            return
        self.streak = 0
        self.mean = loss if self.mean is None else 0.9 * self.mean + 0.1 * loss


def write_failure(out: Path, kind: str, step: int, message: str, ranks: Ranks = SINGLE) -> None:
    """failure.json (rank 0) or failure.rank<N>.json: why the run stopped, for the caller."""
    name = "failure.json" if ranks.main else f"failure.rank{ranks.rank}.json"
    (out / name).write_text(json.dumps({"kind": kind, "step": step, "message": message,
                                        "rank": ranks.rank}))
