"""The writer child's answers, read by the bot's event loop, or by a thread where none runs.

Issue 12's profile: every wake of a helper thread costs the bot a fraction of a
millisecond of CPU (a blocking system call, then the GIL taken back from a busy loop).
A reader thread blocked on the answers pipe woke for every answer. So the event loop
that submits records reads the answers too (``add_reader``: the loop is awake anyway,
one more file descriptor in its ``epoll`` costs nothing), and the thread only reads
where no loop can: before any loop ran, after it stopped, while a thread waits in
``flush_sync`` (the loop may be the one waiting), while a running loop is stuck in a
blocking call (answers left unread for a whole ``WATCH_S``), and to the end at close or
fallback.

Both may read for a moment at a hand-over, so whoever reads holds ``_lock``, reads
without blocking and parses into one shared buffer: no answer is read twice or split.
The loop never waits for that lock: a loop that finds the thread reading stops watching
(a readable descriptor it cannot read would wake it again at once) until its next
gathering attaches it again.
The descriptor is closed only once no running loop watches it: a number closed under a
loop's selector could come back as another file's and confuse that loop.

Nothing the child does can hold the loop: one callback reads at most ``LOOP_READ_BYTES``
(a child flooding answers or log lines is read a slice per turn of the loop). And the end
of the answers is not only their EOF: once the child has exited (``exited``), what it
wrote is read and the end is told, even while a fork of the bot or a grandchild holds a
copy of the pipe's write end (``child_watch``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import threading
from collections.abc import Callable, Iterator

from loguru import logger

from .writer_pipe import split_answers

__all__ = ["AnswerReader"]

WATCH_S = 0.5
"""How often the idle thread checks that the loop it left the reading to still runs and
reads (a running loop stuck in a blocking call reads nothing: the thread reads for it)."""
LOOP_READ_BYTES = 16 << 10
"""At most this much is read per callback of the loop: a child that floods answers or log
lines (a stuck log loop) must not hold the bot's loop for as long as it writes. The loop
is called back while the pipe stays readable, with its other callbacks in between; a
message cut by a read waits in the buffer for the next."""
THREAD_READ_BYTES = 1 << 20
"""At most this much is read by the thread per hold of the reading lock (the loop may
want it back)."""


class AnswerReader:
    """Reads one child's answers pipe to its end, from a loop or its own thread."""

    def __init__(
        self,
        fd: int,
        handle: Callable[[bytes, int, bytes], None],
        ended: Callable[[], None],
        name: str,
        exited: Callable[[], bool] | None = None,
    ) -> None:
        """Start the thread; ``handle(kind, number, line)`` gets each answer, ``ended()`` the end.

        Both are called by whoever read, the loop or the thread, one at a time.
        ``exited()`` says whether the child is gone: then what it wrote is all in the pipe,
        and the end is told once that is read, even if the end of the pipe never comes (a
        fork of the bot, or a grandchild, holds a copy of its write end).
        """
        os.set_blocking(fd, False)
        self._fd = fd
        self._handle = handle
        self._ended = ended
        self._exited = exited
        self._lock = threading.Lock()
        self._buffer = bytearray()
        self._loop: asyncio.AbstractEventLoop | None = None
        """The loop watching ``_fd``, if one was given it."""
        self._threads_waiting = 0
        """How many ``thread_reads`` blocks are open: the thread reads while any is."""
        self._counting = threading.Lock()
        """Guards ``_threads_waiting``; never ``_lock``, held while an answer is handed on."""
        self._thread_only = False
        """A loop could not watch the descriptor: the thread reads, and no loop is asked again."""
        self._finishing = False
        self._closed = False
        """``close`` was called (the descriptor may still be left to a loop to close)."""
        self._fd_closed = False
        self._pumps = 0
        """How many times anyone read: the thread tells a loop that stopped reading by it."""
        self.done = threading.Event()
        """Set once the end of the answers was read (the child exited, or was killed)."""
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- who reads ----

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """From ``loop``, running: read there from now on (cheap if it already does).

        Called at each gathering: one that finds the thread reading leaves it to the next.
        """
        if self._loop is loop or self.done.is_set() or self._thread_only:
            return
        if not self._lock.acquire(blocking=False):
            return  # the thread is reading this moment: the loop never waits for it
        try:
            previous = self._loop
            if self._closed or previous is not None and previous.is_running():
                return  # closed, or another thread's loop reads them: it keeps them
            if previous is not None:  # stopped (not running: touching it is safe) or closed
                with contextlib.suppress(Exception):
                    previous.remove_reader(self._fd)
            try:
                loop.add_reader(self._fd, self._in_loop, loop)
            except Exception as exc:  # a loop without add_reader (Windows' proactor)
                logger.debug(f"pipecat-roark: answers read by a thread ({exc})")
                self._loop = None
                self._thread_only = True  # asked at every gathering: not again
                return
            self._loop = loop
        finally:
            self._lock.release()

    @contextlib.contextmanager
    def thread_reads(self) -> Iterator[None]:
        """While inside: the thread reads, whatever the loop does (it may be what waits)."""
        with self._counting:
            self._threads_waiting += 1
        self._wake.set()
        try:
            yield
        finally:
            with self._counting:
                self._threads_waiting -= 1

    def finish(self, timeout: float | None = None) -> bool:
        """Read to the end from the thread now, and wait for it (the child is exiting).

        Returns:
            True once the end was read within ``timeout``.
        """
        self._finishing = True
        self._wake.set()
        return self.done.wait(timeout)

    def close(self) -> None:
        """Close the descriptor, now if no running loop watches it, else from that loop."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop = self._loop
            if loop is not None and loop.is_running():
                with contextlib.suppress(RuntimeError):  # closed meanwhile: its selector is gone
                    loop.call_soon_threadsafe(self._close_in_loop, loop)
                    self._wake.set()  # the thread closes it if that loop stops first
                    return
            self._close_fd(loop)
        self._finishing = True
        self._wake.set()

    def left_in_fork(self) -> None:
        """In a forked copy: no thread reads here; this copy's descriptor is closed.

        The parent's loop still watches its own copy (one ``epoll`` registration per open
        file, which the parent still holds).
        """
        self._lock, self._counting = threading.Lock(), threading.Lock()
        was_closed = self._fd_closed  # (its number may be another file's by now)
        self._closed = self._fd_closed = True
        self._loop = None
        if not was_closed:
            with contextlib.suppress(OSError):
                os.close(self._fd)

    # ---- reading ----

    def _in_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """``add_reader``'s callback: read what is there; at the end, stop watching."""
        try:
            if not self._lock.acquire(blocking=False):
                # The thread is reading this moment: it takes this too. Watching on would
                # spin (told again at once, level-triggered); the next gathering attaches.
                loop.remove_reader(self._fd)
                if self._loop is loop:
                    self._loop = None
                return
            try:
                self._pump(LOOP_READ_BYTES)
                if self.done.is_set() or self._loop is not loop:
                    loop.remove_reader(self._fd)  # the end stays readable: no spinning on it
                    if self._loop is loop:
                        self._loop = None
                        self._wake.set()  # the thread looks again
            finally:
                self._lock.release()
        except Exception as exc:  # never into the loop
            logger.error(f"pipecat-roark: reading the writer process's answers failed: {exc}")

    def _close_in_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._close_fd(loop)
        self._finishing = True
        self._wake.set()

    def _close_fd(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Under the lock, once: ``loop`` (running here, or not running) stops watching."""
        if self._fd_closed:
            return
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(Exception):
                loop.remove_reader(self._fd)
        self._loop = None
        self._fd_closed = True
        os.close(self._fd)

    def _pump(self, budget: int) -> None:
        """Under the lock: read what there is, up to ``budget`` bytes (never waiting).

        Each whole answer is handed on; a short read means the pipe is empty for now.
        """
        self._pumps += 1
        if self.done.is_set() or self._fd_closed:
            return  # (a closed number may be another file's by now)
        while budget > 0:
            asked = min(budget, 1 << 16)
            try:
                data = os.read(self._fd, asked)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.done.set()
                self._ended()
                return
            budget -= len(data)
            self._buffer += data
            for kind, number, line in split_answers(self._buffer):
                try:
                    self._handle(kind, number, line)
                except Exception as exc:  # one answer's failure is not the reader's
                    logger.error(f"pipecat-roark: a writer process answer failed: {exc}")
            if len(data) < asked:
                return

    def _end_after_exit(self) -> None:
        """Under the lock, the child gone: read what it left (bounded), then tell the end.

        A dead child's answers are all in the pipe already, at most a pipe's worth: one
        bounded read of them, whatever a stray copy of the write end still writes.
        """
        self._pump(THREAD_READ_BYTES)
        if not self.done.is_set() and not self._fd_closed:
            self.done.set()
            self._ended()

    def _loop_reads(self) -> bool:
        loop = self._loop
        return (
            loop is not None
            and loop.is_running()
            and not self._finishing
            and not self._threads_waiting
        )

    def _run(self) -> None:
        """The thread: idle while a running loop reads; else wait for answers and read them.

        After the end it waits for ``close``, and closes the descriptor itself should the
        running loop it was left to stop before doing it.

        It waits with ``poll``: ``select`` refuses a descriptor numbered 1024 or more (a
        bot with many calls has that many files open).
        """
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        unread_since: int | None = None  # _pumps when answers last waited while a loop reads
        while not self._fd_closed:
            if self._closed:  # left to a running loop: closed here if it stops first
                with self._lock:
                    loop = self._loop
                    if loop is None or not loop.is_running():
                        self._close_fd(loop)
                        return
            if not self.done.is_set() and self._exited is not None and self._exited():
                with self._lock:
                    self._end_after_exit()
            if self._closed or self.done.is_set():  # (after the end: waits for close)
                self._wake.wait(WATCH_S)
                self._wake.clear()
                continue
            if self._loop_reads():
                self._wake.wait(WATCH_S)
                self._wake.clear()
                waiting = bool(poller.poll(0))
                if waiting and unread_since == self._pumps and self._loop_reads():
                    with self._lock:  # a whole watch unread: that loop is stuck in a call
                        self._pump(THREAD_READ_BYTES)
                unread_since = self._pumps if waiting else None
                continue
            readable = poller.poll(WATCH_S * 1000)
            if any(events & select.POLLNVAL for _, events in readable):
                return  # closed under us: nothing more to read
            if readable and not self._loop_reads():  # (a loop that took over reads it)
                with self._lock:
                    self._pump(THREAD_READ_BYTES)
