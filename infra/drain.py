"""Wait until the Prefect server has no flow run in flight (pending, running, cancelling):
infra/stop.sh runs this before it stops the workers, whose SIGTERM would cut a training off.

  python infra/drain.py [--timeout S]      exit 0 when none is left, 1 when S passed first
                                           (or Ctrl-C stopped the waiting)

Needs PREFECT_API_URL and the credentials (run under `python -m loraflow.credentials`).
"""

from __future__ import annotations

import argparse
import sys

from tasks.deployments import wait_for_runs_in_flight


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds (default 3600)")
    args = parser.parse_args()
    try:
        left = wait_for_runs_in_flight(args.timeout, say=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print("stopped waiting (Ctrl-C): the runs still in flight will be cut off", flush=True)
        return 1
    if left:
        print(f"{len(left)} flow run(s) still in flight after {args.timeout:g} s: stopping the "
              "workers cuts them off (they end CRASHED: start them again after the next "
              "start, e.g. infra/prefect.sh deployment run finetune/finetune)", flush=True)
        return 1
    print("no flow run in flight", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
