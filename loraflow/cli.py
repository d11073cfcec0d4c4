"""The `loraflow` command.

loraflow run [--config FILE] [section.field=value ...]   run the whole pipeline
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loraflow.config import ConfigError, load_config
from loraflow.data import DataError
from loraflow.environment import configure
from loraflow.model import ModelNotFoundError

USER_ERRORS = (ConfigError, DataError, ModelNotFoundError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraflow", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the fine-tuning pipeline")
    run.add_argument("--config", type=Path, help="YAML config (default: built-in defaults)")
    run.add_argument(
        "overrides",
        nargs="*",
        metavar="section.field=value",
        help="override one config value, e.g. train.max_steps=20",
    )
    args = parser.parse_args(argv)

    try:
        cfg = load_config(args.config, args.overrides)  # every config problem, before any work
    except ConfigError as exc:
        print(f"loraflow: {exc}", file=sys.stderr)
        return 2
    configure()
    from flows.finetune import finetune  # imports prefect/mlflow after the env is set

    try:
        finetune(config=cfg)
    except USER_ERRORS as exc:
        print(f"\nloraflow: the run stopped, nothing was registered:\n{exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
