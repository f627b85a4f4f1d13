"""What a dead writer child left undone: the records to give this process's own writer.

The bot (``writer_process``) keeps every frame it sent until the child says it is
committed. When the child dies, the frames it did not acknowledge may be partly
committed: this reads the database to leave out what was (a call's open, its events past
those acknowledged, chunk rows; ending a call twice is a no-op), and says which open calls
the bot's writer takes over. A session the child did not record (a reused call id, a
failed open) is given to that writer again, which screens it in turn. ``acknowledge``
keeps the books this needs as the child's acknowledgements arrive.
"""

from __future__ import annotations

import sqlite3
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from . import calls_table, chunks_table, events_table
from .events import CallOpened, ChunkRecorded, Event
from .ops import BarrierOp, ChunkOp, EventOp, FinalizeOp, Op, OpenOp
from .owner import Owner
from .store import connect
from .writer_pipe import RemoteBarrier

__all__ = ["acknowledge", "barrier_numbers", "recover"]


def recover(
    directory: Path,
    frames: Iterable[tuple[int, list[Any]]],
    open_calls: Mapping[str, OpenOp],
    barriers: Mapping[int, Callable[[], None]],
    owner: Owner,
    acked_events: Mapping[str, int],
) -> tuple[list[Op], dict[str, tuple[CallOpened, str | None]]]:
    """What a dead child did not commit of the unacknowledged frames, and the calls to adopt.

    Reads only: a barrier the child did not release is in the replay, not taken.

    Returns:
        The ops to give this process's writer, in order, and the open calls it takes over.

    Raises:
        StoreError: the database cannot be opened (the records are kept, and retried).
    """
    conn = connect(directory)
    try:
        return _recover(conn, list(frames), open_calls, barriers, owner, acked_events)
    finally:
        conn.close()


def acknowledge(
    unacked: deque[tuple[int, list[Any]]],
    seq: int,
    open_calls: dict[str, OpenOp],
    acked_events: dict[str, int],
) -> None:
    """The child committed every frame up to ``seq``: let them go, counting their events.

    A call whose end is committed is no longer one to adopt, nor to count events of;
    unless the id was opened again after that end (a second session, which the child
    refused): that open is kept, for a fallback to screen again.
    """
    while unacked and unacked[0][0] <= seq:
        wire = unacked.popleft()[1]
        for position, op in enumerate(wire):
            if isinstance(op, EventOp):
                acked_events[op.call_id] = acked_events.get(op.call_id, 0) + 1
            elif isinstance(op, FinalizeOp):
                opened = open_calls.get(op.call_id)
                if opened is None or _sent_after(opened, wire[position + 1 :], unacked):
                    continue
                del open_calls[op.call_id]
                acked_events.pop(op.call_id, None)


def _sent_after(
    op: OpenOp, rest_of_frame: list[Any], unacked: deque[tuple[int, list[Any]]]
) -> bool:
    # A copy (one C call): the sender may append a frame meanwhile, which would stop a
    # generator over the deque itself ("deque mutated during iteration").
    return any(sent is op for sent in rest_of_frame) or any(
        sent is op for _, wire in list(unacked) for sent in wire
    )


def barrier_numbers(frames: Iterable[tuple[int, list[Any]]]) -> list[int]:
    """The numbers of the flushes in ``frames``, once they are given to another writer.

    Returns:
        Each ``RemoteBarrier``'s number, in order.
    """
    return [op.number for _, wire in frames for op in wire if isinstance(op, RemoteBarrier)]


def _recover(
    conn: sqlite3.Connection,
    frames: list[tuple[int, list[Any]]],
    open_calls: Mapping[str, OpenOp],
    barriers: Mapping[int, Callable[[], None]],
    owner: Owner,
    acked_events: Mapping[str, int],
) -> tuple[list[Op], dict[str, tuple[CallOpened, str | None]]]:
    unsent = {op.call_id for _, wire in frames for op in wire if isinstance(op, OpenOp)}
    adopt: dict[str, tuple[CallOpened, str | None]] = {}
    stored: dict[str, list[Event]] = {}
    replay: list[Op] = []
    opened_here: set[str] = set()
    for call_id, op in open_calls.items():
        stored[call_id] = events_table.load_events(conn, call_id)
        if op.opened in stored[call_id]:  # this session's open is committed
            opened_here.add(call_id)
            if calls_table.open_and_owned_by(conn, call_id, owner.token):
                adopt[call_id] = (op.opened, op.key_fp)
        elif call_id not in unsent:  # else its open is given again in its turn
            # The child did not record this session (a reused id, a failed open): our
            # writer screens it again, or it would take the session's records.
            replay.append(op)
    committed = _committed_events(conn, frames, acked_events, stored)
    for _, wire in frames:
        for op in wire:
            kept = _unless_committed(conn, op, opened_here, committed, barriers)
            if kept is not None:
                replay.append(kept)
    return replay, adopt


def _unless_committed(
    conn: sqlite3.Connection,
    op: Any,
    opened_here: set[str],
    committed: dict[str, Counter[Event]],
    barriers: Mapping[int, Callable[[], None]],
) -> Op | None:
    if isinstance(op, RemoteBarrier):
        release = barriers.get(op.number)
        return None if release is None else BarrierOp(release, op.call_id)
    if isinstance(op, OpenOp):
        # Committed (this very open: a second session's has another time): not again,
        # even if the child also ended the call (giving it again would be refused as a
        # reused id, with an error line about a call that is whole).
        return None if op.call_id in opened_here else op
    if isinstance(op, EventOp):
        left_out = committed[op.call_id]
        if left_out[op.event] > 0:
            left_out[op.event] -= 1
            return None
        return op
    if isinstance(op, ChunkOp):
        return None if chunks_table.chunk_file(conn, op.call_id, op.idx) else op
    result: Op = op
    return result


def _committed_events(
    conn: sqlite3.Connection,
    frames: list[tuple[int, list[Any]]],
    acked_events: Mapping[str, int],
    stored: dict[str, list[Event]],
) -> dict[str, Counter[Event]]:
    """Per call, its unacknowledged events that the child committed.

    A call's events commit in the order they were queued, so its stored events past the
    acknowledged ones are the first of the unacknowledged ones: counted, not looked up,
    since two equal events (one fact twice in one microsecond) are two records. Compared
    as values, not stored bytes: an event that crossed the pipe may encode a default
    explicitly (msgspec omits a default only when it is the very same object). Where the
    counts do not fit (the child dropped an event), each stored event counts once.

    Returns:
        For each call with unacknowledged events, the bodies to leave out, with their
        counts.
    """
    sent: dict[str, list[Event]] = {}
    for _, wire in frames:
        for op in wire:
            if isinstance(op, EventOp):
                sent.setdefault(op.call_id, []).append(op.event)
    committed: dict[str, Counter[Event]] = {}
    for call_id, events in sent.items():
        if call_id not in stored:
            stored[call_id] = events_table.load_events(conn, call_id)
        # The writer adds a call's opening and each chunk's record itself: not EventOps.
        rows = [e for e in stored[call_id] if not isinstance(e, CallOpened | ChunkRecorded)]
        done = acked_events.get(call_id, 0)
        tail = rows[done:]
        fits = done <= len(rows) and tail == events[: len(tail)]
        committed[call_id] = Counter(tail if fits else rows)
    return committed
