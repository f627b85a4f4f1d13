"""The drainer's one database connection: opened lazily, serialized, off the event loop.

Every sqlite3 call runs in the drainer's own database thread under one lock (a
``sqlite3.Connection`` serves one statement at a time), so the bot's loop never waits on
the disk. One thread, not the loop's default pool: the statements take turns at the lock
anyway, and at 50 real-time calls the pool's six threads woke 2,500 times in 6 s to take
them (issue 12, eighth pass). Work without the connection (reading a chunk file) stays
on the pool, so one slow file never holds up the statements. The exit drain runs it
inline instead: its loop is its own and serves nothing else, and no thread may be
started at interpreter exit.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from loguru import logger

from .store import connect

__all__ = ["DrainDatabase"]

T = TypeVar("T")


class DrainDatabase:
    """One connection to ``<directory>/wal.sqlite`` for one drainer.

    Args:
        directory: the data directory.
        inline: run database work on the calling thread (the exit drain), not in a
            worker thread.
    """

    def __init__(self, directory: Path, *, inline: bool = False) -> None:
        self.directory = directory
        self._inline = inline
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._thread: ThreadPoolExecutor | None = None

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` under the lock, in the drainer's database thread.

        It may use ``conn()``. Inline in the exit drain instead, whose loop is its own and
        which must start no threads at interpreter exit.

        Returns:
            What ``function`` returned; what it raises propagates.
        """

        def locked() -> T:
            with self._lock:
                return function(*args)

        if self._inline:
            return locked()
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="pipecat-roark-drain-db")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, locked)

    async def blocking(self, function: Callable[..., T], *args: Any) -> T:
        """Blocking work that needs no connection (a chunk file read and hashed), off the loop.

        Not on the database thread: a slow disk under one call's file holds up neither the
        other calls' statements nor the renewal of this drainer's leases.

        Inline in the exit drain instead (see ``run``).

        Returns:
            What ``function`` returned; what it raises propagates.
        """
        if self._inline:
            return function(*args)
        return await asyncio.to_thread(function, *args)

    async def guarded(self, what: str, function: Callable[..., object], *args: Any) -> bool:
        """Bookkeeping whose failure must not stop delivery: run, and logged if it fails.

        Returns:
            True if ``function`` ran without raising; False (a warning logged) if it raised.
        """
        try:
            await self.run(function, *args)
        except Exception as exc:
            logger.warning(f"pipecat-roark: could not {what} in {self.directory}: {exc}")
            return False
        return True

    def conn(self) -> sqlite3.Connection:
        """The connection, opened (and migrated) on first use; only inside ``run``.

        Returns:
            The drainer's connection.

        Raises:
            StoreError: the database cannot be opened (a subclass says why).
        """
        if self._conn is None:
            self._conn = connect(self.directory)
        return self._conn

    def conn_if_open(self) -> sqlite3.Connection | None:
        """The connection if one was opened, without opening one.

        Returns:
            The open connection, or None.
        """
        return self._conn

    def close(self) -> None:
        """Close the connection, if open, once no statement is running.

        The database thread ends once what was already handed to it has run.
        """
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        if self._thread is not None:
            self._thread.shutdown(wait=False)
            self._thread = None
