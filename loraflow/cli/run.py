"""loraflow run: the whole pipeline on one config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loraflow.base_model import ModelNotFoundError
from loraflow.config import ConfigError, load_config
from loraflow.data.records import DataError
from loraflow.environment import configure

USER_ERRORS = (ConfigError, DataError, ModelNotFoundError)  # a message and exit 1, no traceback


def add_run_command(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("run", help="run the fine-tuning pipeline")
    run.add_argument("--config", type=Path, help="YAML config (default: built-in defaults)")
    run.add_argument(
        "overrides",
        nargs="*",
        metavar="section.field=value",
        help="override one config value, e.g. train.max_steps=20",
    )
    run.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)  # every config problem, before any work
    except ConfigError as exc:
        print(f"loraflow: {exc}", file=sys.stderr)
        return 2
    configure()  # loads $LORAFLOW_CREDENTIALS_FILE
    from loraflow.credentials import CredentialsError, check_services

    try:
        check_services()  # a server that refuses the credentials: say so before any work
    except CredentialsError as exc:
        print(f"loraflow: {exc}", file=sys.stderr)
        return 3
    from flows.finetune import finetune  # imports prefect/mlflow after the env is set

    try:
        finetune(config=cfg)
    except USER_ERRORS as exc:
        print(f"\nloraflow: the run stopped, nothing was registered:\n{exc}", file=sys.stderr)
        return 1
    return 0
