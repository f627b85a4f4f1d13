"""The durable writer in a child process: recording without the bot's GIL.

``RoarkObserver(writer_process=True)``: the process's writer for a data directory is a
``ProcessWriter``. It has the ``Writer``'s surface (``submit``, ``flush``, ``close``,
commit listeners), but the SQLite transactions, the chunk files and every ``fsync``
happen in ``python -m pipecat_roark.writer_child``. In the bot, one sender thread pickles
what was queued since its last frame and writes it to the child's stdin (one C call and
one system call per frame, both mostly outside the GIL); one reader thread takes the
child's answers: what is committed, which flushes are released, when deliveries were
added.

Nothing acknowledged is lost, and nothing unacknowledged is either:

- Every frame is kept in the bot until the child says it is committed.
- If the child cannot start, exits or is killed while the bot lives, the bot opens a
  ``Writer`` of its own (one line logged). It adopts the calls still open and gives it the
  frames not yet acknowledged. Whatever the child had committed of them is left out,
  looked up in the database (a call's open, equal events as many times as stored, chunk rows;
  ending a call twice is a no-op).
- If the bot dies (even of SIGKILL), the child reads what is left in the pipe, commits it
  and exits: it keeps more of a killed bot's records than the thread would.

The child records under the bot's owner identity, so orphan checks judge the bot.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import subprocess
import sys
import threading
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loguru import logger

from . import calls_table, chunks_table, events_table
from .events import CallOpened, Event
from .ops import BarrierOp, ChunkOp, EventOp, FinalizeOp, Op, OpenOp, StopOp
from .owner import Owner, current_owner, heartbeat_interval_s
from .store import connect
from .writer import Writer
from .writer_child import ENV_OWNER, owner_to_env
from .writer_flush import FlushWaits
from .writer_pipe import (
    COMMITTED,
    DELIVERIES,
    MESSAGE,
    RELEASED,
    RemoteBarrier,
    encode_frame,
    read_exactly,
    write_all,
)

__all__ = ["AnyWriter", "ProcessWriter", "writer_child_command"]

_EXIT_WAIT_S = 2.0
"""How long the sender waits for a child whose stdin refused a frame to exit (to say why)."""
_CHILD_GONE = object()
"""Put on the queue by the reader thread when the child's stdout ends unasked."""


def writer_child_command(directory: Path, max_spool_bytes: int, min_free_bytes: int) -> list[str]:
    """The child's argv, with this interpreter.

    Returns:
        ``python -m pipecat_roark.writer_child --dir DIR ...``.
    """
    return [
        sys.executable,
        "-m",
        "pipecat_roark.writer_child",
        "--dir",
        str(directory),
        "--max-spool-bytes",
        str(max_spool_bytes),
        "--min-free-bytes",
        str(min_free_bytes),
    ]


