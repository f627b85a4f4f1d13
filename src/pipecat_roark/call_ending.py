"""How a call ends: the one place, whether its observer saw it or a drainer finalizes it.

A drainer finalizes a call whose owner is gone.

Ending touches three tables, each through its owner: the call's row
(``calls_table.end_call``, conditional, so a call ends once however many processes
try), maybe a CallClosed event (``events_table``) and the call-ended delivery
(``outbox``), all inside one transaction. This module writes no SQL of its own.
"""

from __future__ import annotations

import sqlite3

from loguru import logger

from . import calls_table, events_table, faultpoints, outbox
from .events import CallClosed, decode_event, encode_event
from .owner import effective_grace_us, owner_is_gone
from .store import transaction
from .timeline import DEFAULT_RECOVERY_REASON

__all__ = ["finalize_call", "finalize_orphans"]


def finalize_call(
    conn: sqlite3.Connection, call_id: str, at: int, reason: str, *, add_event: bool, now: int
) -> bool:
    """End an open call and queue its call-ended delivery (inside the caller's transaction).

    The one place a call ends, whether its observer saw the end or a drainer finalizes
    an orphan: both must leave the same rows.

    Returns:
        True if this call ended it; False if the call was not open.
    """
    if not calls_table.end_call(conn, call_id, at, reason, now):
        return False
    if add_event:
        events_table.insert_events(
            conn, [(call_id, encode_event(CallClosed(at=at, reason=reason)))]
        )
    outbox.enqueue_call_ended(conn, call_id, now)
    return True


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
    fresh, only a checker that can see the owner's pid die ends it. The call ends where
    its owner stored its end, if it did, else at its last recorded event; the heartbeat
    is checked again under the write lock and the conditional UPDATE in finalize_call
    makes this exactly-once however many drainers look at the same call.

    Returns:
        The ids of the calls ended.
    """
    candidates = calls_table.open_calls(conn, call_id)
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
        if fresh_after is not None and calls_table.fresh_heartbeat(conn, call_id, fresh_after):
            return False  # it heartbeated after we looked
        heard = _stored_end(conn, call_id)
        if heard is not None:  # its end was stored; the owner died before making it final
            return finalize_call(conn, call_id, heard.at, heard.reason, add_event=False, now=now)
        last = events_table.last_event_body(conn, call_id)
        at = _event_time(last) if last is not None else None
        return finalize_call(conn, call_id, at or heartbeat_at, reason, add_event=True, now=now)


def _stored_end(conn: sqlite3.Connection, call_id: str) -> CallClosed | None:
    """The end already among the call's events, if its owner stored one and died.

    The observer stores a call's end just before the call is made final (in a later
    commit when the recording's last chunk file is still being written); older versions
    stored it as soon as it was heard. Such a call ends there, with that reason, once.

    Returns:
        The first stored CallClosed, or None.
    """
    for event in events_table.load_events(conn, call_id):
        if isinstance(event, CallClosed):
            return event
    return None


def _event_time(body: bytes) -> int | None:
    try:
        return decode_event(body).at
    except Exception:  # a damaged event must not block finalizing the call
        return None
