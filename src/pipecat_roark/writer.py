"""The group-commit writer: one thread per database file per process.

Observers never touch SQLite. They put small typed ops (``ops.py``) on a queue (a
C-level append, safe from any thread) and return; this thread takes everything queued,
commits it in one transaction, and goes back for more. Batches grow only under load, so
a quiet call commits within a millisecond and a busy process still commits ~every few
ms; a kill -9 loses only what was queued since the last commit.

This module is the thread, its queue and its supervisor (submit, flush, close, restart);
the process's registry of writers (``writer_for``) is ``lifecycle``'s. What a batch
becomes lives beside it: chunk files in ``chunk_spooler`` (written on spool threads while
the writer goes on), what waits for them in ``parked_ops``, the bulkheads of a commit in
``batch_commit``, the rows of each op in ``op_apply``, the database file itself in
``wal_file``. If the thread dies anyway, the next ``submit`` starts it again with the
queue intact (and what was parked).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path

from loguru import logger

from . import calls_table, crashpoints, metrics
from .batch_commit import Batch, BatchCommitter
from .chunk_spooler import ChunkSpooler, PendingChunk, discard_unrecorded
from .config import DEFAULT_MIN_FREE_BYTES
from .events import CallOpened
from .op_apply import OpApplier
from .ops import CallOp, ChunkWrittenOp, Op, SpooledChunkOp, StopOp
from .owner import Owner, current_owner, heartbeat_interval_s
from .parked_ops import ParkedOps
from .store import now_us, transaction
from .wal_file import WalFile
from .writer_flush import WriterSurface
from .writer_state import CallBook, OpenCall, WriterStats

__all__ = ["DEFAULT_MAX_SPOOL_BYTES", "Writer", "WriterStats"]

DEFAULT_MAX_SPOOL_BYTES = 1 << 30  # 1 GiB


class Writer(WriterSurface):
    """Owns the one write connection of a process to a ``wal.sqlite``, through its thread."""

    def __init__(
        self,
        directory: Path,
        *,
        max_spool_bytes: int = DEFAULT_MAX_SPOOL_BYTES,
        min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
        owner: Owner | None = None,
        adopt: Mapping[str, tuple[CallOpened, str | None]] | None = None,
    ) -> None:
        """Open the database and start the thread.

        ``adopt``: calls another writer of this process's calls opened (a writer child
        that died): this one keeps them alive and records them again in a fresh database,
        as if it had opened them.
        """
        self.directory = directory
        # Often enough that a sidecar's grace can be short (PIPECAT_ROARK_HEARTBEAT_S).
        self.heartbeat_s = heartbeat_interval_s()
        self.owner = owner or current_owner(self.heartbeat_s)
        self.max_spool_bytes = max_spool_bytes
        self.min_free_bytes = min_free_bytes
        self.stats = WriterStats()
        self._wal = WalFile(directory, min_free_bytes=min_free_bytes, stats=self.stats)
        self._queue: queue.SimpleQueue[Op] = queue.SimpleQueue()
        self._listeners: list[Callable[[], None]] = []
        self._book = CallBook()
        for call_id, (opened, key_fp) in (adopt or {}).items():
            self._book.open_calls[call_id] = OpenCall(opened, key_fp)
        applier = OpApplier(directory, self._wal, self.owner, self._book, self.stats)
        self._wal.on_reopen = applier.record_open_calls_again
        self._spooler = ChunkSpooler(
            directory,
            max_spool_bytes=max_spool_bytes,
            min_free_bytes=min_free_bytes,
            book=self._book,
            stats=self.stats,
        )
        self._committer = BatchCommitter(
            directory,
            wal=self._wal,
            applier=applier,
            book=self._book,
            stats=self.stats,
            spooler=self._spooler,
        )
        self._spooler.measure(self._wal.db())
        self._wal.keep_reserve()
        self._parked = ParkedOps()
        self._committer.free_room = self._free_room
        self._inflight: Batch | None = None
        self._death: str | None = None
        self._closing = False
        self._restart_lock = threading.Lock()
        self._thread = self._start_thread()

    # ---- producer side (any thread, never blocks) ----

    def submit(self, op: Op) -> None:
        """Queue ``op`` for the next commit (any thread, never blocks); restart a dead thread."""
        self._queue.put(op)
        if self._death is not None:
            self._restart()

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
        self._spooler.close()
        self._wal.close()

    # ---- writer thread ----

    def _loop(self) -> None:
        next_heartbeat = time.monotonic() + self.heartbeat_s
        while True:
            batch = self._inflight
            if batch is not None:  # the thread died on this batch: finish it one op at a time
                batch.careful = True
                if batch.suspect is not None and batch.work and batch.work[0] is batch.suspect:
                    op = batch.work.popleft()
                    self._committer.drop(op, RuntimeError("the writer thread died applying it"))
                batch.suspect = None
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

    def _take(self, first: Op) -> Batch:
        taken: deque[Op] = deque((first,))
        while True:
            try:
                taken.append(self._queue.get_nowait())
            except queue.Empty:
                break
        stop = any(isinstance(op, StopOp) for op in taken)
        return Batch(work=deque(), barriers=[], stop=stop, taken=taken)

    def _chunk_written(self) -> None:
        self._queue.put(_WRITTEN)

    def _finish(self, pending: PendingChunk, after_loss: bool) -> SpooledChunkOp | None:
        try:
            return self._spooler.finish(pending, self._committer.drop, after_loss=after_loss)
        except Exception as exc:  # one chunk (e.g. a file that cannot be discarded), never
            self._committer.drop(pending.op, exc)  # the thread: it would die on it again
            return None

    def _free_room(self, work: deque[CallOp]) -> bool:
        """A full disk refused the batch's chunk rows: give up the newer chunk files first.

        Files of later chunks of the same calls, written on spool threads while the batch
        waited, may be what filled the disk; without this, under load, the batch's older
        chunk was shed and they were then discarded behind it: a call kept no audio at all.
        A file still being written is waited for (its spool thread holds its room until
        then; ignored, it took the room the shed chunk had freed). Each file is given up
        once: asked again, with nothing newer left, this says so and the batch is shed.

        Returns:
            True if files were given up (the commit is tried again as it was).
        """
        last: dict[str, int] = {}
        for op in work:
            if isinstance(op, SpooledChunkOp):
                last[op.call_id] = max(op.idx, last.get(op.call_id, op.idx))
        freed = False
        for call_id, idx in last.items():
            newer = [
                pending
                for pending in self._parked.chunks_after(call_id, idx)
                if not self._spooler.after_cut(call_id, pending.op.idx)
            ]
            if not newer:
                continue
            self._spooler.cut(call_id, idx)  # none after the batch's last is recorded
            for pending in newer:
                chunk = pending.written.result()[0]  # waits for a file still being written
                if chunk is not None:
                    discard_unrecorded(self.directory, chunk.relpath)
            self._spooler.stop_audio(call_id, "disk full committing audio")
            freed = True
        return freed

    def _process(self, batch: Batch) -> None:
        self._wal.check_file()
        self._parked.sort(batch, self._committer, self._spooler, self._chunk_written)
        if batch.stop:
            self._parked.wait_for_files()
        ready = self._parked.take_ready(self._finish)
        batch.work.extend(ready.work)
        batch.barriers.extend(ready.releases)
        added_deliveries = False
        if batch.work:
            started = time.perf_counter()
            for op in batch.work:  # counted per chunk: the n-th chunk, whatever the batching
                if isinstance(op, SpooledChunkOp):
                    crashpoints.reached("chunk-file-durable")
            crashpoints.reached("before-commit")
            added_deliveries = self._committer.commit(batch)
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

    def _heartbeat(self) -> None:
        try:
            self._wal.check_file()
            if self._book.open_calls:
                with transaction(self._wal.db()):
                    calls_table.touch_open_calls(self._wal.db(), self._book.open_calls, now_us())
            self._spooler.measure(self._wal.db())
            self._wal.keep_reserve()
        except Exception as exc:
            logger.warning(f"pipecat-roark: heartbeat to {self.directory} failed: {exc}")


_WRITTEN = ChunkWrittenOp()
