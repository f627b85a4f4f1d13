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

    A call whose owner's lock is held (``owner_lock``: a writer child of a bot that may
    be dead still commits its records) is left open for a later pass, however the owner
    is judged: ended now, its last records would land after its call-ended. The lock
    files nobody holds any more are swept afterwards.

    Returns:
        The ids of the calls ended.
    """
    outbox.release_dead_owners(conn)
    candidates = calls_table.open_calls(conn, call_id)
    tokens = {token for _, _, _, token, _ in candidates}
    written = {token for token in tokens if owner_lock.is_held(directory, token)}
    # All at once where no writer process holds any; else call by call, leaving those out.
    orphans = [row[0] for row in candidates if row[3] not in written] if written else [call_id]
    waiting = [
        orphan
        for orphan, host, pid, token, _ in candidates
        if token in written and owner_is_gone(host, pid, token) is True
    ]
    if waiting:  # its bot is dead: say why the call stays open
        logger.info(
            f"pipecat-roark: {len(waiting)} call(s) left open while a writer process still "
            f"commits them: {', '.join(waiting[:5])}"
        )
    finalized: list[str] = []
    for orphan in orphans if candidates else []:
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


def calls_awaiting_writers(conn: sqlite3.Connection, directory: Path) -> list[str]:
    """The open calls whose owner is dead but whose writer child still holds its lock.

    A drainer leaves them open (``finalize_orphans``) until the child has committed
    everything the dead bot handed it and exited.

    Returns:
        Their ids; empty when no dead bot's writer child is still at work here.
    """
    return [
        call_id
        for call_id, host, pid, token, _ in calls_table.open_calls(conn)
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
