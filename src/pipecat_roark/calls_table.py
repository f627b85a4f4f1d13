"""The ``calls`` table: every statement on it, and every read about calls.

One row per call: who recorded it (owner and heartbeat), its audio format, whether it
ended and why. A statement lives with the table its outermost ``FROM``, ``INTO`` or
``UPDATE`` names; so a read about calls that JOINs or subqueries ``deliveries`` (is
this call delivered whole?) is here, and the outbox owns the reads about rows.
Plain statements, no policy: each runs inside the caller's transaction, or on the
caller's read connection; ``tests/test_table_owners.py`` keeps the rule.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from typing import Any

from .events import CallOpened
from .owner import Owner

__all__ = [
    "OpenCallRow",
    "call_exists",
    "call_record_state",
    "call_row",
    "call_summaries",
    "calls_waiting_for_other_key",
    "counts_by_state",
    "delete_call",
    "delivered_whole",
    "delivered_whole_ended_before",
    "end_call",
    "fresh_heartbeat",
    "open_and_owned_by",
    "insert_call",
    "open_calls",
    "set_audio_format",
    "touch_open_calls",
]

OpenCallRow = tuple[str, str, int, str, int]
"""(id, owner host, owner pid, owner token, heartbeat) of a call not yet ended."""


def insert_call(
    conn: sqlite3.Connection,
    call_id: str,
    opened: CallOpened,
    key_fp: str | None,
    owner: Owner,
    now: int,
) -> bool:
    """The call's row, owned by this process.

    Returns:
        True if the row was inserted; False if the id is taken already (left unchanged).
    """
    cursor = conn.execute(
        "INSERT INTO calls (id, agent_id, agent_name, key_fp, owner_host, owner_pid,"
        " owner_token, started_at, heartbeat_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (id) DO NOTHING",
        (
            call_id,
            opened.agent_id,
            opened.agent_name,
            key_fp,
            owner.host,
            owner.pid,
            owner.token,
            opened.at,
            now,
        ),
    )
    return cursor.rowcount != 0


def set_audio_format(
    conn: sqlite3.Connection, call_id: str, sample_rate: int, num_channels: int
) -> None:
    """The call's audio format, taken from its first chunk."""
    conn.execute(
        "UPDATE calls SET sample_rate = ?, num_channels = ? WHERE id = ? AND sample_rate IS NULL",
        (sample_rate, num_channels, call_id),
    )


def touch_open_calls(conn: sqlite3.Connection, call_ids: Iterable[str], now: int) -> None:
    """The heartbeat of this process's open calls (a drainer finalizes calls gone silent)."""
    conn.executemany(
        "UPDATE calls SET heartbeat_at = ? WHERE id = ? AND state = 'open'",
        [(now, call_id) for call_id in call_ids],
    )


def end_call(conn: sqlite3.Connection, call_id: str, at: int, reason: str, now: int) -> bool:
    """Mark an open call ended at ``at`` for ``reason``.

    Returns:
        True if this statement ended it; False if it was not open, so a call ends once,
        however many processes try.
    """
    cursor = conn.execute(
        "UPDATE calls SET state = 'ended', ended_at = ?, end_reason = ?, heartbeat_at = ?"
        " WHERE id = ? AND state = 'open'",
        (at, reason, now, call_id),
    )
    return cursor.rowcount != 0


def delete_call(conn: sqlite3.Connection, call_id: str) -> None:
    """Delete the call's row; its events, chunks and deliveries cascade with it."""
    conn.execute("DELETE FROM calls WHERE id = ?", (call_id,))


def call_exists(conn: sqlite3.Connection, call_id: str) -> bool:
    """Is a call recorded under ``call_id`` in this database?

    Returns:
        True if the call has a row.
    """
    return conn.execute("SELECT 1 FROM calls WHERE id = ?", (call_id,)).fetchone() is not None


def open_and_owned_by(conn: sqlite3.Connection, call_id: str, owner_token: str) -> bool:
    """Is ``call_id`` open and recorded under this owner (a writer of ours opened it)?

    Returns:
        True only for an open call whose row carries ``owner_token``.
    """
    row = conn.execute(
        "SELECT 1 FROM calls WHERE id = ? AND state = 'open' AND owner_token = ?",
        (call_id, owner_token),
    ).fetchone()
    return row is not None


def call_record_state(conn: sqlite3.Connection, call_id: str) -> str | None:
    """A call's recorded state: what ``retry`` and ``forget`` check before they touch anything.

    Returns:
        ``open`` or ``ended``, or None when there is no such call.
    """
    row = conn.execute("SELECT state FROM calls WHERE id = ?", (call_id,)).fetchone()
    return None if row is None else str(row[0])


def open_calls(conn: sqlite3.Connection, call_id: str | None = None) -> list[OpenCallRow]:
    """The calls not yet ended (or only ``call_id``), with what judges their owner.

    Returns:
        One ``OpenCallRow`` per open call.
    """
    return conn.execute(
        "SELECT id, owner_host, owner_pid, owner_token, heartbeat_at FROM calls"
        " WHERE state = 'open' AND (? IS NULL OR id = ?)",
        (call_id, call_id),
    ).fetchall()


