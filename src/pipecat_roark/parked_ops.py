"""ParkedOps: a chunk's row waits for its file; no other record waits for it.

A chunk's file is written on a spool thread from the moment the writer takes it. Its row
waits here until the file is durable, and so do the call's later chunks and its end, so
what the drainer sees holds: a chunk row after its file, the next chunk's row after this
one (a failed file leaves no gap), the call's end after its last chunk. The call's events
do not wait: the timeline reads chunks by index, not by their place among the events, so
a transcript line is committed while the audio before it is still being written; only
events queued after the call's end wait with it. Other calls never wait. Before this, a
burst of chunk files from many calls held every record queued behind it (issue 12: frame
→ committed at 100 calls).

A flush (a ``BarrierOp``) still means "everything queued before it", chunk files
included. With a call id it means that call's records (its events, its end), as they
commit: it waits for chunk files only behind the call's end.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from .batch_commit import Batch, BatchCommitter
from .chunk_spooler import ChunkSpooler, PendingChunk
from .ops import (
    BarrierOp,
    CallOp,
    ChunkOp,
    ChunkWrittenOp,
    EventOp,
    FinalizeOp,
    SpooledChunkOp,
    StopOp,
)

__all__ = ["Finish", "ParkedOps", "Ready"]

Release = Callable[[], None]
Finish = Callable[[PendingChunk, bool], SpooledChunkOp | None]
"""Turns a written chunk into its row's op (None: not recorded); the flag says an earlier
chunk of the call could not be written (``ChunkSpooler.finish``)."""


class _CallBarrier(NamedTuple):
    release: Release


_Item = PendingChunk | CallOp | _CallBarrier


@dataclass
class _Line:
    """One call's parked items, oldest first, each with its place in the queue."""

    items: deque[tuple[int, _Item]] = field(default_factory=deque)
    lost_audio: bool = False
    """A chunk of this call could not be written: the chunks after it are not recorded."""
    ending: bool = False
    """The call's end is parked: whatever the call queues after it waits too."""


class Ready(NamedTuple):
    """What may be committed now, in each call's order, and the flushes it satisfies."""

    work: list[CallOp]
    releases: list[Release]


class ParkedOps:
    """The writer thread's per-call waiting lines (touched only by that thread)."""

    def __init__(self) -> None:
        self._lines: dict[str, _Line] = {}
        self._flushes: list[tuple[int, Release]] = []
        self._seq = 0

    def __bool__(self) -> bool:
        return bool(self._lines or self._flushes)

    def chunks_after(self, call_id: str, idx: int) -> list[PendingChunk]:
        """The call's parked chunks after ``idx``: their files written or still being written.

        Returns:
            Those chunks, oldest first: what a full disk gives up before chunk ``idx``.
        """
        line = self._lines.get(call_id)
        if line is None:
            return []
        return [
            item for _, item in line.items if isinstance(item, PendingChunk) and item.op.idx > idx
        ]

    def must_wait(self, op: CallOp) -> bool:
        """Must ``op`` wait behind its call's parked chunk files?

        Returns:
            True for the call's end (or a chunk row) behind a chunk file still being
            written, and for anything behind a parked end; False for an event otherwise.
        """
        line = self._lines.get(op.call_id)
        if line is None:
            return False
        return line.ending or not isinstance(op, EventOp)

    def park(self, call_id: str, item: PendingChunk | CallOp) -> None:
        """Queue ``item`` behind this call's parked ops (a chunk starts a line)."""
        line = self._lines.get(call_id)
        if line is None:
            line = self._lines[call_id] = _Line()
        line.items.append((self._seq, item))
        line.ending = line.ending or not isinstance(item, PendingChunk)
        self._seq += 1

    def wait(self, release: Release, call_id: str | None) -> bool:
        """Hold a flush until what was parked before it is committed.

        Returns:
            False when nothing it waits for is parked: release it after this commit.
        """
        if call_id is not None:
            line = self._lines.get(call_id)
            if line is None or not line.ending:
                return False
            line.items.append((self._seq, _CallBarrier(release)))
            return True
        if not self._lines:
            return False
        self._flushes.append((self._seq, release))
        return True

    def sort(
        self,
        batch: Batch,
        committer: BatchCommitter,
        spooler: ChunkSpooler,
        on_written: Callable[[], None],
    ) -> None:
        """In queue order: what commits now (``batch.work``), what waits for a chunk file.

        A chunk's file starts being written here (``ChunkSpooler.start``); its row and its
        call's later ops are parked until it is durable. Taken ops are removed one by one,
        so a writer thread restarted mid-sort goes on where it stopped. A call's end
        behind its chunk files is not screened now but in its turn: screening the end of
        a call that is not recorded forgets that it is not, and its chunk still in flight
        would then be committed against a call row that does not exist.
        """
        ends_behind = {
            id(op) for op in batch.taken if isinstance(op, FinalizeOp) and op.call_id in self._lines
        }
        calls: deque[CallOp] = deque(
            op
            for op in batch.taken
            if not isinstance(op, (BarrierOp, ChunkWrittenOp, StopOp)) and id(op) not in ends_behind
        )
        kept = {id(op) for op in committer.screen(calls)} | ends_behind
        taken = batch.taken
        while taken:
            op = taken[0]
            try:
                if isinstance(op, BarrierOp):
                    if not self.wait(op.release, op.call_id):
                        batch.barriers.append(op.release)
                elif isinstance(op, (ChunkWrittenOp, StopOp)) or id(op) not in kept:
                    pass
                elif isinstance(op, ChunkOp):
                    pending = spooler.start(op, on_written)
                    if pending is not None:
                        self.park(op.call_id, pending)
                elif self.must_wait(op):
                    self.park(op.call_id, op)
                else:
                    batch.work.append(op)
            except Exception as exc:  # one op, never the thread
                if not isinstance(op, (BarrierOp, ChunkWrittenOp, StopOp)):
                    committer.drop(op, exc)
            taken.popleft()

    def take_ready(self, finish: Finish) -> Ready:
        """Every call's items up to its first chunk file still being written.

        Returns:
            The ops to commit now (each call's in its order) and the flushes to release
            once they are committed.
        """
        work: list[CallOp] = []
        releases: list[Release] = []
        for call_id, line in list(self._lines.items()):
            items = line.items
            while items:
                item = items[0][1]
                if isinstance(item, PendingChunk):
                    if not item.written.done():
                        break
                    spooled = finish(item, line.lost_audio)
                    if spooled is None:
                        line.lost_audio = True
                    else:
                        work.append(spooled)
                elif isinstance(item, _CallBarrier):
                    releases.append(item.release)
                else:
                    work.append(item)
                items.popleft()
            if not items:
                del self._lines[call_id]
        if self._flushes:
            oldest = min((line.items[0][0] for line in self._lines.values()), default=self._seq)
            releases.extend(release for seq, release in self._flushes if seq <= oldest)
            self._flushes = [(seq, release) for seq, release in self._flushes if seq > oldest]
        return Ready(work, releases)

    def wait_for_files(self) -> None:
        """Block until every pending chunk file is written or failed (the writer stops)."""
        for line in self._lines.values():
            for _, item in line.items:
                if isinstance(item, PendingChunk):
                    item.written.exception()
