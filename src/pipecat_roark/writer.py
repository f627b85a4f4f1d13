"""The group-commit writer: one thread per database file per process.

Observers never touch SQLite. They put small typed ops (``ops.py``) on a queue (a C-level append,
safe from any thread) and return; this thread takes everything queued, commits it in
one transaction, and goes back for more. Batches grow only under load, so a quiet
call commits within a millisecond and a busy process still commits ~every few ms; a
kill -9 loses only what was queued since the last commit. Chunk files are written
here too, before their rows, so a row always points at a durable file.

Every call of the process shares this thread, so each op is a bulkhead: when a batch
fails, it is applied again one op per transaction, and an op that still fails costs
only its own record (a chunk: the rest of its call's audio), with one log line naming
the call and the cause. Brief OS hiccups (EMFILE, EIO, EAGAIN, ...) are retried first.
If the thread dies anyway, the next ``submit`` starts it again with the queue intact.
The database file is watched too: if it is deleted or replaced under us, a fresh one
is opened and the calls still open here are recorded in it again.
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
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from . import crashpoints, faultpoints, metrics, spool
from .errors import PipecatRoarkError, StoreCorrupt
from .events import CallOpened, ChunkRecorded, encode_event
from .ops import (
    BarrierOp,
    CallOp,
    ChunkOp,
    EventOp,
    FinalizeOp,
    Op,
    OpenOp,
    SpooledChunkOp,
    StopOp,
)
from .outbox import undelivered_audio_bytes
from .owner import Owner, current_owner, heartbeat_interval_s
from .store import DB_NAME, connect, finalize_call, now_us, quarantine, transaction

__all__ = [
    "CallIdReused",
    "Writer",
    "WriterStats",
    "close_all_writers",
    "running_writer",
    "writer_for",
]

DEFAULT_MAX_SPOOL_BYTES = 1 << 30  # 1 GiB
DEFAULT_MIN_FREE_BYTES = 64 << 20  # keep 64 MiB free so events can still commit
RESERVE_NAME = ".reserve"
RESERVE_BYTES = 128 << 10
"""A file kept in the data directory while there is room, and deleted when the disk is
full: room for the events and the ends of calls once audio has stopped for lack of space."""
DATABASE_RESERVE_BYTES = 256 << 10
"""Audio never takes the last of this, whatever ``min_free_bytes`` says: the database's
write-ahead log grows by a few pages per commit until its checkpoint, and the events
that end the call must still fit after audio has stopped."""
OP_RETRY_DELAYS_S = (0.01, 0.05, 0.2, 0.5)
"""Backoff before each retry of one op that failed with a transient error (<1 s in all)."""

_TRANSIENT_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.EIO, errno.EAGAIN, errno.EINTR, errno.EACCES, errno.EBUSY}
)
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class CallIdReused(PipecatRoarkError):
    """A second session tried to record under a call id the database already holds."""


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
    retried_ops: int = 0
    restarts: int = 0
    reopened: int = 0
    """Times the database file was found deleted or replaced and a fresh one opened."""
    chunks_skipped: int = 0
    """Chunks not recorded: spool cap, free-space floor, a full disk or a failed write."""
    commit_latency_us: list[int] = field(default_factory=list)
    """Queue-to-commit latency of sampled ops (µs), when ``Writer.sample_latency`` is on."""


@dataclass
class _OpenCall:
    """What is needed to record a call again in a fresh database (its events are not kept)."""

    opened: CallOpened
    key_fp: str | None
    chunks: list[SpooledChunkOp] = field(default_factory=list)


@dataclass
class _Batch:
    """Ops taken from the queue together; kept by the writer until they are settled."""

    work: deque[CallOp]
    barriers: list[Callable[[], None]]
    stop: bool
    careful: bool = False
    """Apply one op per transaction: after a failed batch, or after the thread died on it."""


class _DatabaseDown(Exception):
    """The database itself refuses writes (not one op): keep everything and wait."""


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
        self._conn: sqlite3.Connection | None = _connect_or_quarantine(directory)
        self._identity = _file_identity(directory)
        self._queue: queue.SimpleQueue[Op] = queue.SimpleQueue()
        self._listeners: list[Callable[[], None]] = []
        self._open_calls: dict[str, _OpenCall] = {}
        self._ended: dict[str, str] = {}
        """Calls this transaction ended, by reason: counted in metrics once committed."""
        self._audio_stopped: set[str] = set()
        self._skipped: dict[str, str] = {}
        """Calls whose ops are dropped until their end: why (a reused id, a failed open)."""
        self._faults: dict[str, set[tuple[type[CallOp], str]]] = {}
        """Per open call, the (op kind, exception class) pairs that already cost a record."""
        self._spool_bytes = self._measure_spool()
        self._keep_reserve()
        self._inflight: _Batch | None = None
        self._suspect: CallOp | None = None
        self._death: str | None = None
        self._closing = False
        self._lost = ""
        """How the database file was lost (deleted, replaced), for the reopening log line."""
        self._restart_lock = threading.Lock()
        self._thread = self._start_thread()

    # ---- producer side (any thread, never blocks) ----

    def submit(self, op: Op) -> None:
        self._queue.put(op)
        if self._death is not None:
            self._restart()

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        """Called from the writer thread after a commit that added deliveries."""
        self._listeners.append(listener)

    def remove_commit_listener(self, listener: Callable[[], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def flush_sync(self, timeout: float) -> bool:
        """Block until everything queued so far is committed (or ``timeout``)."""
        if self._closing:
            return False
        done = threading.Event()
        self.submit(BarrierOp(done.set))
        deadline = time.monotonic() + timeout
        while not done.wait(max(0.0, min(_WATCH_S, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                return False
            self._watch()
        return True

    async def flush(self, limit_s: float) -> bool:
        """Wait, without blocking the event loop, until everything queued is committed."""
        if self._closing:
            return False
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def release() -> None:
            loop.call_soon_threadsafe(_resolve, future)

        self.submit(BarrierOp(release))
        deadline = loop.time() + limit_s
        while True:
            try:
                await asyncio.wait_for(
                    asyncio.shield(future), max(0.0, min(_WATCH_S, deadline - loop.time()))
                )
            except TimeoutError:
                if loop.time() >= deadline:
                    return False
                self._watch()
                continue
            return True

    def close(self, timeout: float = 5.0) -> bool:
        """Commit what is queued, then stop the thread and close the connection."""
        self._closing = True
        if self._thread.is_alive():
            self._queue.put(StopOp())
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        """False once closed; a thread that died is restarted by the next submit."""
        return not self._closing

    @property
    def queue_depth(self) -> int:
        """Records submitted and not yet taken by the thread (approximate, for metrics)."""
        return self._queue.qsize()

    # ---- supervision ----

    def _start_thread(self) -> threading.Thread:
        thread = threading.Thread(
            target=self._run, name=f"pipecat-roark-writer:{self.directory}", daemon=True
        )
        thread.start()
        return thread

    def _watch(self) -> None:
        """A flush that waits also restarts a thread that died with the flush queued."""
        if self._death is not None:
            self._restart()

    def _restart(self) -> None:
        with self._restart_lock:
            death = self._death
            if death is None or self._closing:
                return
            self._thread.join(1.0)  # it set _death as its last act: it is ending now
            self._death = None
            self.stats.restarts += 1
            self._thread = self._start_thread()
        logger.error(
            f"pipecat-roark: the writer thread for {self.directory} had died ({death}); "
            "restarted it. Everything queued is kept. Please report this with the traceback"
        )

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the loop guards every op: this is a bug, say so
            logger.opt(exception=exc).error(
                f"pipecat-roark: the writer thread for {self.directory} died "
                f"({type(exc).__name__}: {exc}); it restarts on the next record"
            )
            self._death = f"{type(exc).__name__}: {exc}"  # the connection is kept for it
            return
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ---- writer thread ----

    def _loop(self) -> None:
        next_heartbeat = time.monotonic() + self.heartbeat_s
        while True:
            batch = self._inflight
            if batch is not None:  # the thread died on this batch: finish it one op at a time
                batch.careful = True
                if self._suspect is not None and batch.work and batch.work[0] is self._suspect:
                    op = batch.work.popleft()
                    self._drop(op, RuntimeError("the writer thread died applying it"))
                self._suspect = None
            else:
                wait = max(0.0, next_heartbeat - time.monotonic())
                try:
                    first = self._queue.get(timeout=wait)
                except queue.Empty:
                    self._heartbeat()
                    next_heartbeat = time.monotonic() + self.heartbeat_s
                    continue
                batch = self._take(first)
                self._inflight = batch
            self._process(batch)
            self._inflight = None
            if batch.stop:
                return
            if time.monotonic() >= next_heartbeat:
                self._heartbeat()
                next_heartbeat = time.monotonic() + self.heartbeat_s

    def _take(self, first: Op) -> _Batch:
        ops = [first]
        while True:
            try:
                ops.append(self._queue.get_nowait())
            except queue.Empty:
                break
        work: deque[CallOp] = deque()
        barriers: list[Callable[[], None]] = []
        stop = False
        for op in ops:
            if isinstance(op, BarrierOp):
                barriers.append(op.release)
            elif isinstance(op, StopOp):
                stop = True
            else:
                work.append(op)
        return _Batch(work=work, barriers=barriers, stop=stop)

    def _process(self, batch: _Batch) -> None:
        self._check_file()
        added_deliveries = False
        if batch.work:
            started = time.perf_counter()
            self._screen(batch)
            self._spool_chunks(batch)
            if any(isinstance(op, SpooledChunkOp) for op in batch.work):
                crashpoints.reached("chunk-file-durable")
            crashpoints.reached("before-commit")
            added_deliveries = self._commit_work(batch)
            metrics.WRITER_COMMIT_SECONDS.observe(time.perf_counter() - started)
        if added_deliveries:
            for listener in list(self._listeners):
                try:
                    listener()
                except Exception as exc:
                    logger.warning(f"pipecat-roark: commit listener failed: {exc}")
        for release in batch.barriers:
            try:
                release()
            except Exception as exc:
                logger.warning(f"pipecat-roark: flush callback failed: {exc}")
        batch.barriers = []

    # ---- committing: the fast path, then one op per transaction ----

    def _commit_work(self, batch: _Batch) -> bool:
        """Commit the batch as one transaction; on failure, one op per transaction.

        A full disk first sheds the batch's newest chunks (a full disk must cost audio,
        not the call). When the database itself refuses writes (locked, read-only,
        I/O error on a probe write), everything is kept in memory and retried with
        backoff, logging once per streak. Otherwise one op is bad: apply them one by
        one and drop only what still fails.
        """
        delay = 0.05
        streak_logged = False
        added = False
        while batch.work:
            try:
                if batch.careful:
                    added = self._commit_one_by_one(batch) or added
                else:
                    with transaction(self._db()):
                        added = self._apply_all(batch.work)
                    self._settle(batch.work)
                    batch.work.clear()
            except _DatabaseDown as down:
                streak_logged = self._wait_for_database(batch, down, streak_logged, delay)
                delay = min(delay * 2, 2.0)
            except BaseException as exc:  # any class: one bad op must not end the thread
                self.stats.failed_batches += 1
                if _is_disk_full(exc) and any(isinstance(op, SpooledChunkOp) for op in batch.work):
                    self._shed_audio(batch, str(exc))
                elif self._database_refuses(exc):
                    streak_logged = self._wait_for_database(batch, exc, streak_logged, delay)
                    delay = min(delay * 2, 2.0)
                else:
                    batch.careful = True
        if streak_logged:
            logger.info(f"pipecat-roark: writing to {self.directory} works again")
        return added

    def _wait_for_database(
        self, batch: _Batch, exc: BaseException, logged: bool, delay: float
    ) -> bool:
        if (_is_disk_full(exc) or _is_disk_full(exc.__cause__)) and (
            self._release_reserve() or self._reclaim_wal()
        ):
            return logged  # room was made: retry at once
        if not logged:
            logger.error(
                f"pipecat-roark: cannot write to {self.directory} ({exc}); "
                f"keeping {len(batch.work)} item(s) in memory and retrying: "
                "free disk space or fix permissions"
            )
        if _EXITING.is_set():
            logger.error(
                f"pipecat-roark: process is exiting; {len(batch.work)} item(s) could not be "
                f"written to {self.directory} and are lost"
            )
            self.stats.dropped_ops += len(batch.work)
            batch.work.clear()
            return True
        time.sleep(delay)
        return True

    def _keep_reserve(self) -> None:
        """(Re)create the reserve file when the disk has room for it twice over."""
        path = self.directory / RESERVE_NAME
        try:
            if path.exists():
                return
            stat = os.statvfs(self.directory)
            if stat.f_bavail * stat.f_frsize < 2 * RESERVE_BYTES + self.min_free_bytes:
                return
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, bytes(RESERVE_BYTES))
            finally:
                os.close(fd)
        except OSError:
            path.unlink(missing_ok=True)

    def _release_reserve(self) -> bool:
        try:
            (self.directory / RESERVE_NAME).unlink()
        except OSError:
            return False
        logger.warning(
            f"pipecat-roark: the disk of {self.directory} is full; released the "
            f"{RESERVE_BYTES >> 10} KiB reserve so calls' events and ends can still be written. "
            "Free space or run `pipecat-roark drain` and `pipecat-roark prune`"
        )
        return True

    def _reclaim_wal(self) -> bool:
        """Copy the -wal into the database and truncate it; True if that freed space.

        The -wal only shrinks at a checkpoint, and the automatic one waits for ~4 MB of
        frames, mostly older copies of the same few pages: on a full disk that is the
        room the end of a call needs.
        """
        wal = self.directory / f"{DB_NAME}-wal"
        try:
            before = wal.stat().st_size
            self._db().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            return wal.stat().st_size < before
        except (OSError, sqlite3.Error, _DatabaseDown):
            return False

    def _commit_one_by_one(self, batch: _Batch) -> bool:
        added = False
        work = batch.work
        while work:
            op = work[0]
            self._suspect = op
            added = self._commit_one(op) or added
            work.popleft()
            self._suspect = None
        return added

    def _commit_one(self, op: CallOp) -> bool:
        """Commit one op in its own transaction; retry transient errors; else drop it."""
        for delay in (*OP_RETRY_DELAYS_S, None):
            if op.call_id in self._skipped:
                self._discard(op)
                return False
            try:
                with transaction(self._db()):
                    added = self._apply_all((op,))
            except BaseException as exc:
                if _is_disk_full(exc) and isinstance(op, SpooledChunkOp):
                    self._drop(op, exc)
                    return False
                if self._database_refuses(exc):
                    raise _DatabaseDown(str(exc)) from exc
                if delay is not None and self._worth_retrying(op, exc):
                    self.stats.retried_ops += 1
                    time.sleep(delay)
                    continue
                self._drop(op, exc)
                return False
            self._settle((op,))
            return added
        return False  # pragma: no cover - the last delay is None

    def _worth_retrying(self, op: CallOp, exc: BaseException) -> bool:
        """Transient, and this call has not already lost an op of this kind to it: a
        persistent fault on one call must not stall every other call for each of its ops."""
        fault = (type(op), type(exc).__name__)
        return _is_transient(exc) and fault not in self._faults.get(op.call_id, ())

    def _database_refuses(self, exc: BaseException) -> bool:
        """Is the database itself unwritable (rather than this op bad)? A probe write says."""
        if not isinstance(exc, (sqlite3.Error, OSError)):
            return False
        text = str(exc).lower()
        if _is_disk_full(exc) or (
            isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)
        ):
            return True
        try:
            conn = self._db()
            with transaction(conn):
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                conn.execute(f"PRAGMA user_version = {version}")
        except (sqlite3.Error, _DatabaseDown):
            return True
        return False

    def _db(self) -> sqlite3.Connection:
        """The connection; after the file was lost, a fresh database (or _DatabaseDown)."""
        if self._conn is None:
            return self._open_fresh()
        return self._conn

    # ---- what happens to one op that cannot be recorded ----

    def _drop(self, op: CallOp, exc: BaseException) -> None:
        """Lose only this op's record (a chunk: the rest of its call's audio), and say so."""
        kind, call_id = type(op), op.call_id
        self.stats.dropped_ops += 1
        cause = f"{type(exc).__name__}: {exc}"
        seen = self._faults.setdefault(call_id, set())
        first = (kind, type(exc).__name__) not in seen
        seen.add((kind, type(exc).__name__))
        if isinstance(op, (ChunkOp, SpooledChunkOp)):
            if isinstance(op, SpooledChunkOp):
                spool.discard_chunk(self.directory, op.chunk.relpath)
            if _is_disk_full(exc):
                self._stop_audio(call_id, f"disk full committing audio ({exc})")
            else:
                self._stop_audio(call_id, f"chunk {op.idx} could not be recorded ({cause})")
            return
        if isinstance(op, OpenOp):
            if isinstance(exc, CallIdReused):
                self._skipped[call_id] = str(exc)
                logger.error(f"pipecat-roark: {exc}")
                return
            self._skipped[call_id] = cause
            logger.error(
                f"pipecat-roark: call {call_id!r} could not be opened in {self.directory} "
                f"({cause}); it is not recorded. Other calls are not affected"
            )
            return
        if isinstance(op, FinalizeOp):
            self._open_calls.pop(call_id, None)
            self._audio_stopped.discard(call_id)
            self._faults.pop(call_id, None)
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
        """An op of a call that is not recorded (see ``_skipped``): no line per op."""
        self.stats.dropped_ops += 1
        if isinstance(op, SpooledChunkOp):  # its folder too, once empty: nothing of it stays
            spool.discard_chunk(self.directory, op.chunk.relpath)
        elif isinstance(op, FinalizeOp):
            self._skipped.pop(op.call_id, None)
            self._faults.pop(op.call_id, None)

    def _screen(self, batch: _Batch) -> None:
        """Refuse a reused call id before any of its files are written; drop the ops of
        calls that are not recorded. In queue order: a refusal affects only later ops."""
        skipped = self._skipped
        if not skipped and not any(isinstance(op, OpenOp) for op in batch.work):
            return
        kept: deque[CallOp] = deque()
        for op in batch.work:
            call_id = op.call_id
            if (
                isinstance(op, OpenOp)
                and call_id not in skipped
                and self._already_recorded(call_id)
            ):
                self._drop(op, _reused(call_id, self.directory))
            elif call_id in skipped:
                self._discard(op)
            else:
                kept.append(op)
        batch.work = kept

    def _already_recorded(self, call_id: str) -> bool:
        if call_id in self._open_calls:
            return True
        try:
            row = self._db().execute("SELECT 1 FROM calls WHERE id = ?", (call_id,)).fetchone()
        except Exception:  # the op's own transaction meets the problem and reports it
            return False
        return row is not None

    # ---- chunk files ----

    def _spool_chunks(self, batch: _Batch) -> None:
        """Write the batch's chunk files durably; a ChunkOp becomes a SpooledChunkOp (or goes)."""
        if not any(isinstance(op, ChunkOp) for op in batch.work):
            return
        out: deque[CallOp] = deque()
        for op in batch.work:
            if not isinstance(op, ChunkOp):
                out.append(op)
                continue
            chunk = self._write_chunk(op)
            if chunk is not None:
                out.append(
                    SpooledChunkOp(
                        op.call_id, op.idx, chunk, op.sample_rate, op.num_channels, op.at
                    )
                )
        batch.work = out

    def _write_chunk(self, op: ChunkOp) -> spool.SpooledChunk | None:
        call_id, index, data = op.call_id, op.idx, op.data
        if call_id in self._audio_stopped or call_id in self._skipped:
            self.stats.chunks_skipped += 1
            return None
        reason = self._spool_full(len(data))
        if reason is not None:
            self._stop_audio(call_id, reason)
            return None
        for delay in (*OP_RETRY_DELAYS_S, None):
            try:
                faultpoints.reached("writer:chunk-file", call_id)
                chunk = spool.write_chunk(self.directory, call_id, index, data)
            except BaseException as exc:
                if delay is not None and _is_transient(exc):
                    self.stats.retried_ops += 1
                    time.sleep(delay)
                    continue
                if _is_disk_full(exc):
                    self._stop_audio(call_id, f"disk full writing audio ({exc})")
                else:
                    self._drop(op, exc)
                return None
            self._spool_bytes += chunk.size  # counted now: a batch can hold many chunks
            return chunk
        return None  # pragma: no cover - the last delay is None

    def _spool_full(self, size: int) -> str | None:
        if self._spool_bytes + size > self.max_spool_bytes:
            return f"the chunk spool is over its cap of {self.max_spool_bytes} bytes"
        try:
            stat = os.statvfs(self.directory)
        except OSError:
            return None
        free = stat.f_bavail * stat.f_frsize
        floor = max(self.min_free_bytes, DATABASE_RESERVE_BYTES)
        if free - size < floor:
            return f"free disk space is below {floor} bytes ({free} left)"
        return None

    def _stop_audio(self, call_id: str, reason: str) -> None:
        # Later chunks would leave a gap Roark cannot stitch: the call's audio ends here.
        self.stats.chunks_skipped += 1
        if call_id in self._audio_stopped:
            return
        self._audio_stopped.add(call_id)
        logger.error(
            f"pipecat-roark: {reason} in {self.directory}; no more audio is recorded for call "
            f"{call_id!r} (events still are). Free space or run `pipecat-roark drain` and "
            "`pipecat-roark prune`"
        )

    def _shed_audio(self, batch: _Batch, error: str) -> None:
        """Drop the newer half of the batch's chunks (their files too) to make room.

        Chunks are taken from the end of the batch, so each call keeps a gapless prefix
        of its recording; the caller retries, and every round removes at least one chunk.
        """
        work = list(batch.work)
        positions = [i for i, op in enumerate(work) if isinstance(op, SpooledChunkOp)]
        shed = set(positions[len(positions) // 2 :])
        kept: deque[CallOp] = deque()
        for i, op in enumerate(work):
            if i not in shed or not isinstance(op, SpooledChunkOp):
                kept.append(op)
                continue
            (self.directory / op.chunk.relpath).unlink(missing_ok=True)
            self._stop_audio(op.call_id, f"disk full committing audio ({error})")
        batch.work = kept

    # ---- applying ops (inside the caller's transaction) ----

    def _settle(self, work: Iterable[CallOp]) -> None:
        """After a commit: what this process remembers about its open calls."""
        stats = self.stats
        count = 0
        for op in work:
            count += 1
            if isinstance(op, OpenOp):
                if op.call_id not in self._open_calls:
                    self._open_calls[op.call_id] = _OpenCall(op.opened, op.key_fp)
            elif isinstance(op, SpooledChunkOp):
                call = self._open_calls.get(op.call_id)
                if call is not None:
                    call.chunks.append(op)
            elif isinstance(op, FinalizeOp):
                call_id = op.call_id
                ended = self._ended.pop(call_id, None)
                if ended is not None:  # counted once committed, not when first tried
                    metrics.finalized(ended)
                self._open_calls.pop(call_id, None)
                # Only after the commit: a retried batch must still know which calls lost audio.
                self._audio_stopped.discard(call_id)
                self._skipped.pop(call_id, None)
                self._faults.pop(call_id, None)
        stats.batches += 1
        stats.ops += count
        stats.max_batch = max(stats.max_batch, count)

    def _apply_all(self, work: Iterable[CallOp]) -> bool:
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

    def _insert_events(self, events: list[tuple[str, bytes]]) -> None:
        self._db().executemany("INSERT INTO events (call_id, body) VALUES (?, ?)", events)
        self.stats.events += len(events)

    def _open(self, call_id: str, opened: CallOpened, key_fp: str | None, now: int) -> bool:
        faultpoints.reached("writer:open", call_id)
        owner = self.owner
        cursor = self._db().execute(
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
        if cursor.rowcount == 0:  # another process took the id since _screen looked
            raise _reused(call_id, self.directory)
        self._insert_events([(call_id, encode_event(opened))])
        self._db().execute(
            "INSERT OR IGNORE INTO deliveries (call_id, kind, idempotency_key, next_attempt_at,"
            " created_at) VALUES (?, 'call-started', ?, ?, ?)",
            (call_id, f"{call_id}:call-started", now, now),
        )
        return True

    def _chunk(self, op: SpooledChunkOp, *, now: int) -> bool:
        call_id, index, chunk, sample_rate, num_channels, at = op
        conn = self._db()
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

    def _finalize(self, call_id: str, at: int, reason: str, now: int) -> bool:
        faultpoints.reached("writer:finalize", call_id)
        ended = finalize_call(self._db(), call_id, at, reason, add_event=False, now=now)
        if ended:
            self._ended[call_id] = reason
        return ended

    # ---- the database file under us ----

    def _check_file(self) -> None:
        """Notice a deleted or replaced ``wal.sqlite`` (one stat per batch) and start afresh.

        The old connection is closed first, and a deleted file's leftover -wal/-shm are
        moved aside (kept for salvage): a fresh database must never pick up another
        file's write-ahead log.
        """
        identity = _file_identity(self.directory)
        if identity == self._identity or self._conn is None:
            return
        self._conn.close()
        self._conn = None
        self._lost = "deleted" if identity is None else "replaced by another file"
        if identity is None:
            try:
                moved = quarantine(self.directory)
                self._lost += f" (its leftover -wal/-shm were moved aside as {moved}-wal/-shm)"
            except OSError as exc:
                self._lost += f" (its leftover -wal/-shm could not be moved aside: {exc})"
        with suppress(_DatabaseDown):  # else the commit path waits for the disk
            self._db()

    def _open_fresh(self) -> sqlite3.Connection:
        try:
            conn = _connect_or_quarantine(self.directory)
        except PipecatRoarkError as exc:
            raise _DatabaseDown(str(exc)) from exc
        self._conn = conn
        self._identity = _file_identity(self.directory)
        self.stats.reopened += 1
        recorded = self._record_open_calls_again()
        logger.error(
            f"pipecat-roark: {self.directory / DB_NAME} was {self._lost} while this process "
            "was recording into it: whatever was committed to the old file is gone with it. "
            f"Started a fresh database; {len(recorded)} call(s) still open here are recorded "
            "in it again from now on (their earlier events are lost, their audio is kept): "
            f"{sorted(recorded)!r}"
        )
        return conn

    def _record_open_calls_again(self) -> list[str]:
        done = []
        now = now_us()
        for call_id, call in list(self._open_calls.items()):
            try:
                with transaction(self._db()):
                    self._open(call_id, call.opened, call.key_fp, now)
                    for chunk_op in call.chunks:
                        if (self.directory / chunk_op.chunk.relpath).exists():
                            self._chunk(chunk_op, now=now)
            except Exception as exc:
                self._open_calls.pop(call_id, None)
                self._skipped[call_id] = str(exc)
                logger.error(
                    f"pipecat-roark: call {call_id!r} could not be recorded again "
                    f"({type(exc).__name__}: {exc}); it is not recorded"
                )
                continue
            done.append(call_id)
        return done

    def _heartbeat(self) -> None:
        try:
            self._check_file()
            if self._open_calls:
                now = now_us()
                with transaction(self._db()):
                    self._db().executemany(
                        "UPDATE calls SET heartbeat_at = ? WHERE id = ? AND state = 'open'",
                        [(now, call_id) for call_id in self._open_calls],
                    )
            self._spool_bytes = self._measure_spool()
            self._keep_reserve()
        except Exception as exc:
            logger.warning(f"pipecat-roark: heartbeat to {self.directory} failed: {exc}")

    def _measure_spool(self) -> int:
        """Undelivered audio only: delivered chunks wait for retention, not against the cap."""
        return undelivered_audio_bytes(self._db())


def _reused(call_id: str, directory: Path) -> CallIdReused:
    return CallIdReused(
        f"call id {call_id!r} is already recorded in {directory}; this second session is "
        "not recorded and the earlier call is kept as it was. Give each call its own "
        "pipecat_call_id"
    )


def _file_identity(directory: Path) -> tuple[int, int] | None:
    try:
        stat = (directory / DB_NAME).stat()
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino)


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


def _is_disk_full(exc: BaseException | None) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in _DISK_FULL
    return isinstance(exc, sqlite3.Error) and "full" in str(exc).lower()


def _is_transient(exc: BaseException) -> bool:
    """Worth a short retry: a brief OS shortage or hiccup, or SQLite's own I/O trouble."""
    if isinstance(exc, OSError):
        return exc.errno in _TRANSIENT_ERRNOS
    return isinstance(exc, sqlite3.OperationalError)


_OP_NAMES: dict[type[CallOp], str] = {
    OpenOp: "call-open",
    EventOp: "event",
    ChunkOp: "chunk",
    SpooledChunkOp: "chunk",
    FinalizeOp: "call-end",
}


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


_WATCH_S = 0.5
"""How often a waiting flush checks that the writer thread is still alive."""

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


def running_writer(directory: Path) -> Writer | None:
    """This process's live writer for ``directory``, if one runs (never starts one)."""
    writer = _WRITERS.get(directory.expanduser().resolve())
    return writer if writer is not None and writer.alive else None


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
