"""loraflow watch: new data files -> Prefect events (a deployment trigger starts the pipeline).
"""

from __future__ import annotations

import argparse
import sys

from loraflow.environment import configure


def add_watch_command(commands: argparse._SubParsersAction) -> None:
    watch = commands.add_parser(
        "watch",
        help="watch a directory or s3:// prefix; emit a Prefect event per new data file",
    )
    watch.add_argument("location", help="a local directory or s3://bucket/prefix")
    watch.add_argument("--pattern", default="*.jsonl", help="file names that count as data")
    watch.add_argument(
        "--marker",
        help="a suffix (e.g. .done) whose file marks a data file complete; default: a file is "
        "complete when its size is the same on two polls in a row",
    )
    watch.add_argument(
        "--feedback", action="store_true",
        help="the files are preference feedback (pairs or KTO records): emit "
        "loraflow.feedback.landed, which starts an align-only run from the champion",
    )
    watch.add_argument("--interval", type=float, default=5.0, help="seconds between polls")
    watch.add_argument("--once", action="store_true", help="poll twice (interval apart), exit")
    watch.set_defaults(handler=watch_command)


def watch_command(args: argparse.Namespace) -> int:
    import os
    import time

    from loraflow.data.watch import (
        DATA_LANDED,
        FEEDBACK_LANDED,
        Watcher,
        as_payload,
        state_path,
    )

    home = configure()
    if not os.environ.get("PREFECT_API_URL"):
        print(
            "loraflow watch: PREFECT_API_URL is not set; events need a running Prefect server "
            "(infra/prefect-server.sh, then `. infra/env.sh`)",
            file=sys.stderr,
        )
        return 2
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    kind = "feedback" if args.feedback else "data"

    def emit(landed) -> None:  # noqa: ANN001 - a loraflow.watch.Landed
        event = emit_event(
            FEEDBACK_LANDED if args.feedback else DATA_LANDED,
            resource={
                "prefect.resource.id": f"loraflow.{kind}.{landed.sha256}",
                f"loraflow.{kind}.uri": landed.uri,
            },
            payload=as_payload(landed),
        )
        if event is None:
            raise RuntimeError(f"Prefect did not take the event for {landed.uri}")
        print(f"landed {landed.uri} sha256 {landed.sha256[:12]} -> event {event.id}", flush=True)

    try:
        watcher = Watcher(args.location, state_path(home, args.location), args.pattern, args.marker)
    except (FileNotFoundError, ValueError) as exc:
        print(f"loraflow watch: {exc}", file=sys.stderr)
        return 2
    print(f"watching {args.location} every {args.interval:g} s (state {watcher.state_file})")
    polls = 0
    while True:
        watcher.poll(emit)
        EventsWorker.drain_all(timeout=30)  # delivered before the next poll or exit
        polls += 1
        if args.once and polls >= (1 if args.marker else 2):
            return 0
        time.sleep(args.interval)
