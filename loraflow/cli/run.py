"""loraflow run: the whole pipeline on one config; loraflow sweep: the same, its training a
hyperparameter search whose winner goes through the gate (flows/sweep.py).

Everything that can be checked before the run starts is (the config, the credentials, every
data file), and a user error ends the run with one message and no traceback: Prefect's own
report of it (its traceback, the failed states quoting it) is left out of the run's log (the
terminal and the Prefect server's copy; the flow run's state message still holds the error).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from loraflow.artifacts import ArtifactIntegrityError
from loraflow.base_model import ModelNotFoundError
from loraflow.config import ConfigError, load_config
from loraflow.data.records import DataError
from loraflow.environment import configure
from loraflow.staging import DiskFullError

# a message and exit 1, no traceback
USER_ERRORS = (ConfigError, DataError, ModelNotFoundError, DiskFullError, ArtifactIntegrityError)


def add_run_command(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("run", help="run the fine-tuning pipeline")
    run.add_argument("--config", type=Path, help="YAML config (default: built-in defaults)")
    run.add_argument(
        "overrides",
        nargs="*",
        metavar="section.field=value",
        help="override one config value, e.g. train.max_steps=20",
    )
    run.set_defaults(handler=run_command, sweep=False)


def add_sweep_command(commands: argparse._SubParsersAction) -> None:
    sweep = commands.add_parser(
        "sweep", help="search hyperparameters on the validation split; release the winner")
    sweep.add_argument("--config", type=Path, required=True,
                       help="YAML config with a `sweep` section (see README, Sweeps)")
    sweep.add_argument("overrides", nargs="*", metavar="section.field=value",
                       help="override one config value, e.g. sweep.n_trials=8")
    sweep.set_defaults(handler=run_command, sweep=True)


def run_command(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)  # every config problem, before any work
    except ConfigError as exc:
        print(f"loraflow: {exc}", file=sys.stderr)
        return 2
    if args.sweep and cfg.sweep is None:
        print(f"loraflow: {args.config} has no `sweep` section: nothing to search. Fix: add "
              "one (parameters, n_trials, objective; see README, Sweeps)", file=sys.stderr)
        return 2
    configure()  # loads $LORAFLOW_CREDENTIALS_FILE
    from loraflow.credentials import CredentialsError, check_services
    from loraflow.data.sources import check_splits

    try:
        check_services()  # a server that refuses the credentials: say so before any work
    except CredentialsError as exc:
        print(f"loraflow: {exc}", file=sys.stderr)
        return 3
    try:  # every data file exists and is what its name says, before the base model is read
        check_splits(cfg.data)
        if cfg.align is not None:
            check_splits(cfg.align, "align")
    except DataError as exc:
        print(f"loraflow: nothing ran: {exc}", file=sys.stderr)
        return 2
    problem = start_prefect()
    if problem:
        print(f"loraflow: {problem}", file=sys.stderr)
        return 1
    from flows.finetune import finetune  # imports prefect/mlflow after the env is set
    from flows.sweep import sweep
    from loraflow.search import NoTrialSucceeded
    from tasks.steps import DeclaredDeadError

    stopped = USER_ERRORS + (DeclaredDeadError, NoTrialSucceeded)
    quiet = QuietErrors(stopped)
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(quiet)
    try:
        (sweep if args.sweep else finetune)(config=cfg)
    except stopped as exc:
        print(f"\nloraflow: the run stopped, nothing was registered:\n{exc}", file=sys.stderr)
        return 1
    finally:
        for name in ("prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).removeFilter(quiet)
    return 0


class QuietErrors(logging.Filter):
    """Drops Prefect's records of the errors `loraflow run` reports itself: the one carrying
    the traceback, and the later ones quoting the same message (the failed task's and flow's
    final states). Other records pass."""

    def __init__(self, kinds: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self.kinds, self.quoted = kinds, set[str]()

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, self.kinds):
            self.quoted.add(str(error).strip().splitlines()[0] if str(error).strip() else "")
            return False
        message = record.getMessage()
        return not any(text and text in message for text in self.quoted)


def start_prefect() -> str | None:
    """With no PREFECT_API_URL, start Prefect's temporary server now, before the flow, so that
    a start that times out (a loaded machine) is one message saying what to do instead of
    Prefect's traceback from inside the flow. None when it answers (or a server is set)."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    )

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None  # a real server, or Prefect's own error that one is needed
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one the flow's client takes (Prefect keeps one)
    try:
        server.start()
    except RuntimeError as exc:
        if "ephemeral Prefect API server" not in str(exc):
            raise
        server.stop()  # a failed start leaves its process behind
        waited = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        return (
            f"Prefect's temporary server did not answer within {waited} s "
            "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS), usually because the machine "
            "is busy; nothing ran. Fix: start a Prefect server that stays up (`make "
            "ui-prefect`, or `prefect server start`), then `export "
            "PREFECT_API_URL=http://127.0.0.1:4200/api` and run again; or raise "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS."
        )
    return None
