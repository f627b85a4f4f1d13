"""OpApplier: what each op writes, inside the caller's transaction, and what is kept after.

``apply`` writes a run of ops (consecutive events in one statement); ``settle`` runs
only once their transaction committed, so a batch that is retried one op at a time
still knows which calls it opened, which lost audio and which ended. After a fresh
database replaced a lost one, ``record_open_calls_again`` writes the calls still open
here into it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

from loguru import logger

from . import calls_table, chunks_table, events_table, faultpoints, metrics, outbox
from .call_ending import finalize_call
from .events import CallOpened, ChunkRecorded, encode_event
from .ops import CallOp, EventOp, FinalizeOp, OpenOp, SpooledChunkOp
from .owner import Owner
from .store import now_us, transaction
from .wal_file import WalFile, is_busy
from .writer_state import CallBook, OpenCall, WriterStats, reused

__all__ = ["OpApplier"]


class OpApplier:
    """Writes ops as rows, and keeps the writer's ``CallBook`` up to date after commits."""

    def __init__(
        self, directory: Path, wal: WalFile, owner: Owner, book: CallBook, stats: WriterStats
    ) -> None:
        self._directory = directory
        self._wal = wal
        self._owner = owner
        self._book = book
        self._stats = stats

    def apply(self, work: Iterable[CallOp]) -> bool:
        """Write ``work`` inside the caller's transaction.

        Returns:
            True if deliveries were added (a drainer has new rows to claim).
        """
        added = False
        events: list[tuple[str, bytes]] = []
        reached = faultpoints.reached
        now = now_us()
        for op in work:
            if isinstance(op, EventOp):
                reached("writer:event", op.call_id)
                events.append((op.call_id, encode_event(op.event)))
                continue
            if events:
                self._insert_events(events)
                events = []
            if isinstance(op, OpenOp):
                added = self._open(op.call_id, op.opened, op.key_fp, now) or added
            elif isinstance(op, SpooledChunkOp):
                reached("writer:chunk", op.call_id)
                added = self._chunk(op, now=now) or added
            elif isinstance(op, FinalizeOp):
                added = self._finalize(op.call_id, op.at, op.reason, now) or added
        if events:
            self._insert_events(events)
        return added

    def apply_events_alone(self, work: Iterable[EventOp]) -> None:
        """Commit a batch of events only, as one statement in its own transaction.

        Why: see ``events_table.insert_events_in_one_statement``. The statement waits for
        the write lock like any other (``busy_timeout``); if it still finds the database
        busy (another process committed between its read and its write, which SQLite does
        not retry), the events go through the usual transaction, which takes the lock first.

        Raises:
            sqlite3.OperationalError: the statement failed for another reason than a busy
                database (the committer decides what that means).
        """
        reached = faultpoints.reached
        events: list[tuple[str, bytes]] = []
        for op in work:
            reached("writer:event", op.call_id)
            events.append((op.call_id, encode_event(op.event)))
        conn = self._wal.db()
        try:
            events_table.insert_events_in_one_statement(conn, events)
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):
                raise
            with transaction(conn):
                events_table.insert_events(conn, events)
        self._stats.events += len(events)

    def settle(self, work: Iterable[CallOp]) -> None:
        """After a commit: what this process remembers about its open calls."""
        book = self._book
        stats = self._stats
        count = 0
        for op in work:
            count += 1
            if isinstance(op, OpenOp):
                if op.call_id not in book.open_calls:
                    book.open_calls[op.call_id] = OpenCall(op.opened, op.key_fp)
            elif isinstance(op, SpooledChunkOp):
                call = book.open_calls.get(op.call_id)
                if call is not None:
                    call.chunks.append(op)
            elif isinstance(op, FinalizeOp):
                call_id = op.call_id
                ended = book.ended.pop(call_id, None)
                if ended is not None:  # counted once committed, not when first tried
                    metrics.finalized(ended)
                recorded_here = book.open_calls.pop(call_id, None) is not None
                # Only after the commit: a retried batch must still know which calls lost audio.
                book.audio_stopped.discard(call_id)
                book.audio_cut.pop(call_id, None)
                if not recorded_here:  # else the skip is a later session's, refused: it stays
                    book.skipped.pop(call_id, None)
                book.faults.pop(call_id, None)
        stats.batches += 1
        stats.ops += count
        stats.max_batch = max(stats.max_batch, count)

    def already_recorded(self, call_id: str) -> bool:
        """Is ``call_id`` open here or in the database (a second session must be refused)?

        Returns:
            True if it is; False also when the database cannot say (the op's own
            transaction then meets the problem and reports it).
        """
        if call_id in self._book.open_calls:
            return True
        try:
            return calls_table.call_exists(self._wal.db(), call_id)
        except Exception:  # the op's own transaction meets the problem and reports it
            return False

    def record_open_calls_again(self) -> list[str]:
        """In a fresh database: open again the calls still open here, with their audio.

        Returns:
            The ids of the calls recorded again; the others are no longer recorded.
        """
        book = self._book
        done = []
        now = now_us()
        for call_id, call in list(book.open_calls.items()):
            try:
                with transaction(self._wal.db()):
                    self._open(call_id, call.opened, call.key_fp, now)
                    for chunk_op in call.chunks:
                        if (self._directory / chunk_op.chunk.relpath).exists():
                            self._chunk(chunk_op, now=now)
            except Exception as exc:
                book.open_calls.pop(call_id, None)
                book.skipped[call_id] = str(exc)
                logger.error(
                    f"pipecat-roark: call {call_id!r} could not be recorded again "
                    f"({type(exc).__name__}: {exc}); it is not recorded"
                )
                continue
            done.append(call_id)
        return done

    def _insert_events(self, events: list[tuple[str, bytes]]) -> None:
        events_table.insert_events(self._wal.db(), events)
        self._stats.events += len(events)

    def _open(self, call_id: str, opened: CallOpened, key_fp: str | None, now: int) -> bool:
        faultpoints.reached("writer:open", call_id)
        if not calls_table.insert_call(self._wal.db(), call_id, opened, key_fp, self._owner, now):
            raise reused(call_id, self._directory)  # another process took the id since screening
        self._insert_events([(call_id, encode_event(opened))])
        outbox.enqueue_call_started(self._wal.db(), call_id, now)
        return True

    def _chunk(self, op: SpooledChunkOp, *, now: int) -> bool:
        conn = self._wal.db()
        if not chunks_table.insert_chunk(conn, op):
            return False
        self._stats.chunks += 1
        recorded = ChunkRecorded(
            at=op.at,
            index=op.idx,
            size=op.chunk.size,
            sample_rate=op.sample_rate,
            num_channels=op.num_channels,
        )
        self._insert_events([(op.call_id, encode_event(recorded))])
        calls_table.set_audio_format(conn, op.call_id, op.sample_rate, op.num_channels)
        outbox.enqueue_chunk(conn, op.call_id, op.idx, now)
        return True

    def _finalize(self, call_id: str, at: int, reason: str, now: int) -> bool:
        faultpoints.reached("writer:finalize", call_id)
        ended = finalize_call(self._wal.db(), call_id, at, reason, add_event=False, now=now)
        if ended:
            self._book.ended[call_id] = reason
        return ended
