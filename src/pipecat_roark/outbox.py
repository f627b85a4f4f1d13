"""The outbox: the SQL of delivery rows, claimed with leases by any number of drainers.

A row is ``pending → leased → delivered``, or ``dead`` with its last error. Leases,
not locks: a drainer claims rows with one conditional UPDATE inside ``BEGIN
IMMEDIATE``, so two live drainers never hold the same row, and a crashed drainer's
rows become claimable again when its lease expires (the retry carries the same
idempotency key). Every outcome is written only while we still hold the lease.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from loguru import logger

from . import faultpoints
from .events import CallClosed, decode_event, encode_event
from .owner import Owner, effective_grace_us, owner_is_gone, parse_identity
from .store import transaction
from .timeline import DEFAULT_RECOVERY_REASON
from .wire import call_ended_key, call_started_key, chunk_key

__all__ = [
    "Delivery",
    "claim",
    "enqueue_call_started",
    "enqueue_chunk",
    "finalize_call",
    "finalize_orphans",
    "mark_dead",
    "mark_delivered",
    "mark_retry",
    "next_due",
    "lease_owner_id",
    "release",
    "release_dead_owners",
    "renew_leases",
    "release_process_leases",
    "undelivered_audio_bytes",
    "undelivered_counts",
]


@dataclass(frozen=True, slots=True)
class Delivery:
    id: int
    call_id: str
    kind: str
    chunk_idx: int | None
    idempotency_key: str
    attempts: int
    created_at: int


# Per call: call-started first; chunks once call-started is settled; call-ended once the
# call has ended and every chunk is settled. Calls recorded under another key are not ours.
_READY = """
      (c.key_fp IS NULL OR c.key_fp = :key_fp)
      AND (:call_id IS NULL OR d.call_id = :call_id)
      AND (d.kind = 'call-started' OR EXISTS (
            SELECT 1 FROM deliveries s WHERE s.call_id = d.call_id
              AND s.kind = 'call-started' AND s.state IN ('delivered', 'dead')))
      AND (d.kind != 'call-ended' OR (c.state = 'ended' AND NOT EXISTS (
            SELECT 1 FROM deliveries x WHERE x.call_id = d.call_id
              AND x.kind = 'chunk' AND x.state NOT IN ('delivered', 'dead'))))
