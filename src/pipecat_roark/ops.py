"""What the capture side asks the writer thread to do: one small typed record per request.

Each op is a ``NamedTuple``: built on the frame path, where its construction costs about
what a plain tuple does, and read on the writer thread by field name instead of by a
position written in a comment. The writer dispatches on the op's class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from .events import CallOpened, Event
from .spool import SpooledChunk

__all__ = [
    "BarrierOp",
    "CallOp",
    "ChunkOp",
    "ChunkWrittenOp",
    "EventOp",
    "FinalizeOp",
    "Op",
    "OpenOp",
    "SpooledChunkOp",
    "StopOp",
]


class OpenOp(NamedTuple):
    """Record a new call (its row, its opening event, its call-started delivery)."""

    call_id: str
    opened: CallOpened
    key_fp: str | None


class EventOp(NamedTuple):
    """Append one fact to a call's timeline."""

    call_id: str
    event: Event


class ChunkOp(NamedTuple):
    """One recording chunk, still in memory: the writer makes its file durable first."""

    call_id: str
    idx: int
    """The chunk's position in its call's recording (``index`` is a tuple method)."""
    data: bytes
    sample_rate: int
    num_channels: int
    at: int


class SpooledChunkOp(NamedTuple):
    """A ``ChunkOp`` whose file is durable: only its rows are left to commit."""

    call_id: str
    idx: int
    """The chunk's position in its call's recording (``index`` is a tuple method)."""
    chunk: SpooledChunk
    sample_rate: int
    num_channels: int
    at: int


class FinalizeOp(NamedTuple):
    """End a call and queue its call-ended delivery."""

    call_id: str
    at: int
    reason: str


class BarrierOp(NamedTuple):
    """Call ``release`` once everything queued before it is committed (a flush).

    With a ``call_id``, once that call's records queued before it are committed (its
    events, its end), not other calls' and not chunk files still being written
    (``parked_ops``).
    """

    release: Callable[[], None]
    call_id: str | None = None


class ChunkWrittenOp(NamedTuple):
    """A spool thread finished a chunk file: the writer settles what waited behind it."""


class StopOp(NamedTuple):
    """Commit what is queued, then end the writer thread."""


CallOp = OpenOp | EventOp | ChunkOp | SpooledChunkOp | FinalizeOp
"""An op that writes something of one call: what a batch's work is made of."""

Op = CallOp | BarrierOp | ChunkWrittenOp | StopOp
"""Anything the writer's queue holds."""
