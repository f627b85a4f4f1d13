"""The ``chunks`` table: every statement on it, and every read about recorded chunks.

One row per durable chunk file of a call's recording (the file itself is ``spool``'s):
where it is, its size and sha256, and when it was discarded once Roark had the whole
call. A statement lives with the table its outermost ``FROM``, ``INTO`` or ``UPDATE``
names; so a read of chunks that JOINs ``deliveries`` (which files Roark already has)
is here, and the outbox owns the reads about rows that JOIN chunks. Plain statements,
no policy; ``tests/test_table_owners.py`` keeps the rule.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from .ops import SpooledChunkOp

__all__ = [
    "bytes_on_disk",
    "chunk_file",
    "chunk_paths",
    "count_for_call",
    "delivered_chunks_on_disk",
    "insert_chunk",
    "mark_discarded",
    "recorded_chunks",
]


def insert_chunk(conn: sqlite3.Connection, op: SpooledChunkOp) -> bool:
    """A durable chunk file's row (inside the caller's transaction).

    Returns:
        True if inserted; False if that chunk of the call was recorded already.
    """
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


def chunk_file(conn: sqlite3.Connection, call_id: str, idx: int | None) -> tuple[Any, ...] | None:
    """What was recorded of chunk ``idx`` of a call, for the drainer to check the file.

    Returns:
        (path, size, sha256), or None when the chunk has no row.
    """
    found: tuple[Any, ...] | None = conn.execute(
        "SELECT path, size, sha256 FROM chunks WHERE call_id = ? AND idx = ?",
        (call_id, idx),
    ).fetchone()
    return found


def chunk_paths(conn: sqlite3.Connection, call_id: str) -> list[str]:
    """The file of every chunk of a call.

    Returns:
        The paths, relative to the data directory.
    """
    return [p for (p,) in conn.execute("SELECT path FROM chunks WHERE call_id = ?", (call_id,))]


def delivered_chunks_on_disk(conn: sqlite3.Connection, call_id: str) -> list[tuple[Any, ...]]:
    """The call's chunks Roark has whose file was not discarded yet.

    Returns:
        (index, path, size) of each.
    """
    return conn.execute(
        "SELECT c.idx, c.path, c.size FROM chunks c JOIN deliveries d"
        " ON d.call_id = c.call_id AND d.kind = 'chunk' AND d.chunk_idx = c.idx"
        " WHERE c.call_id = ? AND d.state = 'delivered' AND c.discarded_at IS NULL",
        (call_id,),
    ).fetchall()


def mark_discarded(conn: sqlite3.Connection, call_id: str, indexes: list[int], now: int) -> None:
    """Say these chunks' files are gone on purpose (the rows stay until retention)."""
    conn.executemany(
        "UPDATE chunks SET discarded_at = ? WHERE call_id = ? AND idx = ?",
        [(now, call_id, idx) for idx in indexes],
    )


def recorded_chunks(conn: sqlite3.Connection, call_id: str) -> list[tuple[Any, ...]]:
    """Every chunk of a call in index order: the recording, as ``export`` rebuilds it.

    Returns:
        (index, path, size, sample rate, channels, discarded) of each.
    """
    return conn.execute(
        "SELECT idx, path, size, sample_rate, num_channels, discarded_at IS NOT NULL"
        " FROM chunks WHERE call_id = ? ORDER BY idx",
        (call_id,),
    ).fetchall()


def bytes_on_disk(conn: sqlite3.Connection) -> int:
    """Bytes of every chunk file recorded and not discarded (delivered or not).

    Returns:
        Their total recorded size, 0 when there are none.
    """
    return int(
        conn.execute(
            "SELECT COALESCE(SUM(size), 0) FROM chunks WHERE discarded_at IS NULL"
        ).fetchone()[0]
    )


def count_for_call(conn: sqlite3.Connection, call_id: str) -> int:
    """How many chunk rows the call has.

    Returns:
        The row count.
    """
    return int(
        conn.execute("SELECT count(*) FROM chunks WHERE call_id = ?", (call_id,)).fetchone()[0]
    )