class ProcessWriter(FlushWaits):
    """This process's writer for one database, committing in a child process."""

    def __init__(
        self,
        directory: Path,
        *,
        max_spool_bytes: int,
        min_free_bytes: int,
        owner: Owner | None = None,
    ) -> None:
        """Check the database here (a refusal must reach the call), then start the sender.

        Raises:
            StoreError: the database cannot be opened (a subclass says why).
        """
        connect(directory).close()
        self.directory = directory
        self.max_spool_bytes = max_spool_bytes
        self.min_free_bytes = min_free_bytes
        self.owner = owner or current_owner(heartbeat_interval_s())
        self.child_pid: int | None = None
        self.fell_back: str | None = None
        """Why this process records itself now (the child failed), or None."""
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._listeners: list[Callable[[], None]] = []
        self._barriers: dict[int, Callable[[], None]] = {}
        self._numbers = itertools.count(1)
        self._seq = 0
        self._unacked: deque[tuple[int, list[Any]]] = deque()
        self._open: dict[str, OpenOp] = {}
        """Calls whose open was sent and whose end is not acknowledged: adopted on fallback."""
        self._local: Writer | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._stdin: int | None = None
        self._reader: threading.Thread | None = None
        self._finishing = False
        self._unrecorded = False
        """Neither the child nor this process can write the database: records are lost."""
        self._closing = False
        self._thread = threading.Thread(
            target=self._run, name=f"pipecat-roark-writer-sender:{directory}", daemon=True
        )
        self._thread.start()

    # ---- the Writer's surface ----

    def submit(self, op: Op) -> None:
        """Queue ``op`` for the child (any thread, never blocks)."""
        self._queue.put(op)

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        """Called (from a thread of ours) after a commit that added deliveries."""
        self._listeners.append(listener)

    def remove_commit_listener(self, listener: Callable[[], None]) -> None:
        """Stop calling ``listener`` (one not added is ignored)."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def close(self, timeout: float = 5.0) -> bool:
        """Send what is queued, let the child commit it and exit (or close our own writer).

        Returns:
            True if everything was committed and stopped within ``timeout``.
        """
        self._closing = True
        if self._thread.is_alive():
            self._queue.put(StopOp())
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        """False once closed."""
        return not self._closing

    @property
    def queue_depth(self) -> int:
        """Records submitted and not yet sent to the child (approximate, for metrics)."""
        return self._queue.qsize()

    # ---- the sender thread ----

    def _run(self) -> None:
        try:
            self._start_child()
        except Exception as exc:
            self._fall_back(f"the writer process did not start ({exc})")
        while True:
            first = self._queue.get()
            taken = [first]
            with contextlib.suppress(queue.Empty):
                while True:
                    taken.append(self._queue.get_nowait())
            if any(item is _CHILD_GONE for item in taken):
                taken = [item for item in taken if item is not _CHILD_GONE]
                if self._local is None:
                    self._fall_back(self._child_exit())
            stop = any(isinstance(item, StopOp) for item in taken)
            ops = [item for item in taken if not isinstance(item, StopOp)]
            if self._local is not None:
                for op in ops:
                    self._local.submit(op)
            elif ops and not self._unrecorded:
                self._send(ops)  # if that fails, _fall_back replays them with the rest
            if stop:
                self._finish()
                return

    def _start_child(self) -> None:
        env = dict(os.environ)  # the child serves no metrics: the bot's port stays the bot's
        env[ENV_OWNER] = owner_to_env(self.owner)
        child = subprocess.Popen(
            writer_child_command(self.directory, self.max_spool_bytes, self.min_free_bytes),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        assert child.stdin is not None and child.stdout is not None
        self._child, self.child_pid = child, child.pid
        self._stdin = child.stdin.fileno()
        self._reader = threading.Thread(
            target=self._read,
            args=(child.stdout.fileno(),),
            name=f"pipecat-roark-writer-reader:{self.directory}",
            daemon=True,
        )
        self._reader.start()
        logger.debug(f"pipecat-roark: recording {self.directory} from process {child.pid}")

    def _send(self, ops: list[Any]) -> None:
        wire = [self._outbound(op) for op in ops]
        self._seq += 1
        self._unacked.append((self._seq, wire))
        assert self._stdin is not None
        try:
            write_all(self._stdin, encode_frame(self._seq, wire))
        except Exception as exc:  # EPIPE: the child is gone; this frame is in _unacked
            self._fall_back(self._unwritable(exc))

    def _outbound(self, op: Op) -> Any:
        if isinstance(op, BarrierOp):
            number = next(self._numbers)
            self._barriers[number] = op.release
            return RemoteBarrier(number, op.call_id)
        if isinstance(op, OpenOp):
            self._open[op.call_id] = op
        return op

    def _finish(self) -> None:
        """Close: EOF tells the child to commit the rest and exit; wait for its last word.

        A child that exits with frames unacknowledged died before committing them (killed
        while the bot shuts down): this process records them itself, then closes.
        """
        self._finishing = True
        if self._local is None:
            if self._child is not None and self._child.stdin is not None:
                with contextlib.suppress(OSError):
                    self._child.stdin.close()
            if self._reader is not None:
                self._reader.join()
            if self._child is not None:
                self._child.wait()
            self._close_pipes()
            if self._unacked:
                self._fall_back(self._child_exit())
        if self._local is not None:
            self._local.close()

    def _close_pipes(self) -> None:
        """Our ends of the child's pipes, once the reader is done with its stdout."""
        child = self._child
        if child is None:
            return
        for pipe in (child.stdin, child.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    # ---- the reader thread ----

    def _read(self, fd: int) -> None:
        while True:
            message = read_exactly(fd, MESSAGE.size)
            if message is None:
                break
            kind, number = MESSAGE.unpack(message)
            if kind == COMMITTED:
                self._acknowledged(number)
            elif kind == RELEASED:
                self._call(self._barriers.pop(number, None))
            elif kind == DELIVERIES:
                for listener in list(self._listeners):
                    self._call(listener)
        if not self._finishing:
            self._queue.put(_CHILD_GONE)

    def _acknowledged(self, seq: int) -> None:
        unacked = self._unacked
        while unacked and unacked[0][0] <= seq:
            for op in unacked.popleft()[1]:
                if isinstance(op, FinalizeOp):
                    self._open.pop(op.call_id, None)

    @staticmethod
    def _call(callback: Callable[[], None] | None) -> None:
        if callback is None:
            return
        try:
            callback()
        except Exception as exc:
            logger.warning(f"pipecat-roark: a writer callback failed: {exc}")

    # ---- falling back to a writer of this process ----

    def _child_exit(self) -> str:
        code = None if self._child is None else self._child.wait()
        return f"the writer process {self.child_pid} exited with status {code}"

    def _unwritable(self, exc: Exception) -> str:
        """Why a frame could not be written: the child's exit status, once it has one.

        Returns:
            The exit, or the write's error if the child is still there after a moment.
        """
        with contextlib.suppress(subprocess.TimeoutExpired):
            if self._child is not None:
                self._child.wait(_EXIT_WAIT_S)  # it closed its stdin: it is exiting
                return self._child_exit()
        return f"the writer process cannot be written to ({exc})"

    def _fall_back(self, why: str) -> None:
        """Record in this process from now on, starting with what the child did not commit."""
        self.fell_back = why
        logger.error(f"pipecat-roark: {why}; recording {self.directory} from this process instead")
        child = self._child
        if child is not None:
            with contextlib.suppress(OSError):
                child.kill()  # alive but unwritable: it must not commit behind our back
            child.wait()
        if self._reader is not None:
            self._reader.join()
        self._close_pipes()
        frames = list(self._unacked)
        self._unacked.clear()
        try:
            replay, adopt = _recovered(
                self.directory, self.owner.token, frames, self._open, self._barriers
            )
            local = Writer(
                self.directory,
                max_spool_bytes=self.max_spool_bytes,
                min_free_bytes=self.min_free_bytes,
                owner=self.owner,
                adopt=adopt,
            )
        except Exception as exc:
            logger.error(
                f"pipecat-roark: {self.directory} cannot be recorded from this process either "
                f"({exc}); this process's calls from now on are not recorded"
            )
            local = None
            replay = []
        if local is None:
            self._unrecorded = True
            return
        local.add_commit_listener(self._notify)
        for op in replay:
            local.submit(op)
        self._local = local

    def _notify(self) -> None:
        for listener in list(self._listeners):
            self._call(listener)


Adopted = dict[str, tuple[CallOpened, str | None]]
"""The open calls a fallback writer takes over: each call's opening event and key fingerprint."""


def _recovered(
    directory: Path,
    owner_token: str,
    frames: list[tuple[int, list[Any]]],
    opened: dict[str, OpenOp],
    barriers: dict[int, Callable[[], None]],
) -> tuple[list[Op], Adopted]:
    """What a dead child did not commit of the unacknowledged ``frames``, and the calls to adopt.

    Returns:
        The ops to give the bot's own writer, in order, and the open calls it takes over.
    """
    conn = connect(directory)
    try:
        adopt = {
            call_id: (op.opened, op.key_fp)
            for call_id, op in opened.items()
            if calls_table.open_and_owned_by(conn, call_id, owner_token)
        }
        committed: dict[str, Counter[Event]] = {}
        replay: list[Op] = []
        for _, wire in frames:
            for op in wire:
                kept = _unless_committed(conn, op, adopt, committed, barriers)
                if kept is not None:
                    replay.append(kept)
        return replay, adopt
    finally:
        conn.close()


def _unless_committed(
    conn: Any,
    op: Any,
    adopt: Adopted,
    committed: dict[str, Counter[Event]],
    barriers: dict[int, Callable[[], None]],
) -> Op | None:
    if isinstance(op, RemoteBarrier):
        release = barriers.pop(op.number, None)
        return None if release is None else BarrierOp(release, op.call_id)
    if isinstance(op, OpenOp):
        return None if op.call_id in adopt else op
    if isinstance(op, EventOp):
        # Compared as events, not as stored bytes: an event that crossed the pipe can
        # encode a default value explicitly (msgspec omits a default by identity, and
        # unpickling makes new strings), so the child's bytes differ from ours. Counted:
        # two equal events both committed are both left out, not one.
        stored = committed.get(op.call_id)
        if stored is None:
            stored = committed[op.call_id] = Counter(events_table.load_events(conn, op.call_id))
        if stored[op.event] > 0:
            stored[op.event] -= 1
            return None
        return op
    if isinstance(op, ChunkOp):
        return None if chunks_table.chunk_file(conn, op.call_id, op.idx) else op
    result: Op = op
    return result


AnyWriter = Writer | ProcessWriter
"""What ``lifecycle.writer_for`` hands a call: the writer thread, or the writer child."""
