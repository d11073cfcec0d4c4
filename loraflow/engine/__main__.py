"""The training engine as a plain process:

    python -m loraflow.engine --config RUN_DIR/engine.json

Reads tokenized examples and a typed config, trains, and writes to the run directory:
metrics.jsonl (one JSON object per optimizer step, plus validation losses), checkpoints/
(resumable: adapter, optimizer, data position, RNG; safetensors + JSON), adapter/ (PEFT,
safetensors), result.json, and failure.json when it stops early. A rerun with the same run
directory resumes from the last checkpoint. It imports neither Prefect nor MLflow, so it runs
unchanged on a GPU worker that has neither; the launcher (loraflow.engine.launch) relays the
metrics. Exit codes: loraflow.engine.config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from loraflow.engine.config import EXIT_DIVERGED, EXIT_OOM, EXIT_REFUSED, EngineConfig
from loraflow.engine.distributed import Ranks
from loraflow.engine.guards import Diverged, write_failure
from loraflow.engine.preflight import PreflightError
from loraflow.engine.run import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a LoRA adapter (loraflow engine).")
    parser.add_argument("--config", type=Path, required=True, help="engine config JSON")
    args = parser.parse_args(argv)
    cfg = EngineConfig.model_validate_json(args.config.read_text(encoding="utf-8"))
    try:
        result = train(cfg)
    except torch.OutOfMemoryError as exc:
        rank = int(os.environ.get("RANK", "0"))
        message = (f"out of memory with micro_batch_size={cfg.train.micro_batch_size}"
                   f"{f' on rank {rank}' if rank else ''}: {exc}. A retry halves the "
                   "micro-batch and doubles accumulation.")
        write_failure(Path(cfg.output_dir), "oom", -1, message, Ranks(rank=rank))
        print(f"loraflow.engine: {message}", file=sys.stderr)
        return EXIT_OOM
    except Diverged as exc:
        print(f"\nloraflow.engine: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except PreflightError as exc:
        write_failure(Path(cfg.output_dir), "preflight", 0, str(exc),
                      Ranks(rank=int(os.environ.get("RANK", "0"))))
        print(f"loraflow.engine: preflight: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
