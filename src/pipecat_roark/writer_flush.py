"""What the writer thread and the writer in a child process share: flushes, listeners, close.

A flush is a ``BarrierOp`` put behind everything queued; whoever commits releases it. The
waiting is the same wherever the committing happens, and so are the list of those told
when a commit added deliveries and closing (a ``StopOp`` behind everything queued, then
the thread that handles it is waited for), so they live here once.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from .ops import BarrierOp, Op, StopOp

__all__ = ["WriterSurface"]

WATCH_S = 0.5
"""How often a waiting flush checks that whoever commits is still there."""


class WriterSurface:
    """Flushes, commit listeners and close, over the subclass's queue and thread.

    ``flush`` and ``flush_sync`` use the subclass's ``submit`` and ``_watch``; the subclass
    makes ``_listeners`` and calls them after a commit that added deliveries; ``close``
    puts a ``StopOp`` on its ``_queue`` for its ``_thread``, which ends after it.
    """

    _closing: bool
    _listeners: list[Callable[[], None]]
    _queue: queue.SimpleQueue[Any]
    _thread: threading.Thread

    def close(self, timeout: float = 5.0) -> bool:
        """Commit what is queued, then stop (the thread, and the child if there is one).

        Returns:
            True if the thread stopped within ``timeout``.
        """
        self._closing = True
        if self._thread.is_alive():
            self._queue.put(StopOp())
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        """False once closed (a writer thread that died is restarted by the next submit)."""
        return not self._closing

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        """Called (from a thread of the writer's) after a commit that added deliveries."""
        self._listeners.append(listener)

    def remove_commit_listener(self, listener: Callable[[], None]) -> None:
        """Stop calling ``listener`` (one not added is ignored)."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def submit(self, op: Op) -> None:
        """Queue ``op`` (the subclass's)."""
        raise NotImplementedError

    def _submit_and_send(self, op: Op) -> None:
        """Queue ``op`` to be committed without this thread's event loop (it is blocked)."""
        self.submit(op)

    def _watch(self) -> None:
        """Called while a flush waits: the subclass mends a committer that died."""

    def flush_sync(self, timeout: float) -> bool:
        """Block until everything queued so far is committed (or ``timeout``).

        Returns:
            True if it was committed in time; False on timeout or once closing.
        """
        if self._closing:
            return False
        done = threading.Event()
        self._submit_and_send(BarrierOp(done.set))
        deadline = time.monotonic() + timeout
        while not done.wait(max(0.0, min(WATCH_S, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                return False
            self._watch()
        return True

    async def flush(self, limit_s: float) -> bool:
        """Wait, without blocking the event loop, until everything queued is committed.

        Returns:
            True if it was committed within ``limit_s``; False on timeout or once closing.
        """
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
                    asyncio.shield(future), max(0.0, min(WATCH_S, deadline - loop.time()))
                )
            except TimeoutError:
                if loop.time() >= deadline:
                    return False
                self._watch()
                continue
            return True


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
