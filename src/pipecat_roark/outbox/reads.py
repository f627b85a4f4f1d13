"""The read side and upkeep of the outbox, for inspection, maintenance and the CLI.

Counts, errors and rows; the drainer never reads through here.

A read about rows that JOINs ``chunks`` or ``calls`` (how many bytes the undelivered
chunks hold) is here: a statement lives with the table its outermost ``FROM`` names.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from ..calls_table import calls_waiting_for_other_key
from ..store import transaction

__all__ = [
    "DeliveryRow",
    "call_deliveries",
    "calls_delivered_with_note",
    "count_for_call",
    "counts_by_kind_and_state",
    "earliest_untouched_due_at",
    "last_undelivered_error",
    "make_due_again",
    "oldest_queued_at",
    "queued_count",
    "undelivered_audio_bytes",
    "undelivered_chunk_files",
    "undelivered_counts",
]


def undelivered_audio_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of recorded chunks Roark does not have yet (pending, leased or dead).

    Returns:
        Their recorded size in bytes, 0 when there are none.
    """
    row = conn.execute(
        "SELECT COALESCE(SUM(c.size), 0) FROM deliveries d"
        " JOIN chunks c ON c.call_id = d.call_id AND c.idx = d.chunk_idx"
        " WHERE d.kind = 'chunk' AND d.state IN ('pending', 'leased', 'dead')"
    ).fetchone()
    return int(row[0])


def undelivered_counts(
    conn: sqlite3.Connection, *, key_fp: str | None, call_id: str | None = None
) -> tuple[int, int, list[str]]:
    """What a drain with ``key_fp`` leaves behind (of all calls, or only ``call_id``).

    Returns:
        Its rows pending or leased, its dead rows, and the calls with undelivered rows
        recorded under another key.
    """
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
    others = calls_waiting_for_other_key(conn, key_fp, call_id)
    return int(pending), int(dead), others


def count_for_call(conn: sqlite3.Connection, call_id: str) -> int:
    """How many delivery rows the call has, in any state.

    Returns:
        The row count.
    """
    return int(
        conn.execute("SELECT count(*) FROM deliveries WHERE call_id = ?", (call_id,)).fetchone()[0]
    )


def queued_count(conn: sqlite3.Connection) -> int:
    """Rows still to be delivered (pending or leased): what a drain starts with.

    Returns:
        The row count.
    """
    return int(
        conn.execute(
            "SELECT count(*) FROM deliveries WHERE state IN ('pending', 'leased')"
        ).fetchone()[0]
    )


def counts_by_kind_and_state(conn: sqlite3.Connection) -> list[tuple[str, str, int]]:
    """The queue's depth by kind and state.

    Returns:
        (kind, state, rows) for every kind and state that has rows.
    """
    return [
        (str(kind), str(state), int(count))
        for kind, state, count in conn.execute(
            "SELECT kind, state, count(*) FROM deliveries GROUP BY kind, state"
        )
    ]


def oldest_queued_at(conn: sqlite3.Connection) -> int | None:
    """When the oldest row still to be delivered was queued.

    Returns:
        Its creation time in microseconds, or None when nothing is queued.
    """
    oldest = conn.execute(
        "SELECT MIN(created_at) FROM deliveries WHERE state IN ('pending', 'leased')"
    ).fetchone()[0]
    return None if oldest is None else int(oldest)


def last_undelivered_error(conn: sqlite3.Connection) -> tuple[str, str] | None:
    """The newest error of a row not delivered.

    Returns:
        That row's idempotency key and error, or None when no such row has one.
    """
    row = conn.execute(
        "SELECT idempotency_key, last_error FROM deliveries WHERE last_error IS NOT NULL"
        " AND state != 'delivered' ORDER BY id DESC LIMIT 1"
    ).fetchone()
    return None if row is None else (str(row[0]), str(row[1]))


def earliest_untouched_due_at(conn: sqlite3.Connection) -> int | None:
    """When the longest-waiting row fell due: far in the past means no drainer is working.

    A pending row falls due at its next attempt, a leased one at its lease's end.

    Returns:
        That time in microseconds, or None when nothing is queued.
    """
    due = conn.execute(
        "SELECT MIN(CASE WHEN state = 'pending' THEN next_attempt_at ELSE lease_expires_at END)"
        " FROM deliveries WHERE state IN ('pending', 'leased')"
    ).fetchone()[0]
    return None if due is None else int(due)


def calls_delivered_with_note(conn: sqlite3.Connection, prefix: str) -> list[str]:
    """Calls with a delivered row whose note (``last_error``) begins with ``prefix``.

    Returns:
        Their ids, each once.
    """
    return [
        str(call_id)
        for (call_id,) in conn.execute(
            "SELECT DISTINCT call_id FROM deliveries WHERE state = 'delivered'"
            " AND last_error LIKE ? || '%'",
            (prefix,),
        )
    ]


def undelivered_chunk_files(conn: sqlite3.Connection) -> list[tuple[str, int, str, int]]:
    """The chunk files a drain is going to read, in row order.

    Returns:
        (call id, index, path, recorded size) of each chunk still to be delivered.
    """
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
    """Every delivery row of one call, in the order they were queued.

    Returns:
        The rows as ``show`` presents them.
    """
    return [
        DeliveryRow(*row)
        for row in conn.execute(
            "SELECT idempotency_key, kind, state, attempts, next_attempt_at, last_error, delivered_at"
            " FROM deliveries WHERE call_id = ? ORDER BY id",
            (call_id,),
        )
    ]


def make_due_again(conn: sqlite3.Connection, *, call_id: str | None, now: int) -> int:
    """Dead and backing-off rows (of one call, or all) become due now with attempts reset.

    Returns:
        How many rows were made due.
    """
    with transaction(conn):
        return conn.execute(
            "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?,"
            " lease_owner = NULL, lease_expires_at = NULL"
            " WHERE (state = 'dead' OR (state = 'pending' AND attempts > 0))"
            " AND (? IS NULL OR call_id = ?)",
            (now, call_id, call_id),
        ).rowcount
