"""Rows and calls whose owner is gone: its leases released, its open calls finalized."""

from __future__ import annotations

import sqlite3

from loguru import logger

from .. import faultpoints
from ..events import decode_event
from ..owner import Owner, effective_grace_us, owner_is_gone, parse_identity
from ..store import transaction
from ..timeline import DEFAULT_RECOVERY_REASON
from .rows import finalize_call, release

__all__ = [
    "finalize_orphans",
    "lease_owner_id",
    "release_dead_owners",
    "release_process_leases",
]


def lease_owner_id(owner: Owner, instance: str) -> str:
    """A lease owner names its process (with the identity that makes its pid meaningful),
    so a checker in the same PID namespace can take a dead process's leases back early."""
    return f"{owner.host}|{owner.pid}|{owner.token}|{instance}"


def release_process_leases(conn: sqlite3.Connection, owner: Owner) -> int:
    """At exit, every lease this process still holds goes back: a drainer cancelled while
    its claim was in flight leaves one behind, and the exit drain must not wait out a
    lease of its own process (on an ephemeral disk, that row would be lost)."""
    mine = parse_identity(owner.token)
    released = 0
    for (lease_owner,) in conn.execute(
        "SELECT DISTINCT lease_owner FROM deliveries WHERE state = 'leased'"
    ).fetchall():
        parts = str(lease_owner).split("|")
        if len(parts) != 4 or parts[:2] != [owner.host, str(owner.pid)]:
            continue
        theirs = parse_identity(parts[2])
        same = parts[2] == owner.token or (
            mine is not None
            and theirs is not None
            and (theirs.boot_id, theirs.pid_ns, theirs.start)
            == (mine.boot_id, mine.pid_ns, mine.start)
        )
        if same:
            released += release(conn, str(lease_owner))
    return released


def release_dead_owners(conn: sqlite3.Connection) -> int:
    """Leases of drainers certainly dead go back at once, not at expiry.

    Certainly dead means judged by pid from inside the drainer's own PID namespace on
    the same boot; a drainer anywhere else (another container of the pod, another host)
    keeps its leases until they expire, the lease being its heartbeat.
    """
    owners = [
        r[0]
        for r in conn.execute("SELECT DISTINCT lease_owner FROM deliveries WHERE state = 'leased'")
    ]
    released = 0
    for lease_owner in owners:
        parts = str(lease_owner).split("|")
        if len(parts) != 4 or not parts[1].isdigit():
            continue
        if owner_is_gone(parts[0], int(parts[1]), parts[2]) is True:
            released += release(conn, lease_owner)
    return released


def finalize_orphans(
    conn: sqlite3.Connection,
    *,
    now: int,
    grace_us: int,
    reason: str = DEFAULT_RECOVERY_REASON,
    call_id: str | None = None,
) -> list[str]:
    """End open calls whose owner is gone.

    Gone means: its pid is dead, as judged from inside its own PID namespace on the same
    boot; or, judged from anywhere else, its heartbeat is older than the grace (never
    less than three of the owner's own heartbeat intervals). While a call's heartbeat is
    fresh, only a checker that can see the owner's pid die ends it. The call ends at its
    last recorded event; the heartbeat is checked again under the write lock and the
    conditional UPDATE in finalize_call makes this exactly-once however many drainers
    look at the same call.
    """
    candidates = conn.execute(
        "SELECT id, owner_host, owner_pid, owner_token, heartbeat_at FROM calls"
        " WHERE state = 'open' AND (? IS NULL OR id = ?)",
        (call_id, call_id),
    ).fetchall()
    finalized: list[str] = []
    for orphan, host, pid, token, heartbeat_at in candidates:
        gone = owner_is_gone(host, pid, token)
        if gone is False:  # its process lives, seen from its own namespace: it will end it
            continue
        cutoff = now - effective_grace_us(token, grace_us)
        if gone is None and heartbeat_at >= cutoff:  # not ours to judge: trust the heartbeat
            continue
        try:
            if _finalize_one(conn, orphan, None if gone else cutoff, heartbeat_at, reason, now):
                finalized.append(orphan)
        except Exception as exc:  # one call's trouble must not keep the others open
            logger.error(
                f"pipecat-roark: could not finalize call {orphan!r} whose owner is gone "
                f"({type(exc).__name__}: {exc}); the other calls go on and it is tried again"
            )
    return finalized


def _finalize_one(
    conn: sqlite3.Connection,
    call_id: str,
    fresh_after: int | None,
    heartbeat_at: int,
    reason: str,
    now: int,
) -> bool:
    with transaction(conn):
        faultpoints.reached("drain:finalize-orphan", call_id)
        if (
            fresh_after is not None
            and conn.execute(
                "SELECT 1 FROM calls WHERE id = ? AND heartbeat_at >= ?", (call_id, fresh_after)
            ).fetchone()
        ):
            return False  # it heartbeated after we looked
        last = conn.execute(
            "SELECT body FROM events WHERE call_id = ? ORDER BY id DESC LIMIT 1", (call_id,)
        ).fetchone()
        at = _event_time(last[0]) if last else None
        return finalize_call(conn, call_id, at or heartbeat_at, reason, add_event=True, now=now)


def _event_time(body: bytes) -> int | None:
    try:
        return decode_event(body).at
    except Exception:  # a damaged event must not block finalizing the call
        return None