def fresh_heartbeat(conn: sqlite3.Connection, call_id: str, fresh_after: int) -> bool:
    """Has the call heartbeated at or after ``fresh_after`` (its owner is still there)?

    Returns:
        True if its heartbeat is that recent.
    """
    return bool(
        conn.execute(
            "SELECT 1 FROM calls WHERE id = ? AND heartbeat_at >= ?", (call_id, fresh_after)
        ).fetchone()
    )


def counts_by_state(conn: sqlite3.Connection) -> dict[str, int]:
    """How many calls are ``open`` and how many ``ended``.

    Returns:
        The count per state; a state with no call is absent.
    """
    return dict(conn.execute("SELECT state, count(*) FROM calls GROUP BY state").fetchall())


def call_row(conn: sqlite3.Connection, call_id: str) -> tuple[Any, ...] | None:
    """One call's row, for ``show``.

    Returns:
        (id, agent id, agent name, key fingerprint, state, end reason, sample rate,
        channels, owner host, owner pid, started, ended, heartbeat), or None when there
        is no such call.
    """
    row: tuple[Any, ...] | None = conn.execute(
        "SELECT id, agent_id, agent_name, key_fp, state, end_reason, sample_rate, num_channels,"
        " owner_host, owner_pid, started_at, ended_at, heartbeat_at FROM calls WHERE id = ?",
        (call_id,),
    ).fetchone()
    return row


_SUMMARIES = """
SELECT c.id, c.agent_id, c.agent_name, c.state, c.end_reason, c.started_at, c.ended_at,
       SUM(d.state = 'delivered'), COUNT(d.id), SUM(d.state = 'dead'),
       SUM(d.kind = 'chunk'), SUM(d.kind = 'chunk' AND d.state = 'delivered'),
       (SELECT last_error FROM deliveries e WHERE e.call_id = c.id AND e.last_error IS NOT NULL
          AND e.state != 'delivered' ORDER BY e.id DESC LIMIT 1)
FROM calls c LEFT JOIN deliveries d ON d.call_id = c.id
WHERE (:agent IS NULL OR c.agent_id = :agent) AND (:since IS NULL OR c.started_at >= :since)
GROUP BY c.id
ORDER BY c.started_at DESC
"""


def call_summaries(
    conn: sqlite3.Connection, *, agent: str | None, since_us: int | None
) -> Iterator[tuple[Any, ...]]:
    """Calls, newest first, each with its delivery tallies; read lazily, the caller stops early.

    Returns:
        Per call: (id, agent id, agent name, state, end reason, started, ended, rows
        delivered, rows, rows dead, chunks, chunks delivered, last error of a row not
        delivered).
    """
    rows: Iterator[tuple[Any, ...]] = conn.execute(_SUMMARIES, {"agent": agent, "since": since_us})
    return rows


def delivered_whole_ended_before(conn: sqlite3.Connection, cutoff: int) -> list[str]:
    """Calls that ended before ``cutoff`` and whose every row is delivered.

    Returns:
        The ids retention may delete; a call without rows, or with one row left, is
        never among them.
    """
    return [
        r[0]
        for r in conn.execute(
            "SELECT c.id FROM calls c WHERE c.state = 'ended' AND c.ended_at < ?"
            " AND EXISTS (SELECT 1 FROM deliveries d WHERE d.call_id = c.id)"
            " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.call_id = c.id AND d.state != 'delivered')",
            (cutoff,),
        )
    ]


def delivered_whole(conn: sqlite3.Connection, call_id: str) -> bool:
    """Has the call ended, with its call-ended queued and every one of its rows delivered?

    Returns:
        True if Roark has the whole call.
    """
    whole = conn.execute(
        "SELECT 1 FROM calls c WHERE c.id = ? AND c.state = 'ended'"
        " AND EXISTS (SELECT 1 FROM deliveries d WHERE d.call_id = c.id AND d.kind = 'call-ended')"
        " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.call_id = c.id"
        " AND d.state != 'delivered')",
        (call_id,),
    ).fetchone()
    return whole is not None


def calls_waiting_for_other_key(
    conn: sqlite3.Connection, key_fp: str | None, call_id: str | None = None
) -> list[str]:
    """Calls recorded under another key than ``key_fp`` with rows still to deliver.

    Returns:
        Their ids in order (all of them, or only ``call_id``): a drain with ``key_fp``
        leaves them behind.
    """
    return [
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT c.id FROM calls c JOIN deliveries d ON d.call_id = c.id"
            " WHERE d.state IN ('pending', 'leased') AND c.key_fp IS NOT NULL AND c.key_fp != ?"
            " AND (? IS NULL OR c.id = ?) ORDER BY c.id",
            (key_fp, call_id, call_id),
        )
    ]
