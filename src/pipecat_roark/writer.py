"""The group-commit writer: one thread per database file per process.

Observers never touch SQLite. They put small tuples on a queue (a C-level append,
safe from any thread) and return; this thread takes everything queued, commits it in
one transaction, and goes back for more. Batches grow only under load, so a quiet
call commits within a millisecond and a busy process still commits ~every few ms; a
kill -9 loses only what was queued since the last commit. Chunk files are written
here too, before their rows, so a row always points at a durable file.
"""

from __future__ import annotations

import asyncio
import atexit
import errno
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from . import crashpoints, spool
from .errors import StoreCorrupt
from .events import CallOpened, ChunkRecorded, encode_event
from .outbox import undelivered_audio_bytes
from .owner import Owner, current_owner, heartbeat_interval_s
from .store import connect, finalize_call, now_us, quarantine, transaction

__all__ = ["Writer", "WriterStats", "close_all_writers", "writer_for"]

DEFAULT_MAX_SPOOL_BYTES = 1 << 30  # 1 GiB
DEFAULT_MIN_FREE_BYTES = 64 << 20  # keep 64 MiB free so events can still commit

# Queue items are plain tuples: the hot path builds them without any allocation but the tuple.
OP_OPEN = 0  # (OP_OPEN, call_id, CallOpened, key_fp)
OP_EVENT = 1  # (OP_EVENT, call_id, Event)
OP_CHUNK = 2  # (OP_CHUNK, call_id, index, data, sample_rate, num_channels, at)
OP_FINALIZE = 3  # (OP_FINALIZE, call_id, at, reason, add_closed_event)
OP_BARRIER = 4  # (OP_BARRIER, callback) - called once everything queued before it is committed
OP_STOP = 5  # (OP_STOP,)
OP_CHUNK_READY = (
    6  # OP_CHUNK after its file is durable: (…, call_id, index, SpooledChunk, rate, channels, at)
)

Op = tuple[Any, ...]


@dataclass
class WriterStats:
    """Counters a benchmark or `doctor` can read; updated only by the writer thread."""

    batches: int = 0
    ops: int = 0
    events: int = 0
    chunks: int = 0
    max_batch: int = 0
    failed_batches: int = 0
    dropped_ops: int = 0
    chunks_skipped: int = 0
    """Chunks not recorded: spool cap, free-space floor or a full disk."""
    commit_latency_us: list[int] = field(default_factory=list)
    """Queue-to-commit latency of sampled ops (µs), when ``Writer.sample_latency`` is on."""


