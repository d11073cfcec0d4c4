"""loraflow watch: new data files -> Prefect events (a deployment trigger starts the pipeline).
"""

from __future__ import annotations

import argparse
import sys
import uuid

from loraflow.environment import configure

EVENT_NAMESPACE = uuid.UUID("6f1c8a52-3b8e-4c57-9a51-0c6f2f4d7e10")  # loraflow.data.landed ids


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
    """Poll until stopped. SIGTERM or SIGINT stop it between polls, with the state saved.

    Each event is posted to the Prefect server and counts as sent only once the server has
    answered: a file whose event was not taken (the server down past the client's retries)
    is not remembered and is sent again on a later poll. Each event's id derives from the
    file's SHA-256, so an event sent again, or sent by a second watcher of the same data, is
    the same event; the pipeline's claim on the content (tasks.deployments.claim_data) trains
    it once whatever number of runs the events start."""
    import fcntl
    import os
    import signal
    import threading

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
    from loraflow.credentials import CredentialsError, check_prefect

    try:
        check_prefect()  # the events go there: missing or refused credentials stop here
    except CredentialsError as exc:
        print(f"loraflow watch: {exc}", file=sys.stderr)
        return 3
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.events import Event

    kind = "feedback" if args.feedback else "data"
    client = get_client(sync_client=True)

    def emit(landed) -> None:  # noqa: ANN001 - a loraflow.data.watch.Landed
        event = Event(
            event=FEEDBACK_LANDED if args.feedback else DATA_LANDED,
            resource={
                "prefect.resource.id": f"loraflow.{kind}.{landed.sha256}",
                f"loraflow.{kind}.uri": landed.uri,
            },
            payload=as_payload(landed),
            id=uuid.uuid5(EVENT_NAMESPACE, landed.sha256),
        )
        # POST /events answers once the server has taken the event (the client retries
        # through a server restart of a few minutes); only then does poll() mark the file
        # seen. A watcher killed before that sends the same event again on restart.
        try:
            client.request("POST", "/events", json=[event.model_dump(mode="json")])
        except httpx.HTTPError as exc:
            raise NotDelivered(f"the event for {landed.uri} was not delivered ({exc}); "
                               "it is sent again on the next poll") from exc
        print(f"landed {landed.uri} sha256 {landed.sha256[:12]} -> event {event.id}", flush=True)

    def copied(landed, first: str) -> None:  # noqa: ANN001 - a loraflow.data.watch.Landed
        print(f"skipped {landed.uri}: the same bytes as {first} (sha256 {landed.sha256[:12]}), "
              f"which event {uuid.uuid5(EVENT_NAMESPACE, landed.sha256)} trains on", flush=True)

    try:
        watcher = Watcher(args.location, state_path(home, args.location), args.pattern, args.marker)
    except (FileNotFoundError, ValueError) as exc:
        print(f"loraflow watch: {exc}", file=sys.stderr)
        return 2
    # Two watchers of one location on one home would overwrite each other's state file; a
    # second watcher for availability runs with a home of its own (another machine).
    watcher.state_file.parent.mkdir(parents=True, exist_ok=True)
    with open(watcher.state_file.with_suffix(".lock"), "w") as lock, client:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until the watcher exits
        except BlockingIOError:
            print(f"loraflow watch: another watcher of {args.location} already uses the state "
                  f"file {watcher.state_file}; run a second watcher with a LORAFLOW_HOME of its "
                  "own", file=sys.stderr)
            return 2
        print(f"watching {args.location} every {args.interval:g} s (state {watcher.state_file})")
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        polls, undelivered = 0, False
        while True:
            try:
                watcher.poll(emit, copied)
                undelivered = False
            except NotDelivered as exc:  # the state is saved; the file comes again
                print(f"loraflow watch: {exc}", file=sys.stderr, flush=True)
                undelivered = True
            polls += 1
            if args.once and polls >= (1 if args.marker else 2):
                return 1 if undelivered else 0
            if stop.wait(args.interval):
                print(f"stopped; state saved in {watcher.state_file}", flush=True)
                return 0


class NotDelivered(RuntimeError):
    """The Prefect server did not take an event (down past the client's retries)."""