"""

# Pending rows in id order, then leases that expired (their holder died): two index walks
# on (state, id) that stop at the limit, never a sort of the whole backlog.
_CLAIM = f"""
UPDATE deliveries SET state = 'leased', lease_owner = :owner, lease_expires_at = :expires
WHERE id IN (
    SELECT id FROM (
        SELECT d.id FROM deliveries d INDEXED BY deliveries_state_id
        JOIN calls c ON c.id = d.call_id
        WHERE d.state = 'pending' AND d.next_attempt_at <= :now AND {_READY}
        ORDER BY d.id LIMIT :limit
    )
    UNION ALL
    SELECT id FROM (
        SELECT d.id FROM deliveries d INDEXED BY deliveries_state_id
        JOIN calls c ON c.id = d.call_id
        WHERE d.state = 'leased' AND d.lease_expires_at < :now AND {_READY}
        ORDER BY d.id LIMIT :limit
    )
    ORDER BY id
    LIMIT :limit
)
RETURNING id, call_id, kind, chunk_idx, idempotency_key, attempts, created_at
"""

_NEXT_DUE = f"""
SELECT MIN(d.next_attempt_at), SUM(d.state = 'leased')
FROM deliveries d JOIN calls c ON c.id = d.call_id
WHERE d.state IN ('pending', 'leased') AND {_READY}
"""


def enqueue_call_started(conn: sqlite3.Connection, call_id: str, now: int) -> None:
    """Queue a call's call-started delivery (inside the caller's transaction; once)."""
    conn.execute(
        "INSERT OR IGNORE INTO deliveries (call_id, kind, idempotency_key, next_attempt_at,"
        " created_at) VALUES (?, 'call-started', ?, ?, ?)",
        (call_id, call_started_key(call_id), now, now),
    )


def enqueue_chunk(conn: sqlite3.Connection, call_id: str, index: int, now: int) -> None:
    """Queue the delivery of chunk ``index`` of a call (inside the caller's transaction; once)."""
    conn.execute(
        "INSERT OR IGNORE INTO deliveries (call_id, kind, chunk_idx, idempotency_key,"
        " next_attempt_at, created_at) VALUES (?, 'chunk', ?, ?, ?, ?)",
        (call_id, index, chunk_key(call_id, index), now, now),
    )


def finalize_call(
    conn: sqlite3.Connection, call_id: str, at: int, reason: str, *, add_event: bool, now: int
) -> bool:
    """End an open call and queue its call-ended delivery (inside the caller's transaction).

    The one place a call ends, whether its observer saw the end or a drainer finalizes
    an orphan: both must leave the same rows. Returns False if the call was not open.
    """
    cursor = conn.execute(
        "UPDATE calls SET state = 'ended', ended_at = ?, end_reason = ?, heartbeat_at = ?"
        " WHERE id = ? AND state = 'open'",
        (at, reason, now, call_id),
    )
    if cursor.rowcount == 0:
        return False
    if add_event:
        conn.execute(
            "INSERT INTO events (call_id, body) VALUES (?, ?)",
            (call_id, encode_event(CallClosed(at=at, reason=reason))),
        )
    conn.execute(
        "INSERT OR IGNORE INTO deliveries (call_id, kind, idempotency_key, next_attempt_at,"
        " created_at) VALUES (?, 'call-ended', ?, ?, ?)",
        (call_id, call_ended_key(call_id), now, now),
    )
    return True


def undelivered_audio_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of recorded chunks Roark does not have yet (pending, leased or dead)."""
    row = conn.execute(
        "SELECT COALESCE(SUM(c.size), 0) FROM deliveries d"
        " JOIN chunks c ON c.call_id = d.call_id AND c.idx = d.chunk_idx"
        " WHERE d.kind = 'chunk' AND d.state IN ('pending', 'leased', 'dead')"
    ).fetchone()
    return int(row[0])


def next_due(
    conn: sqlite3.Connection, *, key_fp: str | None, call_id: str | None = None
) -> tuple[int | None, bool]:
    """(earliest next attempt of a ready pending row, whether ready rows are leased right now)."""
    row = conn.execute(_NEXT_DUE, {"key_fp": key_fp, "call_id": call_id}).fetchone()
    earliest = conn.execute(
        _NEXT_DUE.replace("d.state IN ('pending', 'leased')", "d.state = 'pending'"),
        {"key_fp": key_fp, "call_id": call_id},
    ).fetchone()[0]
    return (None if earliest is None else int(earliest)), bool(row[1])


def undelivered_counts(
    conn: sqlite3.Connection, *, key_fp: str | None, call_id: str | None = None
) -> tuple[int, int, list[str]]:
    """What a drain with ``key_fp`` leaves behind: (its rows pending or leased, its dead
    rows, the calls with undelivered rows recorded under another key)."""
    mine = "(c.key_fp IS NULL OR c.key_fp = ?) AND (? IS NULL OR d.call_id = ?)"
    pending = conn.execute(
        "SELECT count(*) FROM deliveries d JOIN calls c ON c.id = d.call_id"
        f" WHERE d.state IN ('pending', 'leased') AND {mine}",
        (key_fp, call_id, call_id),
    ).fetchone()[0]
    dead = conn.execute(
        "SELECT count(*) FROM deliveries d JOIN calls c ON c.id = d.call_id"
        f" WHERE d.state = 'dead' AND {mine}",
        (key_fp, call_id, call_id),
    ).fetchone()[0]
    others = [
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT c.id FROM calls c JOIN deliveries d ON d.call_id = c.id"
            " WHERE d.state IN ('pending', 'leased') AND c.key_fp IS NOT NULL AND c.key_fp != ?"
            " AND (? IS NULL OR c.id = ?) ORDER BY c.id",
            (key_fp, call_id, call_id),
        )
    ]
    return int(pending), int(dead), others


def claim(
    conn: sqlite3.Connection,
    *,
    owner: str,
    now: int,
    lease_us: int,
    limit: int,
    key_fp: str | None,
    call_id: str | None = None,
) -> list[Delivery]:
    """Lease up to ``limit`` rows that are due and ready, in one write transaction."""
    with transaction(conn):
        rows = conn.execute(
            _CLAIM,
            {
                "owner": owner,
                "expires": now + lease_us,
                "now": now,
                "key_fp": key_fp,
                "call_id": call_id,
                "limit": limit,
            },
        ).fetchall()
    return sorted((Delivery(*row) for row in rows), key=lambda d: d.id)


def _settle(conn: sqlite3.Connection, sql: str, params: tuple[object, ...]) -> bool:
    with transaction(conn):
        return conn.execute(sql, params).rowcount == 1


def mark_delivered(
    conn: sqlite3.Connection,
    deliveries: list[Delivery],
    *,
    owner: str,
    now: int,
    notes: dict[int, str] | None = None,
) -> set[int]:
    """Settle many rows in one transaction; returns the ids whose lease was still ours.

    ``notes`` (by row id) stay in ``last_error`` of a delivered row: what was salvaged
    (events that did not decode and were left out), so ``status`` and ``show`` can say so.
    """
    notes = notes or {}
    confirmed: set[int] = set()
    with transaction(conn):
        for delivery in deliveries:
            if (
                conn.execute(
                    "UPDATE deliveries SET state = 'delivered', delivered_at = ?,"
                    " attempts = attempts + 1, lease_owner = NULL, lease_expires_at = NULL,"
                    " last_error = ? WHERE id = ? AND state = 'leased' AND lease_owner = ?",
                    (now, notes.get(delivery.id), delivery.id, owner),
                ).rowcount
                == 1
            ):
                confirmed.add(delivery.id)
    return confirmed


def renew_leases(conn: sqlite3.Connection, owner: str, expires: int) -> int:
    """Push out the expiry of every lease ``owner`` holds: a drainer that is alive and
    working (a long upload, a batch behind slow requests) keeps its rows."""
    with transaction(conn):
        return conn.execute(
            "UPDATE deliveries SET lease_expires_at = ? WHERE state = 'leased' AND lease_owner = ?",
            (expires, owner),
        ).rowcount


def mark_retry(
    conn: sqlite3.Connection, delivery: Delivery, *, owner: str, error: str, next_attempt_at: int
) -> bool:
    return _settle(
        conn,
        "UPDATE deliveries SET state = 'pending', attempts = attempts + 1, next_attempt_at = ?,"
        " last_error = ?, lease_owner = NULL, lease_expires_at = NULL"
        " WHERE id = ? AND state = 'leased' AND lease_owner = ?",
        (next_attempt_at, error, delivery.id, owner),
    )


def mark_dead(conn: sqlite3.Connection, delivery: Delivery, *, owner: str, error: str) -> bool:
    return _settle(
        conn,
        "UPDATE deliveries SET state = 'dead', attempts = attempts + 1, last_error = ?,"
        " lease_owner = NULL, lease_expires_at = NULL"
        " WHERE id = ? AND state = 'leased' AND lease_owner = ?",
        (error, delivery.id, owner),
    )


def release(conn: sqlite3.Connection, owner: str, delivery: Delivery | None = None) -> int:
    """Give leases back untouched (a clean stop, or a paused key): no attempt is counted."""
    sql = (
        "UPDATE deliveries SET state = 'pending', lease_owner = NULL, lease_expires_at = NULL"
        " WHERE state = 'leased' AND lease_owner = ?"
    )
    params: tuple[object, ...] = (owner,)
    if delivery is not None:
        sql += " AND id = ?"
        params = (owner, delivery.id)
    with transaction(conn):
        return conn.execute(sql, params).rowcount


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


# Read side and maintenance (used by inspection, maintenance and the CLI)


def queued_count(conn: sqlite3.Connection) -> int:
    """Rows still to be delivered (pending or leased): what a drain starts with."""
    return int(
        conn.execute(
            "SELECT count(*) FROM deliveries WHERE state IN ('pending', 'leased')"
        ).fetchone()[0]
    )


def counts_by_kind_and_state(conn: sqlite3.Connection) -> list[tuple[str, str, int]]:
    """(kind, state, rows) for every kind and state that has rows: the queue's depth."""
    return [
        (str(kind), str(state), int(count))
        for kind, state, count in conn.execute(
            "SELECT kind, state, count(*) FROM deliveries GROUP BY kind, state"
        )
    ]


def oldest_queued_at(conn: sqlite3.Connection) -> int | None:
    """When the oldest row still to be delivered was queued (µs), or None."""
    oldest = conn.execute(
        "SELECT MIN(created_at) FROM deliveries WHERE state IN ('pending', 'leased')"
    ).fetchone()[0]
    return None if oldest is None else int(oldest)


def last_undelivered_error(conn: sqlite3.Connection) -> tuple[str, str] | None:
    """(idempotency key, error) of the newest row not delivered that has an error, or None."""
    row = conn.execute(
        "SELECT idempotency_key, last_error FROM deliveries WHERE last_error IS NOT NULL"
        " AND state != 'delivered' ORDER BY id DESC LIMIT 1"
    ).fetchone()
    return None if row is None else (str(row[0]), str(row[1]))


def earliest_untouched_due_at(conn: sqlite3.Connection) -> int | None:
    """When the longest-waiting row fell due (µs), or None: pending past its next attempt,
    or leased past its lease's end. Far in the past means no drainer is working."""
    due = conn.execute(
        "SELECT MIN(CASE WHEN state = 'pending' THEN next_attempt_at ELSE lease_expires_at END)"
        " FROM deliveries WHERE state IN ('pending', 'leased')"
    ).fetchone()[0]
    return None if due is None else int(due)


def calls_delivered_with_note(conn: sqlite3.Connection, prefix: str) -> list[str]:
    """Calls with a delivered row whose note (``last_error``) begins with ``prefix``."""
    return [
        str(call_id)
        for (call_id,) in conn.execute(
            "SELECT DISTINCT call_id FROM deliveries WHERE state = 'delivered'"
            " AND last_error LIKE ? || '%'",
            (prefix,),
        )
    ]


def undelivered_chunk_files(conn: sqlite3.Connection) -> list[tuple[str, int, str, int]]:
    """(call id, index, path, recorded size) of each chunk still to be delivered, in row
    order: the files a drain is going to read."""
    return [
        (str(call_id), int(idx), str(path), int(size))
        for call_id, idx, path, size in conn.execute(
            "SELECT c.call_id, c.idx, c.path, c.size FROM deliveries d"
            " JOIN chunks c ON c.call_id = d.call_id AND c.idx = d.chunk_idx"
            " WHERE d.kind = 'chunk' AND d.state IN ('pending', 'leased') ORDER BY d.id"
        )
    ]


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    """One delivery row as ``show`` presents it."""

    key: str
    kind: str
    state: str
    attempts: int
    next_attempt_at: int
    last_error: str | None
    delivered_at: int | None


def call_deliveries(conn: sqlite3.Connection, call_id: str) -> list[DeliveryRow]:
    """Every delivery row of one call, in the order they were queued."""
    return [
        DeliveryRow(*row)
        for row in conn.execute(
            "SELECT idempotency_key, kind, state, attempts, next_attempt_at, last_error, delivered_at"
            " FROM deliveries WHERE call_id = ? ORDER BY id",
            (call_id,),
        )
    ]


def make_due_again(conn: sqlite3.Connection, *, call_id: str | None, now: int) -> int:
    """Dead and backing-off rows (of one call, or all) become due now with attempts reset;
    returns how many."""
    with transaction(conn):
        return conn.execute(
            "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?,"
            " lease_owner = NULL, lease_expires_at = NULL"
            " WHERE (state = 'dead' OR (state = 'pending' AND attempts > 0))"
            " AND (? IS NULL OR call_id = ?)",
            (now, call_id, call_id),
        ).rowcount


__all__ += [
    "DeliveryRow",
    "call_deliveries",
    "calls_delivered_with_note",
    "counts_by_kind_and_state",
    "earliest_untouched_due_at",
    "last_undelivered_error",
    "make_due_again",
    "oldest_queued_at",
    "queued_count",
    "undelivered_chunk_files",
]
