"""The ``events`` table: every statement on it, and every read about a call's events.

A call's raw timeline, one encoded event per row (``events.py``), in the order the
observer saw them; payloads are assembled from it at delivery time (``timeline``). A
statement lives with the table its outermost ``FROM``, ``INTO`` or ``UPDATE`` names;
so a read of events that subqueries ``calls`` or ``deliveries`` (whose events to
check) is here. Plain statements, no policy; ``tests/test_table_owners.py`` keeps the
rule.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

import msgspec

from .events import Event, decode_event

__all__ = [
    "StoredEvents",
    "bodies_to_check",
    "count_for_call",
    "MAX_EVENTS_PER_STATEMENT",
    "insert_events",
    "insert_events_in_one_statement",
    "last_event_body",
    "load_events",
    "read_events",
]


def insert_events(conn: sqlite3.Connection, events: list[tuple[str, bytes]]) -> None:
    """Append encoded events, as (call id, body) pairs (inside the caller's transaction)."""
    conn.executemany("INSERT INTO events (call_id, body) VALUES (?, ?)", events)


MAX_EVENTS_PER_STATEMENT = 512
_STATEMENT_SIZES = (8, 64, MAX_EVENTS_PER_STATEMENT)
"""Statements are padded to one of these sizes, so SQLite's statement cache holds them all."""


def insert_events_in_one_statement(
    conn: sqlite3.Connection, events: list[tuple[str, bytes]]
) -> None:
    """Append up to ``MAX_EVENTS_PER_STATEMENT`` encoded events with one statement, in order.

    Outside a transaction it is its own atomic commit and one call into SQLite, so the
    writer thread lets go of the GIL once, not at BEGIN, at each row and at COMMIT: behind
    a busy event loop each time costs up to a switch interval (issue 12).

    Raises:
        ValueError: more events than one statement takes.
    """
    size = next((size for size in _STATEMENT_SIZES if size >= len(events)), None)
    if size is None:
        raise ValueError(f"{len(events)} events are more than one statement takes")
    params: list[str | bytes | None] = [value for event in events for value in event]
    params.extend([None] * (2 * (size - len(events))))
    conn.execute(_padded_insert(size), params)


@cache
def _padded_insert(size: int) -> str:
    rows = ", ".join(f"(?, ?, {position})" for position in range(size))
    return (
        "INSERT INTO events (call_id, body) SELECT column1, column2"
        f" FROM (VALUES {rows}) WHERE column1 IS NOT NULL ORDER BY column3"
    )


@dataclass(frozen=True)
class StoredEvents:
    """A call's events that decode, and what was lost: damage is salvaged, never fatal."""

    events: list[Event]
    undecodable: list[tuple[int, str]]
    """(event row id, why) of each stored event that no longer decodes."""


def read_events(conn: sqlite3.Connection, call_id: str) -> StoredEvents:
    """A call's events in the order the observer saw them, skipping any that do not decode.

    A damaged page or a body from a bad build costs only that event: the rest of the call
    is still worth sending.

    Returns:
        The events that decode, in order, and the row id and reason of each that did not.
    """
    events: list[Event] = []
    undecodable: list[tuple[int, str]] = []
    for row_id, body in conn.execute(
        "SELECT id, body FROM events WHERE call_id = ? ORDER BY id", (call_id,)
    ):
        try:
            events.append(decode_event(body))
        except (msgspec.DecodeError, msgspec.ValidationError, TypeError) as exc:
            undecodable.append((int(row_id), str(exc)))
    return StoredEvents(events, undecodable)


def load_events(conn: sqlite3.Connection, call_id: str) -> list[Event]:
    """The events of ``read_events`` alone, for callers that only assemble.

    Returns:
        The call's decodable events, in the order the observer saw them.
    """
    return read_events(conn, call_id).events


def last_event_body(conn: sqlite3.Connection, call_id: str) -> bytes | None:
    """The encoded body of the call's newest event, as stored.

    Returns:
        The body (a damaged one is the decoder's to refuse), or None when it has none.
    """
    last = conn.execute(
        "SELECT body FROM events WHERE call_id = ? ORDER BY id DESC LIMIT 1", (call_id,)
    ).fetchone()
    if last is None:
        return None
    body: bytes = last[0]  # as stored: a damaged body is the decoder's to refuse
    return body


def bodies_to_check(conn: sqlite3.Connection, *, every_call: bool) -> Iterator[tuple[str, bytes]]:
    """The stored events worth decoding to look for damage; read lazily.

    Returns:
        (call id, body) of every stored event of the calls whose payloads are still to
        be sent (bounded by the backlog), or with ``every_call`` of every call.
    """
    rows: Iterator[tuple[str, bytes]] = conn.execute(
        "SELECT call_id, body FROM events WHERE call_id IN (SELECT id FROM calls)"
        if every_call
        else "SELECT call_id, body FROM events WHERE call_id IN"
        " (SELECT call_id FROM deliveries WHERE kind != 'chunk' AND state != 'delivered')"
    )
    return rows


def count_for_call(conn: sqlite3.Connection, call_id: str) -> int:
    """How many events the call has stored.

    Returns:
        The row count.
    """
    return int(
        conn.execute("SELECT count(*) FROM events WHERE call_id = ?", (call_id,)).fetchone()[0]
    )