class Writer:
    """Owns the one write connection of a process to ``<directory>/wal.sqlite``."""

    def __init__(
        self,
        directory: Path,
        *,
        max_spool_bytes: int = DEFAULT_MAX_SPOOL_BYTES,
        min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
        owner: Owner | None = None,
    ) -> None:
        self.directory = directory
        # Often enough that a sidecar's grace can be short (PIPECAT_ROARK_HEARTBEAT_S).
        self.heartbeat_s = heartbeat_interval_s()
        self.owner = owner or current_owner(self.heartbeat_s)
        self.max_spool_bytes = max_spool_bytes
        self.min_free_bytes = min_free_bytes
        self.stats = WriterStats()
        self.sample_latency = False
        self._conn = _connect_or_quarantine(directory)
        self._queue: queue.SimpleQueue[Op] = queue.SimpleQueue()
        self._listeners: list[Callable[[], None]] = []
        self._open_calls: set[str] = set()
        self._audio_stopped: set[str] = set()
        self._spool_bytes = self._measure_spool()
        self._thread = threading.Thread(
            target=self._run, name=f"pipecat-roark-writer:{directory}", daemon=True
        )
        self._stopped = threading.Event()
        self._thread.start()

    # ---- producer side (any thread, never blocks) ----

    def submit(self, op: Op) -> None:
        self._queue.put(op)

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        """Called from the writer thread after a commit that added deliveries."""
        self._listeners.append(listener)

    def remove_commit_listener(self, listener: Callable[[], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def flush_sync(self, timeout: float) -> bool:
        """Block until everything queued so far is committed (or ``timeout``)."""
        if not self._thread.is_alive():
            return False
        done = threading.Event()
        self.submit((OP_BARRIER, done.set))
        return done.wait(timeout)

    async def flush(self, limit_s: float) -> bool:
        """Wait, without blocking the event loop, until everything queued is committed."""
        if not self._thread.is_alive():
            return False
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def release() -> None:
            loop.call_soon_threadsafe(_resolve, future)

        self.submit((OP_BARRIER, release))
        try:
            await asyncio.wait_for(asyncio.shield(future), limit_s)
        except TimeoutError:
            return False
        return True

    def close(self, timeout: float = 5.0) -> bool:
        """Commit what is queued, then stop the thread and close the connection."""
        if self._thread.is_alive():
            self.submit((OP_STOP,))
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ---- writer thread ----

    def _run(self) -> None:
        next_heartbeat = time.monotonic() + self.heartbeat_s
        try:
            while True:
                wait = max(0.0, next_heartbeat - time.monotonic())
                try:
                    first = self._queue.get(timeout=wait)
                except queue.Empty:
                    self._heartbeat()
                    next_heartbeat = time.monotonic() + self.heartbeat_s
                    continue
                batch = [first]
                while True:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                stop = any(op[0] == OP_STOP for op in batch)
                self._commit(batch)
                if stop:
                    return
                if time.monotonic() >= next_heartbeat:
                    self._heartbeat()
                    next_heartbeat = time.monotonic() + self.heartbeat_s
        except BaseException as exc:  # pragma: no cover - last-resort guard
            logger.exception(f"pipecat-roark writer for {self.directory} stopped: {exc}")
        finally:
            self._stopped.set()
            self._conn.close()

    def _commit(self, batch: list[Op]) -> None:
        barriers = [op[1] for op in batch if op[0] == OP_BARRIER]
        work = [op for op in batch if op[0] not in (OP_BARRIER, OP_STOP)]
        added_deliveries = False
        if work:
            added_deliveries = self._commit_with_retry(work)
        if added_deliveries:
            for listener in list(self._listeners):
                try:
                    listener()
                except Exception as exc:
                    logger.warning(f"pipecat-roark: commit listener failed: {exc}")
        for release in barriers:
            release()

    def _commit_with_retry(self, work: list[Op]) -> bool:
        """Commit ``work`` as one transaction; on a transient failure keep it and retry.

        Chunk files are written first (outside the transaction). If the commit then
        fails because the disk is full, the batch's new chunk files are removed (their
        rows never existed), those calls stop recording audio, and the events are
        retried alone: a full disk must cost audio, not the call. Other transient
        failures (I/O error, locked) keep the batch in memory and retry with backoff,
        logging once per streak. Any other error means one op is bad: fall back to one
        transaction per op and drop only the ops that fail.
        """
        work = self._spool_chunks(work)
        if any(op[0] == OP_CHUNK_READY for op in work):
            crashpoints.reached("chunk-file-durable")
        crashpoints.reached("before-commit")
        delay = 0.05
        streak_logged = False
        while True:
            try:
                with transaction(self._conn):
                    added = self._apply_all(work)
                self._account(work)
                self._forget_ended(work)
                if streak_logged:
                    logger.info(f"pipecat-roark: writing to {self.directory} works again")
                return added
            except (sqlite3.OperationalError, OSError) as exc:
                self.stats.failed_batches += 1
                if _is_disk_full(exc) and any(op[0] == OP_CHUNK_READY for op in work):
                    work = self._shed_audio(work, str(exc))
                    continue
                if not streak_logged:
                    logger.error(
                        f"pipecat-roark: cannot write to {self.directory} ({exc}); "
                        f"keeping {len(work)} item(s) in memory and retrying: "
                        "free disk space or fix permissions"
                    )
                    streak_logged = True
                if self._stopping_soon():
                    logger.error(
                        f"pipecat-roark: process is exiting; {len(work)} item(s) could not be "
                        f"written to {self.directory} and are lost"
                    )
                    self.stats.dropped_ops += len(work)
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
            except sqlite3.Error:
                self.stats.failed_batches += 1
                return self._commit_one_by_one(work)

    def _spool_chunks(self, work: list[Op]) -> list[Op]:
        """Write the batch's chunk files durably; chunk ops become OP_CHUNK_READY (or go)."""
        if not any(op[0] == OP_CHUNK for op in work):
            return work
        out: list[Op] = []
        for op in work:
            if op[0] != OP_CHUNK:
                out.append(op)
                continue
            _, call_id, index, data, sample_rate, num_channels, at = op
            chunk = self._write_chunk(call_id, index, data)
            if chunk is not None:
                out.append((OP_CHUNK_READY, call_id, index, chunk, sample_rate, num_channels, at))
        return out

    def _write_chunk(self, call_id: str, index: int, data: bytes) -> spool.SpooledChunk | None:
        if call_id in self._audio_stopped:
            self.stats.chunks_skipped += 1
            return None
        reason = self._spool_full(len(data))
        if reason is None:
            try:
                chunk = spool.write_chunk(self.directory, call_id, index, data)
            except OSError as exc:
                if exc.errno not in _DISK_FULL:
                    raise
                reason = f"disk full writing audio ({exc.strerror})"
            else:
                self._spool_bytes += chunk.size  # counted now: a batch can hold many chunks
                return chunk
        self._stop_audio(call_id, reason)
        return None

    def _spool_full(self, size: int) -> str | None:
        if self._spool_bytes + size > self.max_spool_bytes:
            return f"the chunk spool is over its cap of {self.max_spool_bytes} bytes"
        try:
            stat = os.statvfs(self.directory)
        except OSError:
            return None
        free = stat.f_bavail * stat.f_frsize
        if free - size < self.min_free_bytes:
            return f"free disk space is below {self.min_free_bytes} bytes ({free} left)"
        return None

    def _stop_audio(self, call_id: str, reason: str) -> None:
        # Later chunks would leave a gap Roark cannot stitch: the call's audio ends here.
        self._audio_stopped.add(call_id)
        self.stats.chunks_skipped += 1
        logger.error(
            f"pipecat-roark: {reason} in {self.directory}; no more audio is recorded for call "
            f"{call_id!r} (events still are). Free space or run `pipecat-roark drain` and "
            "`pipecat-roark prune`"
        )

    def _shed_audio(self, work: list[Op], error: str) -> list[Op]:
        """Drop the newer half of the batch's chunks (their files too) to make room.

        Chunks are taken from the end of the batch, so each call keeps a gapless prefix
        of its recording; the caller retries, and every round removes at least one chunk.
        """
        positions = [i for i, op in enumerate(work) if op[0] == OP_CHUNK_READY]
        shed = set(positions[len(positions) // 2 :])
        kept: list[Op] = []
        for i, op in enumerate(work):
            if i not in shed:
                kept.append(op)
                continue
            (self.directory / op[3].relpath).unlink(missing_ok=True)
            if op[1] not in self._audio_stopped:
                self._stop_audio(op[1], f"disk full committing audio ({error})")
            else:
                self.stats.chunks_skipped += 1
        return kept

    def _stopping_soon(self) -> bool:
        return _EXITING.is_set()

    def _commit_one_by_one(self, work: list[Op]) -> bool:
        added = False
        for op in work:
            try:
                with transaction(self._conn):
                    added = self._apply_all([op]) or added
                self._account([op])
                self._forget_ended([op])
            except (sqlite3.Error, OSError) as exc:
                self.stats.dropped_ops += 1
                logger.error(
                    f"pipecat-roark: dropped one {_OP_NAMES.get(op[0], op[0])} record for call "
                    f"{op[1]!r}: {exc}; the rest of the call is kept"
                )
        return added

    def _forget_ended(self, work: list[Op]) -> None:
        # Only after the commit: a retried batch must still know which calls lost audio.
        for op in work:
            if op[0] == OP_FINALIZE:
                self._audio_stopped.discard(op[1])

    def _account(self, work: list[Op]) -> None:
        stats = self.stats
        stats.batches += 1
        stats.ops += len(work)
        stats.max_batch = max(stats.max_batch, len(work))

    def _apply_all(self, work: list[Op]) -> bool:
        conn = self._conn
        added = False
        events: list[tuple[str, bytes]] = []
        now = now_us()
        for op in work:
            kind = op[0]
            if kind == OP_EVENT:
                events.append((op[1], encode_event(op[2])))
            elif kind == OP_OPEN:
                if events:
                    self._insert_events(events)
                    events = []
                added = self._open(op[1], op[2], op[3], now) or added
            elif kind == OP_CHUNK_READY:
                if events:
                    self._insert_events(events)
                    events = []
                added = self._chunk(*op[1:], now=now) or added
            elif kind == OP_FINALIZE:
                if events:
                    self._insert_events(events)
                    events = []
                added = self._finalize(op[1], op[2], op[3], op[4], now) or added
        if events:
            self._insert_events(events)
        del conn
        return added

    def _insert_events(self, events: list[tuple[str, bytes]]) -> None:
        self._conn.executemany("INSERT INTO events (call_id, body) VALUES (?, ?)", events)
        self.stats.events += len(events)

    def _open(self, call_id: str, opened: CallOpened, key_fp: str | None, now: int) -> bool:
        owner = self.owner
        cursor = self._conn.execute(
            "INSERT INTO calls (id, agent_id, agent_name, key_fp, owner_host, owner_pid,"
            " owner_token, started_at, heartbeat_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (id) DO NOTHING",
            (
                call_id,
                opened.agent_id,
                opened.agent_name,
                key_fp,
                owner.host,
                owner.pid,
                owner.token,
                opened.at,
                now,
            ),
        )
        if cursor.rowcount == 0:
            logger.warning(
                f"pipecat-roark: call id {call_id!r} was already recorded; this observer's "
                "events are added to that call. Give each call its own pipecat_call_id"
            )
            return False
        self._insert_events([(call_id, encode_event(opened))])
        self._conn.execute(
            "INSERT OR IGNORE INTO deliveries (call_id, kind, idempotency_key, next_attempt_at,"
            " created_at) VALUES (?, 'call-started', ?, ?, ?)",
            (call_id, f"{call_id}:call-started", now, now),
        )
        self._open_calls.add(call_id)
        return True

    def _chunk(
        self,
        call_id: str,
        index: int,
        chunk: spool.SpooledChunk,
        sample_rate: int,
        num_channels: int,
        at: int,
        *,
        now: int,
    ) -> bool:
        conn = self._conn
        cursor = conn.execute(
            "INSERT OR IGNORE INTO chunks (call_id, idx, path, size, sha256, sample_rate,"
            " num_channels, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                call_id,
                index,
                chunk.relpath,
                chunk.size,
                chunk.sha256,
                sample_rate,
                num_channels,
                at,
            ),
        )
        if cursor.rowcount == 0:
            return False
        self.stats.chunks += 1
        recorded = ChunkRecorded(
            at=at, index=index, size=chunk.size, sample_rate=sample_rate, num_channels=num_channels
        )
        self._insert_events([(call_id, encode_event(recorded))])
        conn.execute(
            "UPDATE calls SET sample_rate = ?, num_channels = ? WHERE id = ? AND sample_rate IS NULL",
            (sample_rate, num_channels, call_id),
        )
        conn.execute(
            "INSERT OR IGNORE INTO deliveries (call_id, kind, chunk_idx, idempotency_key,"
            " next_attempt_at, created_at) VALUES (?, 'chunk', ?, ?, ?, ?)",
            (call_id, index, f"{call_id}:chunk:{index}", now, now),
        )
        return True

    def _finalize(self, call_id: str, at: int, reason: str, add_event: bool, now: int) -> bool:
        self._open_calls.discard(call_id)
        return finalize_call(self._conn, call_id, at, reason, add_event=add_event, now=now)

    def _heartbeat(self) -> None:
        try:
            if self._open_calls:
                now = now_us()
                with transaction(self._conn):
                    self._conn.executemany(
                        "UPDATE calls SET heartbeat_at = ? WHERE id = ? AND state = 'open'",
                        [(now, call_id) for call_id in self._open_calls],
                    )
            self._spool_bytes = self._measure_spool()
        except sqlite3.Error as exc:
            logger.warning(f"pipecat-roark: heartbeat to {self.directory} failed: {exc}")

    def _measure_spool(self) -> int:
        """Undelivered audio only: delivered chunks wait for retention, not against the cap."""
        return undelivered_audio_bytes(self._conn)


def _connect_or_quarantine(directory: Path) -> sqlite3.Connection:
    """A bot must keep recording: a damaged database is moved aside and a fresh one started."""
    try:
        return connect(directory)
    except StoreCorrupt as exc:
        moved = quarantine(directory)
        logger.error(
            f"pipecat-roark: {exc}. It was moved to {moved} (not deleted) and a fresh database "
            "was started; undelivered calls in the old file can be salvaged with sqlite3 .recover"
        )
        return connect(directory)


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in _DISK_FULL
    return "full" in str(exc).lower()


_OP_NAMES = {
    OP_OPEN: "call-open",
    OP_EVENT: "event",
    OP_CHUNK: "chunk",
    OP_CHUNK_READY: "chunk",
    OP_FINALIZE: "call-end",
}


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


_WRITERS: dict[Path, Writer] = {}
_WRITERS_LOCK = threading.Lock()
_EXITING = threading.Event()


def writer_for(directory: Path, **kwargs: Any) -> Writer:
    """The process's writer for ``directory``, started on first use. Raises StoreError."""
    key = directory.expanduser().resolve()
    with _WRITERS_LOCK:
        writer = _WRITERS.get(key)
        if writer is None or not writer.alive:
            writer = Writer(key, **kwargs)
            _WRITERS[key] = writer
        return writer


def close_all_writers(timeout: float = 5.0) -> None:
    """Commit what every writer holds and stop them (interpreter exit, tests)."""
    with _WRITERS_LOCK:
        writers = list(_WRITERS.values())
        _WRITERS.clear()
    deadline = time.monotonic() + timeout
    for writer in writers:
        writer.close(max(0.1, deadline - time.monotonic()))


def _at_exit() -> None:
    close_all_writers(timeout=3.0)
    _EXITING.set()


atexit.register(_at_exit)
