"""ChunkSpooler: the writer's audio files, made durable before their rows, within bounds.

A chunk's file is written (tmp, fsync, rename) before its row is committed, so a row
always points at a durable file. Audio is what gives way when space runs short: the
spool cap, the free-space floor, a full disk or a failed write each stop the rest of
that call's audio (later chunks would leave a gap Roark cannot stitch), with one loud
line, while its events are still recorded.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from loguru import logger

from . import faultpoints, spool
from .ops import CallOp, ChunkOp, SpooledChunkOp
from .outbox import undelivered_audio_bytes
from .spool import SpooledChunk
from .wal_file import is_disk_full, is_transient
from .writer_state import CallBook, WriterStats

__all__ = [
    "DATABASE_RESERVE_BYTES",
    "OP_RETRY_DELAYS_S",
    "SPOOL_THREADS",
    "ChunkSpooler",
    "Drop",
    "PendingChunk",
    "discard_unrecorded",
]

DATABASE_RESERVE_BYTES = 256 << 10
"""Audio never takes the last of this, whatever ``min_free_bytes`` says: the database's
write-ahead log grows by a few pages per commit until its checkpoint, and the events
that end the call must still fit after audio has stopped."""
OP_RETRY_DELAYS_S = (0.01, 0.05, 0.2, 0.5)
"""Backoff before each retry of one op that failed with a transient error (<1 s in all)."""
SPOOL_THREADS = 4
"""Chunk files written side by side, while the writer commits (see ``ChunkSpooler.start``)."""

Drop = Callable[[CallOp, BaseException], None]
"""What loses one op's record, and says so (``BatchCommitter.drop``)."""
_Written = tuple[SpooledChunk | None, BaseException | None, int]
"""A chunk file written (or the exception that stopped it) and how many retries it took."""


def discard_unrecorded(directory: Path, relpath: str) -> None:
    """Delete the file of a chunk that is not recorded; one that will not go stays, with a warning.

    Cleanup, never a reason to stop: the writer calls this while it settles a batch, and
    an error here (a name that now holds a folder, a read-only mount) would otherwise end
    or spin its thread, which every call of the process shares. The file has no row.
    """
    try:
        spool.discard_chunk(directory, relpath)
    except OSError as exc:
        logger.warning(
            f"pipecat-roark: could not delete {relpath} in {directory}, a chunk that is not "
            f"recorded ({exc}); it is left as it is"
        )


class PendingChunk(NamedTuple):
    """A chunk whose file a spool thread is writing; its row waits for it."""

    op: ChunkOp
    written: Future[_Written]


