"""What a drainer does besides delivering: ending orphaned calls and retention.

Both run on the drainer's connection (inside ``DrainDatabase.run``), between passes of
delivery; neither ever touches an undelivered row's data.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from loguru import logger

from . import call_ending, metrics, outbox
from .drain_policy import DrainPolicy
from .maintenance import prune_delivered
from .store import now_us
from .timeline import DEFAULT_RECOVERY_REASON

__all__ = ["finalize_orphans", "prune"]


def finalize_orphans(
    conn: sqlite3.Connection, policy: DrainPolicy, call_id: str | None = None
) -> list[str]:
    """Take back the leases of dead drainers and end the calls whose owner is gone.

    Returns:
        The ids of the calls ended.
    """
    outbox.release_dead_owners(conn)
    finalized = call_ending.finalize_orphans(
        conn,
        now=now_us(),
        grace_us=int(policy.orphan_grace_s * 1e6),
        call_id=call_id,
    )
    for call_id in finalized:
        metrics.finalized(DEFAULT_RECOVERY_REASON)
        logger.warning(
            f"pipecat-roark: call {call_id} never ended (its process is gone); finalized "
            f"from what was recorded with reason {DEFAULT_RECOVERY_REASON}"
        )
    return finalized


def prune(conn: sqlite3.Connection, directory: Path, policy: DrainPolicy) -> None:
    """Retention: delivered calls go after ``retention_s``; nothing undelivered ever does."""
    try:
        result = prune_delivered(conn, directory, policy.retention_s, now=now_us())
    except (OSError, sqlite3.Error) as exc:
        logger.warning(f"pipecat-roark: pruning delivered calls failed ({exc}); will retry")
        return
    if result.calls:
        logger.info(
            f"pipecat-roark: pruned {result.calls} delivered call(s) older than "
            f"{policy.retention_s / 86400:g} days ({result.bytes} bytes of audio)"
        )
