"""BatchCommitter: a batch of ops into SQLite, where one bad op costs only its own record.

Every call of the process shares the writer thread, so each op is a bulkhead: a batch
is committed as one transaction; when that fails, it is applied again one op per
transaction, and an op that still fails is dropped with one log line naming the call
and the cause. Brief OS hiccups are retried first; a full disk costs the newest audio
first (later chunk files of the batch's calls, then the batch's newest chunks); a
database that refuses writes altogether keeps everything and is retried.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from loguru import logger

from .chunk_spooler import OP_RETRY_DELAYS_S, ChunkSpooler, discard_unrecorded
from .events_table import MAX_EVENTS_PER_STATEMENT
from .op_apply import OpApplier
from .ops import CallOp, ChunkOp, EventOp, FinalizeOp, Op, OpenOp, SpooledChunkOp
from .store import transaction
from .wal_file import DatabaseDown, WalFile, is_disk_full, is_transient
from .writer_state import EXITING, CallBook, CallIdReused, WriterStats, reused

__all__ = ["Batch", "BatchCommitter"]

_OP_NAMES: dict[type[CallOp], str] = {
    OpenOp: "call-open",
    EventOp: "event",
    ChunkOp: "chunk",
    SpooledChunkOp: "chunk",
    FinalizeOp: "call-end",
}


@dataclass
class Batch:
    """Ops taken from the queue together; kept by the writer until they are settled."""

    work: deque[CallOp]
    barriers: list[Callable[[], None]]
    stop: bool
    careful: bool = False
    """Apply one op per transaction: after a failed batch, or after the thread died on it."""
    suspect: CallOp | None = None
    """The op being applied on its own: if the thread dies now, this op killed it."""
    taken: deque[Op] = field(default_factory=deque)
    """Taken from the queue and not yet sorted into ``work``, a flush or a parked line."""


class BatchCommitter:
    """Commits batches through an ``OpApplier``; drops what cannot be recorded, and says so."""

    def __init__(
        self,
        directory: Path,
        *,
        wal: WalFile,
        applier: OpApplier,
        book: CallBook,
        stats: WriterStats,
        spooler: ChunkSpooler,
    ) -> None:
        self._directory = directory
        self._wal = wal
        self._applier = applier
        self._book = book
        self._stats = stats
        self._spooler = spooler
        self.free_room: Callable[[deque[CallOp]], bool] = lambda work: False
        """Set by the writer: give up newer chunk files than the batch's (True if any)."""

    def screen(self, work: deque[CallOp]) -> deque[CallOp]:
        """Refuse a reused call id before any of its files are written.

        Also drops the ops of calls that are not recorded. In queue order: a refusal
        affects only later ops.

        Returns:
            ``work`` without the refused and discarded ops.
        """
        skipped = self._book.skipped
        if not skipped and not any(isinstance(op, OpenOp) for op in work):
            return work
        kept: deque[CallOp] = deque()
        for op in work:
            call_id = op.call_id
            if (
                isinstance(op, OpenOp)
                and call_id not in skipped
                and self._applier.already_recorded(call_id)
            ):
                self.drop(op, reused(call_id, self._directory))
            elif call_id in skipped:
                self._discard(op)
            else:
                kept.append(op)
        return kept

    def commit(self, batch: Batch) -> bool:
        """Commit the batch as one transaction; on failure, one op per transaction.

        A full disk first gives up the files of the calls' newer chunks that wait behind
        the batch (``free_room``), then checkpoints the -wal once, then sheds the batch's
        newest chunks (a full disk must cost audio, not the call; a chunk whose file is
        written is not shed while something newer, or stale, can give way for it). When
        the database itself refuses writes (locked, read-only, I/O error on a probe
        write), everything is kept in memory and retried with backoff, logging once per
        streak. Otherwise one op is bad: apply them one by
        one and drop only what still fails.

        Returns:
            True if deliveries were added (a drainer has new rows to claim).
        """
        delay = 0.05
        streak_logged = False
        added = False
        wal_reclaimed = False  # once: a failed commit's frames would make it "shrink" forever
        while batch.work:
            try:
                if batch.careful:
                    added = self._commit_one_by_one(batch) or added
                else:
                    work = batch.work
                    if len(work) <= MAX_EVENTS_PER_STATEMENT and all(
                        type(op) is EventOp for op in work
                    ):
                        self._applier.apply_events_alone(cast("deque[EventOp]", work))
                    else:
                        with transaction(self._wal.db()):
                            added = self._applier.apply(work)
                    self._applier.settle(work)
                    work.clear()
            except DatabaseDown as down:
                streak_logged = self._wait_for_database(batch, down, streak_logged, delay)
                delay = min(delay * 2, 2.0)
            except BaseException as exc:  # any class: one bad op must not end the thread
                self._stats.failed_batches += 1
                if is_disk_full(exc) and any(isinstance(op, SpooledChunkOp) for op in batch.work):
                    # Newer audio goes first, then the -wal's stale pages, then the batch's audio.
                    if self.free_room(batch.work):
                        pass
                    elif not wal_reclaimed and self._wal.reclaim_wal():
                        wal_reclaimed = True
                    else:
                        batch.work = self._spooler.shed(batch.work, str(exc))
                elif self._wal.refuses_writes(exc):
                    streak_logged = self._wait_for_database(batch, exc, streak_logged, delay)
                    delay = min(delay * 2, 2.0)
                else:
                    batch.careful = True
        if streak_logged:
            logger.info(f"pipecat-roark: writing to {self._directory} works again")
        return added

    def _wait_for_database(
        self, batch: Batch, exc: BaseException, logged: bool, delay: float
    ) -> bool:
        if (is_disk_full(exc) or is_disk_full(exc.__cause__)) and self._wal.make_room():
            return logged  # room was made: retry at once
        if not logged:
            logger.error(
                f"pipecat-roark: cannot write to {self._directory} ({exc}); "
                f"keeping {len(batch.work)} item(s) in memory and retrying: "
                "free disk space or fix permissions"
            )
        if EXITING.is_set():
            logger.error(
                f"pipecat-roark: process is exiting; {len(batch.work)} item(s) could not be "
                f"written to {self._directory} and are lost"
            )
            self._stats.dropped_ops += len(batch.work)
            batch.work.clear()
            return True
        time.sleep(delay)
        return True

    def _commit_one_by_one(self, batch: Batch) -> bool:
        added = False
        work = batch.work
        while work:
            op = work[0]
            batch.suspect = op
            added = self._commit_one(op) or added
            work.popleft()
            batch.suspect = None
        return added

    def _commit_one(self, op: CallOp) -> bool:
        """Commit one op in its own transaction; retry transient errors; else drop it.

        Returns:
            True if the op added deliveries.

        Raises:
            DatabaseDown: the database itself refuses writes (the op is kept).
        """
        if isinstance(op, SpooledChunkOp) and self._spooler.after_cut(op.call_id, op.idx):
            self._stats.chunks_skipped += 1  # behind a chunk whose row failed: no gap
            discard_unrecorded(self._directory, op.chunk.relpath)
            return False
        book = self._book
        for delay in (*OP_RETRY_DELAYS_S, None):
            # A call open here is recorded: a skip is then a later session's, refused.
            if op.call_id in book.skipped and op.call_id not in book.open_calls:
                self._discard(op)
                return False
            try:
                with transaction(self._wal.db()):
                    added = self._applier.apply((op,))
            except BaseException as exc:
                if is_disk_full(exc) and isinstance(op, SpooledChunkOp):
                    self.drop(op, exc)
                    return False
                if self._wal.refuses_writes(exc):
                    raise DatabaseDown(str(exc)) from exc
                if delay is not None and self._worth_retrying(op, exc):
                    self._stats.retried_ops += 1
                    time.sleep(delay)
                    continue
                self.drop(op, exc)
                return False
            self._applier.settle((op,))
            return added
        return False  # pragma: no cover - the last delay is None

    def _worth_retrying(self, op: CallOp, exc: BaseException) -> bool:
        """Transient, and this call has not already lost an op of this kind to it.

        A persistent fault on one call must not stall every other call for each of its ops.

        Returns:
            True if the op is worth another try after a short delay.
        """
        fault = (type(op), type(exc).__name__)
        return is_transient(exc) and fault not in self._book.faults.get(op.call_id, ())

    def drop(self, op: CallOp, exc: BaseException) -> None:
        """Lose only this op's record (a chunk: the rest of its call's audio), and say so."""
        book = self._book
        kind, call_id = type(op), op.call_id
        self._stats.dropped_ops += 1
        cause = f"{type(exc).__name__}: {exc}"
        seen = book.faults.setdefault(call_id, set())
        first = (kind, type(exc).__name__) not in seen
        seen.add((kind, type(exc).__name__))
        if isinstance(op, (ChunkOp, SpooledChunkOp)):
            self._spooler.cut(call_id, op.idx)
            if isinstance(op, SpooledChunkOp):
                discard_unrecorded(self._directory, op.chunk.relpath)
            if is_disk_full(exc):
                self._spooler.stop_audio(call_id, f"disk full committing audio ({exc})")
            else:
                reason = f"chunk {op.idx} could not be recorded ({cause})"
                self._spooler.stop_audio(call_id, reason)
            return
        if isinstance(op, OpenOp):
            if isinstance(exc, CallIdReused):
                book.skipped[call_id] = str(exc)
                logger.error(f"pipecat-roark: {exc}")
                return
            book.skipped[call_id] = cause
            logger.error(
                f"pipecat-roark: call {call_id!r} could not be opened in {self._directory} "
                f"({cause}); it is not recorded. Other calls are not affected"
            )
            return
        if isinstance(op, FinalizeOp):
            book.open_calls.pop(call_id, None)
            book.audio_stopped.discard(call_id)
            book.audio_cut.pop(call_id, None)
            book.faults.pop(call_id, None)
            logger.error(
                f"pipecat-roark: the end of call {call_id!r} could not be recorded ({cause}); "
                "a drainer finalizes it (observer-lost) once this process is gone"
            )
            return
        if not first:
            return
        logger.error(
            f"pipecat-roark: dropped one {_OP_NAMES[kind]} record for call "
            f"{call_id!r} ({cause}); the rest of the call is kept (further such drops for this "
            "call are counted, not logged)"
        )

    def _discard(self, op: CallOp) -> None:
        """An op of a call that is not recorded (see ``CallBook.skipped``): no line per op."""
        self._stats.dropped_ops += 1
        if isinstance(op, SpooledChunkOp):  # its folder too, once empty: nothing of it stays
            discard_unrecorded(self._directory, op.chunk.relpath)
        elif isinstance(op, FinalizeOp):
            self._book.skipped.pop(op.call_id, None)
            self._book.faults.pop(op.call_id, None)
            self._book.audio_cut.pop(op.call_id, None)
