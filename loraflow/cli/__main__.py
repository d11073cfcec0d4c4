"""python -m loraflow.cli: the `loraflow` command."""

import sys

from loraflow.cli import main

sys.exit(main())
