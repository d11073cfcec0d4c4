"""Folders written whole or not at all: a staging folder beside the final name, renamed to it
when complete and removed on any failure, and a disk that fills up said in one clear error."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class DiskFullError(OSError):
    """No space left on the disk loraflow was writing to; the message names it and the fix."""


@contextmanager
def staged_dir(final: Path, doing: str) -> Iterator[Path]:
    """A staging folder beside `final`, renamed to it when the block ends well and removed
    when it fails: a folder named `final` is always complete. Running out of disk space
    becomes a DiskFullError that says where and what to do."""
    staging = final.with_name(final.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        yield staging
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if exc.errno != errno.ENOSPC:
            raise
        free = shutil.disk_usage(final.parent).free / 2**20
        raise DiskFullError(
            errno.ENOSPC,
            f"no space left on the disk of {final.parent} while {doing} ({free:.1f} MiB free); "
            "nothing half-written was kept. Fix: free space there (or point LORAFLOW_HOME at a "
            "disk with room) and run again.",
        ) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
