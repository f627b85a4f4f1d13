"""The rows the writer adds for a call, each inside the caller's transaction.

Plain statements, no policy: ``op_apply`` decides what to write and counts it. The two
``deliveries`` statements stay here, each in its own function, until the outbox owns
every statement on that table.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from .events import CallOpened
from .ops import SpooledChunkOp
from .owner import Owner

__all__ = [
    "call_exists",
    "insert_call",
    "insert_chunk",
    "insert_events",
    "set_audio_format",
    "touch_open_calls",
]


def insert_events(conn: sqlite3.Connection, events: list[tuple[str, bytes]]) -> None:
    """Append encoded events, as (call id, body) pairs."""
    conn.executemany("INSERT INTO events (call_id, body) VALUES (?, ?)", events)


def insert_call(
    conn: sqlite3.Connection,
    call_id: str,
    opened: CallOpened,
    key_fp: str | None,
    owner: Owner,
    now: int,
) -> bool:
    """The call's row, owned by this process; False if the id is taken already."""
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


def insert_chunk(conn: sqlite3.Connection, op: SpooledChunkOp) -> bool:
    """A durable chunk file's row; False if that chunk of the call was recorded already."""
    chunk = op.chunk
    cursor = conn.execute(
        "INSERT OR IGNORE INTO chunks (call_id, idx, path, size, sha256, sample_rate,"
        " num_channels, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            op.call_id,
            op.idx,
            chunk.relpath,
            chunk.size,
            chunk.sha256,
            op.sample_rate,
            op.num_channels,
            op.at,
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


def call_exists(conn: sqlite3.Connection, call_id: str) -> bool:
    """Is a call recorded under ``call_id`` in this database?"""
    return conn.execute("SELECT 1 FROM calls WHERE id = ?", (call_id,)).fetchone() is not None
