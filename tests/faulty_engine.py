"""The training engine with a fault installed, for the tests of its guards (a real NaN loss or
a hung rank cannot be summoned on demand):

    python -m faulty_engine --nan-at-step 5 --config engine.json      (tests/ on the path)
"""

import argparse
import sys

from loraflow.engine.__main__ import main
from loraflow.engine.guards import FAULTS

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--nan-at-step", type=int, default=0)
    parser.add_argument("--stall-seconds", type=float, default=0.0)
    parser.add_argument("--stall-rank", type=int, default=0)
    faults, engine_args = parser.parse_known_args()
    FAULTS.nan_at_step, FAULTS.stall_rank = faults.nan_at_step, faults.stall_rank
    FAULTS.stall_seconds = faults.stall_seconds
    sys.exit(main(engine_args))
