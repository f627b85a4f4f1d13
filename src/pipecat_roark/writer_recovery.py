"""What a dead writer child left undone: the records to give this process's own writer.

The bot (``writer_process``) keeps every frame it sent until the child says it is
committed. When the child dies, the frames it did not acknowledge may be partly
committed: this reads the database to leave out what was (a call's open, events with the
same body, chunk rows; ending a call twice is a no-op), and says which open calls the
bot's writer takes over. A session the child did not record (a reused call id, a failed
open) is given to that writer again, which screens it in turn.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from . import calls_table, chunks_table, events_table
from .events import CallOpened, encode_event
from .ops import BarrierOp, ChunkOp, EventOp, Op, OpenOp
from .owner import Owner
from .store import connect
from .writer_pipe import RemoteBarrier

__all__ = ["barrier_numbers", "recover"]


def recover(
    directory: Path,
    frames: Iterable[tuple[int, list[Any]]],
    open_calls: Mapping[str, OpenOp],
    barriers: Mapping[int, Callable[[], None]],
    owner: Owner,
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
        return _recover(conn, list(frames), open_calls, barriers, owner)
    finally:
        conn.close()


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
) -> tuple[list[Op], dict[str, tuple[CallOpened, str | None]]]:
    unsent = {op.call_id for _, wire in frames for op in wire if isinstance(op, OpenOp)}
    adopt: dict[str, tuple[CallOpened, str | None]] = {}
    bodies: dict[str, set[bytes]] = {}
    replay: list[Op] = []
    for call_id, op in open_calls.items():
        if call_id in unsent:
            continue  # its open is replayed in its turn
        bodies[call_id] = events_table.bodies_of(conn, call_id)
        if encode_event(op.opened) not in bodies[call_id]:
            # The child did not record this session (a reused id, a failed open): our
            # writer screens it again, or it would take the session's records.
            replay.append(op)
        elif calls_table.open_and_owned_by(conn, call_id, owner.token):
            adopt[call_id] = (op.opened, op.key_fp)
    for _, wire in frames:
        for op in wire:
            kept = _unless_committed(conn, op, adopt, bodies, barriers)
            if kept is not None:
                replay.append(kept)
    return replay, adopt


def _unless_committed(
    conn: sqlite3.Connection,
    op: Any,
    adopt: Mapping[str, tuple[CallOpened, str | None]],
    bodies: dict[str, set[bytes]],
    barriers: Mapping[int, Callable[[], None]],
) -> Op | None:
    if isinstance(op, RemoteBarrier):
        release = barriers.get(op.number)
        return None if release is None else BarrierOp(release, op.call_id)
    if isinstance(op, OpenOp):
        return None if op.call_id in adopt else op
    if isinstance(op, EventOp):
        if op.call_id not in bodies:
            bodies[op.call_id] = events_table.bodies_of(conn, op.call_id)
        body = encode_event(op.event)
        if body in bodies[op.call_id]:
            bodies[op.call_id].discard(body)
            return None
        return op
    if isinstance(op, ChunkOp):
        return None if chunks_table.chunk_file(conn, op.call_id, op.idx) else op
    result: Op = op
    return result
