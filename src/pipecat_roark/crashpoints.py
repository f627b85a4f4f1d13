"""Named places where the crash tests kill this process with SIGKILL.

``PIPECAT_ROARK_CRASH_AT=<point>[:<n>]`` kills the process the n-th time (default 1st)
execution reaches ``<point>``. It lets tests/crash/ hit the exact windows that random
timing rarely does (between a chunk file and its row, mid-migration, after an upload
but before it is marked delivered). Unset, ``reached`` is one comparison.
"""

from __future__ import annotations

import os
import signal

__all__ = ["POINTS", "reached"]

POINTS = (
    "before-commit",
    "chunk-half-written",
    "chunk-file-durable",
    "mid-migration",
    "after-upload",
    "after-call-ended",
)


def _parse(raw: str | None) -> tuple[str | None, int]:
    if not raw:
        return None, 0
    name, _, count = raw.partition(":")
    return name, int(count) if count.isdigit() else 1


_POINT, _AT = _parse(os.environ.get("PIPECAT_ROARK_CRASH_AT"))
_hits = 0


def reached(point: str) -> None:
    """SIGKILL this process if the crash test armed ``point`` and its count is reached."""
    global _hits
    if _POINT is None or point != _POINT:
        return
    _hits += 1
    if _hits >= _AT:
        os.kill(os.getpid(), signal.SIGKILL)
