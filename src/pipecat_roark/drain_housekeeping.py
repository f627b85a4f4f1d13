"""What a drainer does besides delivering: ending orphaned calls and retention.

Both run on the drainer's connection (inside ``DrainDatabase.run``), between passes of
delivery; neither ever touches an undelivered row's data.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from loguru import logger

from . import call_ending, calls_table, metrics, outbox, owner_lock
from .drain_policy import DrainPolicy
from .maintenance import prune_delivered
from .owner import owner_is_gone
from .store import now_us
from .timeline import DEFAULT_RECOVERY_REASON

__all__ = ["calls_awaiting_writers", "finalize_orphans", "prune"]


def finalize_orphans(
    conn: sqlite3.Connection, directory: Path, policy: DrainPolicy, call_id: str | None = None
) -> list[str]:
    """Take back the leases of dead drainers and end the calls whose owner is gone.

    Except the calls of a dead bot whose writer child still holds the bot's lock
    (``owner_lock``): the child still commits what the bot sent it, and ended now, those
    records would land after the call-ended. They are left for a later pass. (Judged from
    another PID namespace, by heartbeat, the child's own heartbeats keep them open.) The
    lock files nobody holds any more are swept afterwards.

    Returns:
        The ids of the calls ended.
    """
    outbox.release_dead_owners(conn)
    waiting = calls_awaiting_writers(conn, directory, call_id)
    if waiting:
        logger.info(
            f"pipecat-roark: {len(waiting)} call(s) of a dead bot left open while its writer "
            f"process still commits them: {', '.join(waiting[:5])}"
        )
    # All at once, unless some wait: then one by one, leaving those out.
    orphans = [call_id]
    if waiting:
        orphans = [row[0] for row in calls_table.open_calls(conn, call_id)]
        orphans = [orphan for orphan in orphans if orphan not in waiting]
    finalized: list[str] = []
    for orphan in orphans:
        finalized += call_ending.finalize_orphans(
            conn, now=now_us(), grace_us=int(policy.orphan_grace_s * 1e6), call_id=orphan
        )
    for ended in finalized:
        metrics.finalized(DEFAULT_RECOVERY_REASON)
        logger.warning(
            f"pipecat-roark: call {ended} never ended (its process is gone); finalized "
            f"from what was recorded with reason {DEFAULT_RECOVERY_REASON}"
        )
    _sweep_lock_files(directory)
    return finalized


def calls_awaiting_writers(
    conn: sqlite3.Connection, directory: Path, call_id: str | None = None
) -> list[str]:
    """The open calls (or only ``call_id``) of a dead bot whose writer child holds its lock.

    Dead as judged by pid, from the bot's own PID namespace (``owner.owner_is_gone``).
    A drainer leaves them open (``finalize_orphans``) until the child has committed
    everything the bot handed it and exited.

    Returns:
        Their ids; empty when no dead bot's writer child is still at work here.
    """
    return [
        orphan
        for orphan, host, pid, token, _ in calls_table.open_calls(conn, call_id)
        if owner_is_gone(host, pid, token) is True and owner_lock.is_held(directory, token)
    ]


def _sweep_lock_files(directory: Path) -> None:
    try:
        owner_lock.sweep(directory)
    except OSError as exc:  # housekeeping: the next pass tries again
        logger.debug(f"pipecat-roark: sweeping lock files in {directory} failed ({exc})")


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
