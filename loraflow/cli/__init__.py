"""The `loraflow` command.

loraflow run [--config FILE] [section.field=value ...]   run the whole pipeline
loraflow sweep --config FILE [section.field=value ...]   search hyperparameters, release winner
loraflow models [NAME]                                    list versions, aliases and metrics
loraflow promote [NAME] --version N | --rollback          move alias champion by hand
loraflow pull [NAME] [--alias A | --version N] [--dest D] download a version, verify checksums
loraflow versions [NAME] [--alias A | --version N]       libraries it was trained with vs here

NAME defaults to registry.model_name of --config (or the built-in default). The registry is
the one MLFLOW_TRACKING_URI names (default: the embedded one under $LORAFLOW_HOME).
loraflow validate PATH... [--json]                       validate and clean data, train nothing
loraflow generate MODEL --prompt TEXT | --prompts FILE    answer with a registered or local model
loraflow watch LOCATION [--interval S] [--once]           emit a Prefect event per new data file
"""

from __future__ import annotations

import argparse

from loraflow.cli.data import add_validate_command
from loraflow.cli.generate import add_generate_command
from loraflow.cli.release import (
    add_models_command,
    add_promote_command,
    add_pull_command,
    add_versions_command,
)
from loraflow.cli.run import add_run_command, add_sweep_command
from loraflow.cli.watch import add_watch_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraflow", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (add_run_command, add_sweep_command, add_validate_command, add_models_command,
                add_promote_command, add_pull_command, add_versions_command, add_generate_command,
                add_watch_command):
        add(commands)
    args = parser.parse_args(argv)
    return args.handler(args)