class ChunkSpooler:
    """Turns ``ChunkOp``s into durable files (``SpooledChunkOp``), or stops audio."""

    def __init__(
        self,
        directory: Path,
        *,
        max_spool_bytes: int,
        min_free_bytes: int,
        book: CallBook,
        stats: WriterStats,
    ) -> None:
        self._directory = directory
        self._max_spool_bytes = max_spool_bytes
        self._min_free_bytes = min_free_bytes
        self._book = book
        self._stats = stats
        self._spool_bytes = 0
        self._pool: ThreadPoolExecutor | None = None
        self._writing: list[tuple[Future[_Written], int]] = []
        """Files admitted and still being written, with their sizes: not yet in ``statvfs``."""

    def measure(self, conn: sqlite3.Connection) -> None:
        """Undelivered audio only: delivered chunks wait for retention, not against the cap."""
        self._spool_bytes = undelivered_audio_bytes(conn)

    def start(self, op: ChunkOp, on_written: Callable[[], None]) -> PendingChunk | None:
        """Admit ``op`` (in queue order) and start writing its file on a spool thread.

        The file is written while the writer goes on committing other calls' ops; its row
        waits for it (``parked_ops``). A file is a dozen syscalls, and after each one the
        writing thread waits for the GIL that a busy event loop holds for up to a switch
        interval: written inside the batch, a burst of chunks from many calls kept every
        record queued behind it waiting for the sum of those waits (issue 12).
        ``on_written`` is called (on the spool thread) once the file is written or failed.

        Returns:
            The chunk being written, or None if its call records no more audio or the
            spool cap or free-space floor refuses it.
        """
        if not self._admit(op):
            return None
        written = self._submit(op)
        self._writing.append((written, len(op.data)))
        written.add_done_callback(lambda _: on_written())
        return PendingChunk(op, written)

    def finish(
        self, pending: PendingChunk, drop: Drop, *, after_loss: bool
    ) -> SpooledChunkOp | None:
        """The op that records a written file, once ``pending.written`` is done.

        ``after_loss``: an earlier chunk of this call could not be written, so this one is
        discarded (no gap is recorded); a later chunk refused at admission does not count.
        So is a chunk behind one whose row could not be committed (``cut``).

        Returns:
            The op that records its row, or None when it is not recorded (``drop`` is
            told of a failed write; a full disk stops its call's audio).
        """
        op = pending.op
        chunk, exc, retries = pending.written.result()
        self._stats.retried_ops += retries
        if chunk is not None and not after_loss and not self.after_cut(op.call_id, op.idx):
            return SpooledChunkOp(op.call_id, op.idx, chunk, op.sample_rate, op.num_channels, op.at)
        self._spool_bytes -= len(op.data)
        if chunk is not None:
            self._stats.chunks_skipped += 1
            discard_unrecorded(self._directory, chunk.relpath)
        elif is_disk_full(exc):
            self.stop_audio(op.call_id, f"disk full writing audio ({exc})")
        elif exc is not None:
            drop(op, exc)
        return None

    def cut(self, call_id: str, idx: int) -> None:
        """Chunk ``idx`` was admitted but its row is not recorded: none after it may be."""
        cut = self._book.audio_cut
        cut[call_id] = min(idx, cut.get(call_id, idx))

    def after_cut(self, call_id: str, idx: int) -> bool:
        """Is chunk ``idx`` behind a chunk of its call whose row was not recorded?

        Returns:
            True if recording it would leave a gap in the call's audio.
        """
        cut = self._book.audio_cut.get(call_id)
        return cut is not None and idx > cut

    def close(self) -> None:
        """Let the spool threads go (the writer thread is stopping; no file is pending)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def _admit(self, op: ChunkOp) -> bool:
        """In queue order, before any file is written: the room it takes is counted now.

        Returns:
            True if the chunk may be written; False if its call records no more audio
            or the spool cap or free-space floor refuses it. (A call that is not recorded
            was screened out before: ``skipped`` may already name a later session with the
            same id, refused, while this chunk is the earlier session's.)
        """
        call_id, size = op.call_id, len(op.data)
        if call_id in self._book.audio_stopped:
            self._stats.chunks_skipped += 1
            return False
        reason = self._spool_full(size)
        if reason is not None:
            self.stop_audio(call_id, reason)
            return False
        self._spool_bytes += size
        return True

    def _submit(self, op: ChunkOp) -> Future[_Written]:
        """``_write_file`` on a spool thread (on this one once the interpreter is exiting).

        Executors take no more work once the interpreter exits; the file is still written.

        Returns:
            The outcome to come (already done when written here).
        """
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                SPOOL_THREADS, thread_name_prefix=f"pipecat-roark-spool:{self._directory}"
            )
        try:
            return self._pool.submit(self._write_file, op)
        except RuntimeError:  # "cannot schedule new futures after interpreter shutdown"
            done: Future[_Written] = Future()
            done.set_result(self._write_file(op))
            return done

    def _write_file(self, op: ChunkOp) -> _Written:
        """One chunk file, transient errors retried; any thread, no spooler state touched.

        Returns:
            The spooled chunk (or None), the error that stopped it (or None), and how many
            retries it took.
        """
        for retries, delay in enumerate((*OP_RETRY_DELAYS_S, None)):
            try:
                faultpoints.reached("writer:chunk-file", op.call_id)
                chunk = spool.write_chunk(self._directory, op.call_id, op.idx, op.data)
            except BaseException as exc:
                if delay is not None and is_transient(exc):
                    time.sleep(delay)
                    continue
                return None, exc, retries
            faultpoints.reached("writer:chunk-file-written", op.call_id)
            return chunk, None, retries
        return None, None, 0  # pragma: no cover - the last delay is None

    def _spool_full(self, size: int) -> str | None:
        if self._spool_bytes + size > self._max_spool_bytes:
            return f"the chunk spool is over its cap of {self._max_spool_bytes} bytes"
        try:
            stat = os.statvfs(self._directory)
        except OSError:
            return None
        free = stat.f_bavail * stat.f_frsize - self._unwritten_bytes()
        floor = max(self._min_free_bytes, DATABASE_RESERVE_BYTES)
        if free - size < floor:
            return (
                f"free disk space is below {floor} bytes ({free} left beside the chunk files "
                "being written)"
            )
        return None

    def _unwritten_bytes(self) -> int:
        """Room already promised to chunk files that spool threads are still writing.

        The disk does not show it yet: without it, a burst of chunks admitted in one batch
        (a writer behind under load) each saw the same free space, and together their
        files took the last of the disk; an earlier chunk's file, written last, then met
        a full disk and its call kept no audio, the later files being discarded behind it.

        Returns:
            The bytes of the admitted chunks whose files are not written (or failed) yet.
        """
        self._writing = [(written, size) for written, size in self._writing if not written.done()]
        return sum(size for _, size in self._writing)

    def stop_audio(self, call_id: str, reason: str) -> None:
        """No more audio for this call (a gap Roark cannot stitch), said once per call."""
        self._stats.chunks_skipped += 1
        if call_id in self._book.audio_stopped:
            return
        self._book.audio_stopped.add(call_id)
        logger.error(
            f"pipecat-roark: {reason} in {self._directory}; no more audio is recorded for call "
            f"{call_id!r} (events still are). Free space or run `pipecat-roark drain` and "
            "`pipecat-roark prune`"
        )

    def shed(self, work: deque[CallOp], error: str) -> deque[CallOp]:
        """Drop the newer half of the batch's chunks (their files too) to make room.

        Chunks are taken from the end of the batch, so each call keeps a gapless prefix
        of its recording; the caller retries, and every round removes at least one chunk.

        Returns:
            ``work`` without the shed chunks, whose calls record no more audio.
        """
        ops = list(work)
        positions = [i for i, op in enumerate(ops) if isinstance(op, SpooledChunkOp)]
        shed = set(positions[len(positions) // 2 :])
        kept: deque[CallOp] = deque()
        for i, op in enumerate(ops):
            if i not in shed or not isinstance(op, SpooledChunkOp):
                kept.append(op)
                continue
            discard_unrecorded(self._directory, op.chunk.relpath)
            self.cut(op.call_id, op.idx)
            self.stop_audio(op.call_id, f"disk full committing audio ({error})")
        return kept
