"""What one delivery row sends, loaded from disk: a chunk's bytes or a call's events.

Whatever cannot be built from what is stored (no chunk row, a file gone or not the
bytes recorded, events that cannot be assembled) raises ``Unsendable``: the same bytes
would fail the same way, so the row goes dead with the reason.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import msgspec
from loguru import logger

from . import chunks_table, faultpoints, spool
from .events_table import StoredEvents, read_events
from .outbox import Delivery

__all__ = [
    "PERMANENT_FOREIGN",
    "Unsendable",
    "chunk_file",
    "describe",
    "load_events",
    "read_chunk",
    "salvage_note",
]


class Unsendable(Exception):
    """The row cannot be built from what is on disk: it goes dead with this reason."""


PERMANENT_FOREIGN = (UnicodeError, msgspec.DecodeError, msgspec.ValidationError)
"""Raised by a row's own bytes (a stored body, an id or header that cannot be encoded):
the next attempt would fail the same way, so the row goes dead at once."""


def describe(exc: BaseException) -> str:
    """One line naming the exception, whatever its message holds.

    Returns:
        ``Class: message`` on one line, the message cut to 500 characters.
    """
    detail = " ".join(str(exc).split()) or "no detail"
    return f"{type(exc).__name__}: {detail[:500]}"


def chunk_file(conn: sqlite3.Connection, row: Delivery) -> tuple[str, int, str]:
    """What was recorded of the chunk a row delivers.

    Returns:
        Its path (relative to the data directory), size and sha256.

    Raises:
        Unsendable: the chunk has no row, so the row goes dead.
    """
    found = chunks_table.chunk_file(conn, row.call_id, row.chunk_idx)
    if found is None:
        raise Unsendable(f"chunk {row.chunk_idx} of call {row.call_id!r} has no row")
    return str(found[0]), int(found[1]), str(found[2])


def read_chunk(directory: Path, row: Delivery, path: str, size: int, sha: str) -> bytes:
    """Off the database lock: reading and hashing a file needs no connection.

    A file that is gone, is not a file, or is not the bytes recorded is dead with the
    reason (call-ended then goes without it); other OS errors (EIO, EMFILE, EACCES)
    may pass and are retried.

    Returns:
        The chunk's bytes, checked against the recorded size and sha256.

    Raises:
        Unsendable: the file is gone, not a file, or not the bytes recorded.
    """
    faultpoints.reached("drain:read-chunk", row.call_id)
    try:
        data = spool.read_chunk(directory, path)
    except FileNotFoundError:
        raise Unsendable(f"chunk file missing: {directory / path}") from None
    except (IsADirectoryError, NotADirectoryError) as exc:
        raise Unsendable(f"chunk file is not a file ({exc}): {directory / path}") from None
    if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
        raise Unsendable(f"chunk file corrupt (size or sha256 differs): {directory / path}")
    return data


def load_events(conn: sqlite3.Connection, call_id: str) -> StoredEvents:
    """A call's stored events, for assembling its call-started or call-ended.

    Returns:
        The events that decode, and what did not.
    """
    faultpoints.reached("drain:load", call_id)
    return read_events(conn, call_id)


def salvage_note(row: Delivery, stored: StoredEvents) -> str | None:
    """What a delivered event row left out, kept on the row and logged once.

    Returns:
        The note (it begins with ``salvaged:``), or None when every event decoded.
    """
    if not stored.undecodable:
        return None
    total = len(stored.events) + len(stored.undecodable)
    first_id, why = stored.undecodable[0]
    note = (
        f"salvaged: {len(stored.undecodable)} of {total} stored events did not decode and were"
        f" left out (event row {first_id}: {' '.join(why.split())[:200]})"
    )
    logger.warning(f"pipecat-roark: {row.idempotency_key!r} delivered, {note}")
    return note
