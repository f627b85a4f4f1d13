"""The durable writer in a child process: recording without the bot's GIL.

``RoarkObserver(writer_process=True)``: the process's writer for a data directory is a
``ProcessWriter``. It has the ``Writer``'s surface (``submit``, ``flush``, ``close``,
commit listeners), but the SQLite transactions, the chunk files and every ``fsync``
happen in ``python -m pipecat_roark.writer_child``. In the bot, the event loop that
submits records frames and writes them to the child's stdin itself (``frame_feed``: no
thread wakes for them); a sender thread does it only where no loop runs or the pipe is
full. The same loop reads the child's answers (``answer_reader``; a thread only where no
loop runs): what is committed, which flushes are released, when deliveries were added,
log lines.

Nothing acknowledged is lost, and nothing unacknowledged is either:

- Every frame is kept in the bot until the child says it is committed.
- If the child cannot start, exits or is killed while the bot lives, the bot opens a
  ``Writer`` of its own (one line logged). It adopts the calls still open and gives it the
  frames not yet acknowledged, less whatever the child had committed of them
  (``writer_recovery``). If that writer cannot open the database either, the records
  wait in memory and it is tried again each second.
- If the bot dies (even of SIGKILL), the child reads what is left in the pipe, commits it
  and exits: it keeps more of a killed bot's records than the thread would.
- The bot never waits on the child without a limit (``child_watch``): it sees the child's
  exit even when the end of its answers never comes (a fork of the bot holds a copy of
  the pipe), and a child that owes answers (frames, or its exit at close) and says
  nothing for ``STALL_S`` (SIGSTOP, a deadlock) is killed and replaced as above.

The child records under the bot's owner identity, so orphan checks judge the bot; it
holds that identity's lock (``owner_lock``) while it lives, so no drainer ends the calls
of a dead bot whose child still commits them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import queue
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from loguru import logger

from . import child_watch, owner_lock
from .answer_reader import AnswerReader
from .child_watch import START_S
from .config import child_environment
from .frame_feed import FrameFeed
from .ops import BarrierOp, Op, OpenOp, StopOp
from .owner import Owner, current_owner, heartbeat_interval_s
from .wal_file import connect_or_quarantine
from .writer import Writer
from .writer_child import CLOSE_TIMEOUT_S, ENV_OWNER, owner_to_env
from .writer_flush import WriterSurface
from .writer_pipe import (
    COMMITTED,
    DELIVERIES,
    LOG,
    RELEASED,
    RemoteBarrier,
    log_child_line,
)
from .writer_recovery import acknowledge, barrier_numbers, recover

__all__ = ["AnyWriter", "ProcessWriter", "writer_child_command"]

_WAKE = object()
"""Put on the queue to wake the sender: records wait in the feed."""
_CHILD_GONE = object()
"""Put on the queue by the answers' reader when they end unasked."""
_CHILD_STUCK = object()
"""Put on the queue by a waiting flush: the child owes answers and says nothing."""


def writer_child_command(
    directory: Path,
    max_spool_bytes: int,
    min_free_bytes: int,
    answers_fd: int,
    owner_lock_fd: int | None = None,
) -> list[str]:
    """The child's argv, with this interpreter.

    Returns:
        ``python -m pipecat_roark.writer_child --dir DIR ...``.
    """
    lock = [] if owner_lock_fd is None else ["--owner-lock-fd", str(owner_lock_fd)]
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
        "--answers-fd",
        str(answers_fd),
        *lock,
    ]


