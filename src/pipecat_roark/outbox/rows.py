"""Delivery rows: enqueued with their call's rows, claimed with leases, settled once."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from ..store import transaction
from ..wire import call_ended_key, call_started_key, chunk_key

__all__ = [
    "Delivery",
    "claim",
    "enqueue_call_ended",
    "enqueue_call_started",
    "enqueue_chunk",
    "mark_dead",
    "mark_delivered",
    "mark_retry",
    "next_due",
    "release",
    "renew_leases",
]


@dataclass(frozen=True, slots=True)
class Delivery:
    """A claimed row: what to deliver (``kind``, chunk index) and under which key."""

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


def enqueue_call_ended(conn: sqlite3.Connection, call_id: str, now: int) -> None:
    """Queue a call's call-ended delivery (inside the caller's transaction; once)."""
    conn.execute(
        "INSERT OR IGNORE INTO deliveries (call_id, kind, idempotency_key, next_attempt_at,"
        " created_at) VALUES (?, 'call-ended', ?, ?, ?)",
        (call_id, call_ended_key(call_id), now, now),
    )


def next_due(
    conn: sqlite3.Connection, *, key_fp: str | None, call_id: str | None = None
) -> tuple[int | None, bool]:
    """When the drainer should look again for rows of ``key_fp`` (or of one call).

    Returns:
        The earliest next attempt of a ready pending row (µs, None if there is none),
        and whether ready rows are leased right now.
    """
    row = conn.execute(_NEXT_DUE, {"key_fp": key_fp, "call_id": call_id}).fetchone()
    earliest = conn.execute(
        _NEXT_DUE.replace("d.state IN ('pending', 'leased')", "d.state = 'pending'"),
        {"key_fp": key_fp, "call_id": call_id},
    ).fetchone()[0]
    return (None if earliest is None else int(earliest)), bool(row[1])


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
    """Lease up to ``limit`` rows that are due and ready, in one write transaction.

    Returns:
        The rows now leased to ``owner`` until ``now + lease_us``, by id.
    """
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
    """Settle many rows in one transaction.

    ``notes`` (by row id) stay in ``last_error`` of a delivered row: what was salvaged
    (events that did not decode and were left out), so ``status`` and ``show`` can say so.

    Returns:
        The ids marked delivered: those whose lease was still ours.
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
    """Push out the expiry of every lease ``owner`` holds.

    A drainer that is alive and working (a long upload, a batch behind slow requests)
    keeps its rows.

    Returns:
        How many leases were renewed.
    """
    with transaction(conn):
        return conn.execute(
            "UPDATE deliveries SET lease_expires_at = ? WHERE state = 'leased' AND lease_owner = ?",
            (expires, owner),
        ).rowcount


def mark_retry(
    conn: sqlite3.Connection, delivery: Delivery, *, owner: str, error: str, next_attempt_at: int
) -> bool:
    """A failed attempt: the row is pending again from ``next_attempt_at``, with its error.

    Returns:
        True if the row was still leased to ``owner`` (and so was marked).
    """
    return _settle(
        conn,
        "UPDATE deliveries SET state = 'pending', attempts = attempts + 1, next_attempt_at = ?,"
        " last_error = ?, lease_owner = NULL, lease_expires_at = NULL"
        " WHERE id = ? AND state = 'leased' AND lease_owner = ?",
        (next_attempt_at, error, delivery.id, owner),
    )


def mark_dead(conn: sqlite3.Connection, delivery: Delivery, *, owner: str, error: str) -> bool:
    """The row gave up: dead with its error, kept for inspection and ``retry``.

    Returns:
        True if the row was still leased to ``owner`` (and so was marked).
    """
    return _settle(
        conn,
        "UPDATE deliveries SET state = 'dead', attempts = attempts + 1, last_error = ?,"
        " lease_owner = NULL, lease_expires_at = NULL"
        " WHERE id = ? AND state = 'leased' AND lease_owner = ?",
        (error, delivery.id, owner),
    )


def release(conn: sqlite3.Connection, owner: str, delivery: Delivery | None = None) -> int:
    """Give leases back untouched (a clean stop, or a paused key): no attempt is counted.

    Returns:
        How many rows were handed back (all of ``owner``'s, or only ``delivery``).
    """
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
