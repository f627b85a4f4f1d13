"""The bot's side of the writer child's stdin: records framed and written from the loop.

Issue 12's profile of the writer child (``writer_process``) showed that a sender thread
woken for every record cost the bot more than the records themselves: pickling and
writing a mixed call's 228 records and 13 chunks takes about 1.5-4 ms of CPU, but the
thread's wake-ups and the GIL hand-offs they force on the busy event loop cost 20-40 ms
per call. So a record submitted in an event loop is framed and written by that loop,
gathered for ``_GATHER_S`` (``call_later``), with a non-blocking write into a 1 MiB pipe:
no other thread runs. The sender thread is only the fallback: a record from a thread without a
loop, a pipe full for the moment (the rest of a frame waits in ``backlog`` for the
sender's blocking write), the child not started yet or gone.

Every frame is built and written under one lock, so frames never interleave and seq
numbers follow the order records were submitted in, whichever thread writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import select
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from .writer_pipe import encode_frame

__all__ = ["FrameFeed"]

_GATHER_S = 0.002
"""How long a loop gathers records before it writes them: one write per gathering, not
one per record (each system call costs the bot, and wakes the child)."""
_WAIT_WRITABLE_S = 1.0
"""How long one blocking wait for room in the pipe lasts before it looks again."""


class FrameFeed:
    """Records on their way to the child: queued, framed, written (any thread; the loop's never waits)."""

    def __init__(
        self,
        wake_sender: Callable[[], None],
        frame: Callable[[list[Any]], tuple[int, list[Any]]],
        in_loop: Callable[[asyncio.AbstractEventLoop], None],
        stuck: Callable[[], bool],
    ) -> None:
        """``frame`` turns records into ``(seq, wire ops)`` and keeps them until acknowledged.

        ``in_loop(loop)`` is told of the loop each gathering is written from (it reads the
        child's answers there too). ``stuck()`` says when a blocking write stops waiting
        for room: the child reads nothing and answers nothing (``child_watch``).
        """
        self.pending: deque[Any] = deque()
        self._wake_sender = wake_sender
        self._frame = frame
        self._in_loop = in_loop
        self._stuck = stuck
        self._lock = threading.Lock()
        self._backlog = b""
        self._fd: int | None = None
        self._scheduled_on: asyncio.AbstractEventLoop | None = None
        """The loop a flush is scheduled on, if any."""

    @property
    def direct(self) -> bool:
        """True while records go to a live child (else the sender routes them)."""
        return self._fd is not None

    def connect(self, fd: int) -> None:
        """The child is up: write to ``fd`` (made non-blocking, and widened) from now on.

        A 1 MiB pipe takes a whole chunk in one write, without waiting for the child.
        """
        os.set_blocking(fd, False)
        with contextlib.suppress(OSError, AttributeError):  # (not Linux: the default size)
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
        with self._lock:
            self._fd = fd

    def disconnect(self) -> None:
        """The child is gone: no more writes; what was framed is in the unacknowledged."""
        with self._lock:
            self._fd = None
            self._backlog = b""

    def close(self) -> None:
        """The last write, at close (the sender): everything queued, then no more writes.

        Raises:
            OSError: the pipe is broken, or the child stuck (what was framed is in the
                unacknowledged).
        """
        with self._lock:
            try:
                self._write(blocking=True)
            finally:
                self._fd = None
                self._backlog = b""

    def left_in_fork(self) -> None:
        """In a forked copy: forget the pipe, and the lock a thread of the parent may hold."""
        self._lock = threading.Lock()
        self._fd = None
        self._backlog = b""

    def add(self, record: Any) -> None:
        """Queue ``record``; in an event loop, frame and write it on the loop's next turn."""
        self.pending.append(record)
        if self._fd is not None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                scheduled = self._scheduled_on
                if scheduled is None or (scheduled is not loop and not scheduled.is_running()):
                    # (a loop that ended with its flush still scheduled never runs it)
                    self._scheduled_on = loop
                    loop.call_later(_GATHER_S, self._flush_in_loop)
                    self._in_loop(loop)
                return
        self._wake_sender()

    def add_and_send(self, record: Any) -> None:
        """Queue ``record`` for the sender to write now, with all queued before it.

        For a thread about to block until it is committed: when that thread is a loop's,
        the loop's own write would never come.
        """
        self.pending.append(record)
        self._wake_sender()

    def take(self) -> list[Any]:
        """Everything queued, for the sender to route elsewhere (the child is not there).

        Returns:
            The records, oldest first.
        """
        taken = []
        while self.pending:
            taken.append(self.pending.popleft())
        return taken

    def flush_blocking(self) -> None:
        """Frame what is queued and write it all, waiting for room (the sender thread).

        Raises:
            OSError: the pipe is broken (the child is gone), or ``TimeoutError``: no room
                came while the child said nothing past its limit (stopped, or dead with a
                stray copy of the pipe's read end in another process).
        """
        with self._lock:
            self._write(blocking=True)

    def _flush_in_loop(self) -> None:
        self._scheduled_on = None
        if not self._lock.acquire(blocking=False):  # the sender is writing: it takes ours too
            self._wake_sender()
            return
        try:
            done = self._write(blocking=False)
        except OSError:  # the child is gone: the sender finds out and falls back
            done = False
        finally:
            self._lock.release()
        if not done:
            self._wake_sender()

    def _write(self, *, blocking: bool) -> bool:
        """Under the lock: frame the queue, then write the backlog.

        Returns:
            True once everything is written; False if a non-blocking write found the pipe
            full (or there is no child to write to).

        Raises:
            TimeoutError: a blocking write found no room while the child was stuck.
        """
        fd = self._fd
        if fd is None:
            return False
        if self.pending:
            seq, wire = self._frame(self.take())
            self._backlog += encode_frame(seq, wire)
        while self._backlog:
            try:
                written = os.write(fd, self._backlog)
            except BlockingIOError:
                if not blocking:
                    return False
                if self._stuck():
                    raise TimeoutError("the writer process reads nothing") from None
                _wait_writable(fd)
                continue
            self._backlog = self._backlog[written:]
        return True


def _wait_writable(fd: int) -> None:
    """Wait (bounded) for room in the pipe.

    With ``poll``: ``select`` refuses a descriptor numbered 1024 or more (a bot with many
    calls has that many files open).
    """
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    poller.poll(_WAIT_WRITABLE_S * 1000)