def _spawn(
    directory: Path,
    max_spool_bytes: int,
    min_free_bytes: int,
    owner: Owner,
    reader: Callable[..., AnswerReader],
    hidden: child_watch.HiddenFromForks,
) -> tuple[subprocess.Popen[bytes], AnswerReader]:
    """Start the writer child, with its answers on a pipe of their own, and their reader.

    What the child's interpreter prints (a site hook, an import-time notice) goes to the
    bot's stdout, never into the answers. The pipes' ends this process keeps are in
    ``hidden`` (the caller lets go once it holds them): a fork's copy of the answers'
    write end would hold their end back, and of the child's stdin its end of input.
    The child gets the owner's lock (``owner_lock``) taken here, before it can be sent
    a record: a drainer leaves the bot's calls open while it lives, even once the bot is
    dead (a fork's copy of the lock would hold it too, so it is hidden the same way).

    Returns:
        The child, and ``reader(answers' read end, exited=whether the child exited)``.

    Raises:
        RuntimeError: a frozen application (``sys.executable`` is the application itself).
        OSError: the child could not be started.
    """
    if getattr(sys, "frozen", False):
        raise RuntimeError("a frozen application has no Python to run the writer child with")
    # It only writes the database: no key of the bot's, Roark's or another service's.
    env = child_environment()
    env[ENV_OWNER] = owner_to_env(owner)
    lock_fd = owner_lock.take(directory, owner.token)
    if lock_fd is not None:
        hidden.add(lock_fd)
    answers, answers_for_child = os.pipe()
    hidden.add(answers)
    hidden.add(answers_for_child)
    child: subprocess.Popen[bytes] | None = None
    started: AnswerReader | None = None
    try:
        child = subprocess.Popen(
            writer_child_command(
                directory, max_spool_bytes, min_free_bytes, answers_for_child, lock_fd
            ),
            stdin=subprocess.PIPE,
            env=env,
            start_new_session=True,
            pass_fds=(answers_for_child,) if lock_fd is None else (answers_for_child, lock_fd),
        )
        assert child.stdin is not None
        hidden.add(child.stdin.fileno())
        started = reader(answers, exited=lambda: child.poll() is not None)
        return child, started
    finally:
        hidden.release(answers_for_child)
        os.close(answers_for_child)
        if lock_fd is not None:
            hidden.release(lock_fd)
            if child is None:  # no child holds it: let go of it, and of its file
                owner_lock.release(directory, owner.token, lock_fd)
            else:  # the child's copy holds it now, for as long as the child lives
                os.close(lock_fd)
        if started is None:
            hidden.release(answers)
            os.close(answers)


