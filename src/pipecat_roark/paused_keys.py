"""API keys Roark refused: the ``paused_keys`` table.

A refused key pauses deliveries of its calls in every process that shares the
database, and nothing is dropped; the first delivery that succeeds with the key lifts
the pause. Only the key's fingerprint is stored, never the key. Every statement on
the table is here (``tests/test_table_owners.py`` keeps it so).
"""

from __future__ import annotations

import sqlite3

from .store import transaction

__all__ = ["pause_key", "paused", "unpause_key"]


def pause_key(conn: sqlite3.Connection, key_fp: str, reason: str, now: int) -> bool:
    """Returns True if the key was not paused before (so the caller says it once)."""
    with transaction(conn):
        cursor = conn.execute(
            "INSERT OR IGNORE INTO paused_keys (key_fp, paused_at, reason) VALUES (?, ?, ?)",
            (key_fp, now, reason),
        )
        return cursor.rowcount == 1


def unpause_key(conn: sqlite3.Connection, key_fp: str) -> bool:
    """Lift the pause on a key.

    Returns:
        True if the key was paused (so the caller says it once).
    """
    with transaction(conn):
        return conn.execute("DELETE FROM paused_keys WHERE key_fp = ?", (key_fp,)).rowcount == 1


def paused(conn: sqlite3.Connection) -> list[tuple[str, int, str]]:
    """Every paused key, by fingerprint.

    Returns:
        (key fingerprint, paused at, reason) of each.
    """
    return conn.execute(
        "SELECT key_fp, paused_at, reason FROM paused_keys ORDER BY key_fp"
    ).fetchall()
