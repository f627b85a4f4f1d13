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
from pathlib import Path

from loguru import logger

from . import faultpoints, spool
from .ops import CallOp, ChunkOp, SpooledChunkOp
from .outbox import undelivered_audio_bytes
from .spool import SpooledChunk
from .wal_file import is_disk_full, is_transient
from .writer_state import CallBook, WriterStats

__all__ = ["DATABASE_RESERVE_BYTES", "OP_RETRY_DELAYS_S", "ChunkSpooler", "Drop"]

DATABASE_RESERVE_BYTES = 256 << 10
"""Audio never takes the last of this, whatever ``min_free_bytes`` says: the database's
write-ahead log grows by a few pages per commit until its checkpoint, and the events
that end the call must still fit after audio has stopped."""
OP_RETRY_DELAYS_S = (0.01, 0.05, 0.2, 0.5)
"""Backoff before each retry of one op that failed with a transient error (<1 s in all)."""

Drop = Callable[[CallOp, BaseException], None]
"""What loses one op's record, and says so (``BatchCommitter.drop``)."""


class ChunkSpooler:
    """Turns a batch's ``ChunkOp``s into durable files (``SpooledChunkOp``), or stops audio."""

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

    def measure(self, conn: sqlite3.Connection) -> None:
        """Undelivered audio only: delivered chunks wait for retention, not against the cap."""
        self._spool_bytes = undelivered_audio_bytes(conn)

    def spool(self, work: deque[CallOp], drop: Drop) -> deque[CallOp]:
        """Write the chunk files durably, before their rows are committed.

        Returns:
            ``work`` in order, each ChunkOp replaced by its SpooledChunkOp, or left out
            when its file could not be written (``drop`` is told).
        """
        if not any(isinstance(op, ChunkOp) for op in work):
            return work
        out: deque[CallOp] = deque()
        for op in work:
            if not isinstance(op, ChunkOp):
                out.append(op)
                continue
            chunk = self._write_chunk(op, drop)
            if chunk is not None:
                out.append(
                    SpooledChunkOp(
                        op.call_id, op.idx, chunk, op.sample_rate, op.num_channels, op.at
                    )
                )
        return out

    def _write_chunk(self, op: ChunkOp, drop: Drop) -> SpooledChunk | None:
        call_id, index, data = op.call_id, op.idx, op.data
        if call_id in self._book.audio_stopped or call_id in self._book.skipped:
            self._stats.chunks_skipped += 1
            return None
        reason = self._spool_full(len(data))
        if reason is not None:
            self.stop_audio(call_id, reason)
            return None
        for delay in (*OP_RETRY_DELAYS_S, None):
            try:
                faultpoints.reached("writer:chunk-file", call_id)
                chunk = spool.write_chunk(self._directory, call_id, index, data)
            except BaseException as exc:
                if delay is not None and is_transient(exc):
                    self._stats.retried_ops += 1
                    time.sleep(delay)
                    continue
                if is_disk_full(exc):
                    self.stop_audio(call_id, f"disk full writing audio ({exc})")
                else:
                    drop(op, exc)
                return None
            self._spool_bytes += chunk.size  # counted now: a batch can hold many chunks
            return chunk
        return None  # pragma: no cover - the last delay is None

    def _spool_full(self, size: int) -> str | None:
        if self._spool_bytes + size > self._max_spool_bytes:
            return f"the chunk spool is over its cap of {self._max_spool_bytes} bytes"
        try:
            stat = os.statvfs(self._directory)
        except OSError:
            return None
        free = stat.f_bavail * stat.f_frsize
        floor = max(self._min_free_bytes, DATABASE_RESERVE_BYTES)
        if free - size < floor:
            return f"free disk space is below {floor} bytes ({free} left)"
        return None

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
            (self._directory / op.chunk.relpath).unlink(missing_ok=True)
            self.stop_audio(op.call_id, f"disk full committing audio ({error})")
        return kept