class ProcessWriter(WriterSurface):
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
        connect_or_quarantine(directory).close()  # as the writer thread would
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
        self._acked_events: dict[str, int] = {}
        """Per open call, how many of its events the child said it committed."""
        self._open: dict[str, OpenOp] = {}
        """Calls whose open was sent and whose end is not acknowledged: adopted on fallback."""
        self._local: Writer | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._stdin: int | None = None
        self._reader: AnswerReader | None = None
        self._finishing = False
        self._unrecorded = False
        """No writer of this process could be opened at the last try (said once per streak)."""
        self._held: list[Op] | None = None
        """The child is gone and no writer of this process could be opened yet: what came
        since waits here (after the unacknowledged frames) until one can."""
        self._closing = False
        self._watch_child = child_watch.ChildWatch()
        self._feed = FrameFeed(
            partial(self._queue.put, _WAKE), self._frame, self._in_loop, self._watch_child.stuck
        )
        self._thread = threading.Thread(
            target=self._run, name=f"pipecat-roark-writer-sender:{directory}", daemon=True
        )
        self._thread.start()

    # ---- the Writer's surface ----

    def submit(self, op: Op) -> None:
        """Queue ``op`` for the child (any thread, never blocks; see ``frame_feed``)."""
        self._feed.add(op)

    @property
    def queue_depth(self) -> int:
        """Records submitted and not yet sent to the child (approximate, for metrics)."""
        return len(self._feed.pending)

    def _submit_and_send(self, op: Op) -> None:
        """The sender writes it, and what is queued before it: the loop may be the one waiting."""
        self._feed.add_and_send(op)

    def flush_sync(self, timeout: float) -> bool:
        """As the writer thread's; the answers are read by a thread meanwhile.

        The loop that reads them may be the one waiting here, or be gone (at exit).

        Returns:
            True if it was committed in time; False on timeout or once closing.
        """
        reader = self._reader
        if reader is None:
            return super().flush_sync(timeout)
        with reader.thread_reads():
            return super().flush_sync(timeout)

    def left_in_fork(self) -> None:
        """In a forked copy of the bot: this copy's threads did not come along.

        Closed, so ``writer_for`` starts a writer of the fork's own (records given to
        this copy would wait for a sender thread that does not exist here), and its copies
        of the pipes closed, so the child still sees its end of input when the parent
        closes or dies.
        """
        self._closing = True
        self._feed.left_in_fork()
        if self._reader is not None:
            self._reader.left_in_fork()
            self._reader = None
        self._close_pipes()

    # ---- the sender thread ----

    def _run(self) -> None:
        try:
            self._start_child()
        except Exception as exc:
            self._fall_back(f"the writer process did not start ({exc})")
        while True:
            try:
                taken = [self._queue.get(timeout=None if self._held is None else RETRY_S)]
            except queue.Empty:
                self._open_local()
                continue
            with contextlib.suppress(queue.Empty):
                while True:
                    taken.append(self._queue.get_nowait())
            if _CHILD_GONE in taken and self.fell_back is None:
                self._fall_back(child_watch.ended_why(self._child))
            if _CHILD_STUCK in taken and self.fell_back is None and self._feed.direct:
                self._fall_back(child_watch.silent_why(self._child))
            if self._feed.direct:
                try:
                    self._feed.flush_blocking()
                except OSError as exc:  # the child is gone: what was framed is in _unacked
                    self._fall_back(child_watch.unwritable_why(self._child, exc))
            if not self._feed.direct:
                ops = self._feed.take()
                if self._held is not None:
                    self._held.extend(ops)
                    self._open_local()
                elif self._local is not None:
                    for op in ops:
                        self._local.submit(op)
            if any(isinstance(item, StopOp) for item in taken):
                self._finish()
                return

    def _start_child(self) -> None:
        name = f"pipecat-roark-writer-reader:{self.directory}"
        reader = partial(AnswerReader, handle=self._answer, ended=self._answers_ended, name=name)
        hidden = child_watch.HiddenFromForks()
        try:
            args = (self.directory, self.max_spool_bytes, self.min_free_bytes, self.owner)
            child, self._reader = _spawn(*args, reader, hidden)
            assert child.stdin is not None
            self._child, self.child_pid = child, child.pid
        finally:
            hidden.release()  # this writer's now (``left_in_fork``), or closed
        self._stdin = child.stdin.fileno()
        self._feed.connect(self._stdin)
        logger.debug(f"pipecat-roark: recording {self.directory} from process {child.pid}")

    def _frame(self, ops: list[Any]) -> tuple[int, list[Any]]:
        """Under the feed's lock: number a frame and keep it until the child commits it.

        An acknowledgement may be read meanwhile (by the loop, or the reader's thread), so
        each op is in the kept frame before its call is noted as open: an acknowledgement
        that sees the open also sees it sent (``writer_recovery.acknowledge``).

        Returns:
            The frame's seq and its ops as they cross the pipe.
        """
        self._seq += 1
        wire: list[Any] = []
        self._watch_child.owe()  # (from now, unless older frames already wait)
        self._unacked.append((self._seq, wire))
        for op in ops:
            if isinstance(op, BarrierOp):
                number = next(self._numbers)
                self._barriers[number] = op.release
                wire.append(RemoteBarrier(number, op.call_id))
                continue
            wire.append(op)
            if isinstance(op, OpenOp):
                self._open[op.call_id] = op
        return self._seq, wire

    def _finish(self) -> None:
        """Close: EOF tells the child to commit the rest and exit; wait for its last word.

        A child that exits with frames unacknowledged (killed, or its writer could not
        commit them) did not finish: this process records them itself, as on any death.
        """
        self._finishing = True
        if self._local is None:
            _end_input(self._feed, self._child, self._reader, self._watch_child)
            self._reap()
            if self._unacked and self.fell_back is None:
                self._fall_back(
                    f"{child_watch.exit_of(self._child)} before committing what it was sent"
                )
        if self._held is not None:
            self._open_local()
        if self._local is not None:  # waited for like the child: close's caller has the limit
            self._local.close(CLOSE_TIMEOUT_S)
        elif self._held is not None:  # the database never came back
            logger.error(f"pipecat-roark: {self.directory} unusable at close: its records are lost")

    def _watch(self) -> None:
        """A flush waits: a child that owes answers and says nothing is replaced.

        Only asks the sender (this may be the event loop: it must not wait).
        """
        if self._watch_child.stuck():
            self._queue.put(_CHILD_STUCK)

    # ---- the child's answers (from the loop that submits, else the reader's thread) ----

    def _in_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._reader is not None:
            self._reader.attach(loop)

    def _answer(self, kind: bytes, number: int, line: bytes) -> None:
        self._watch_child.heard()
        if kind == COMMITTED:
            acknowledge(self._unacked, number, self._open, self._acked_events)
            self._watch_child.settled(bool(self._unacked))
        elif kind == RELEASED:
            _call(self._barriers.pop(number, None))
        elif kind == DELIVERIES:
            self._notify()
        elif kind == LOG:
            log_child_line(line)

    def _answers_ended(self) -> None:
        if not self._finishing:
            self._queue.put(_CHILD_GONE)

    # ---- falling back to a writer of this process ----

    def _reap(self) -> None:
        """Reap the child, bounded, and close this process's ends of its pipes.

        Its answers ended, or it was killed: it is exiting; one still there after
        ``child_watch.STALL_S`` is killed.
        """
        if self._child is not None:
            child_watch.reap(self._child)
        self._close_pipes()

    def _close_pipes(self) -> None:
        """Close this process's ends of the child's pipes."""
        if self._child is not None and self._child.stdin is not None:
            with contextlib.suppress(OSError):
                self._child.stdin.close()
        if self._reader is not None:
            self._reader.close()

    def _fall_back(self, why: str) -> None:
        """Record in this process from now on, starting with what the child did not commit."""
        self.fell_back = why
        self._feed.disconnect()  # what was framed is in _unacked, replayed below
        logger.error(f"pipecat-roark: {why}; recording {self.directory} from this process instead")
        if self._child is not None:  # alive but unwritable, or stuck: it must not commit
            child_watch.end_child(self._child, self._reader)  # behind our back
        self._reap()
        self._held = []
        self._open_local()

    def _open_local(self) -> None:
        """Open this process's writer and give it what the child left; else keep it all.

        A database this process cannot open either (a full disk, a moved directory) keeps
        the records in memory and is tried again (``RETRY_S``), as the writer thread keeps
        a refusing database's records.
        """
        held = self._held
        assert held is not None
        try:
            replay, adopt = recover(
                self.directory,
                self._unacked,
                self._open,
                self._barriers,
                self.owner,
                self._acked_events,
            )
            local = Writer(
                self.directory,
                max_spool_bytes=self.max_spool_bytes,
                min_free_bytes=self.min_free_bytes,
                owner=self.owner,
                adopt=adopt,
            )
        except Exception as exc:
            if not self._unrecorded:
                logger.error(
                    f"pipecat-roark: {self.directory} cannot be recorded from this process "
                    f"either ({exc}); keeping its records in memory and retrying"
                )
            self._unrecorded = True
            return
        if self._unrecorded:
            logger.info(f"pipecat-roark: recording {self.directory} from this process again")
        for number in barrier_numbers(self._unacked):  # released, or in the replay
            self._barriers.pop(number, None)
        self._unacked.clear()
        local.add_commit_listener(self._notify)
        for op in (*replay, *held):
            local.submit(op)
        self._held = None
        self._local = local

    def _notify(self) -> None:
        for listener in list(self._listeners):
            _call(listener)


RETRY_S = 1.0
"""How often records held for a database that cannot be opened try it again."""


def _end_input(
    feed: FrameFeed,
    child: subprocess.Popen[bytes] | None,
    reader: AnswerReader | None,
    watch: child_watch.ChildWatch,
) -> None:
    """Close the child's input (EOF: commit the rest and exit); wait for its last word.

    Bounded (``child_watch.wait_for_last_word``): a stuck child is killed.
    """
    with contextlib.suppress(OSError):  # a dead or stuck child: replayed by the caller
        feed.close()  # nothing may write to the fd once it is closed
    if child is not None and child.stdin is not None:
        with contextlib.suppress(OSError):
            child.stdin.close()
    watch.owe_exit()  # its last answers and its exit
    if reader is not None and child is not None:
        child_watch.wait_for_last_word(reader, child, watch, CLOSE_TIMEOUT_S + START_S)


def _call(callback: Callable[[], None] | None) -> None:
    if callback is None:
        return
    try:
        callback()
    except Exception as exc:
        logger.warning(f"pipecat-roark: a writer callback failed: {exc}")


AnyWriter = Writer | ProcessWriter
"""What ``lifecycle.writer_for`` hands a call: the writer thread, or the writer child."""
