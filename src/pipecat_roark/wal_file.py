"""WalFile: the writer's handle on ``wal.sqlite`` itself, and on the disk under it.

A bot must keep recording whatever happens to the file: a damaged database is moved
aside and a fresh one started; a file deleted or replaced under us is noticed (one stat
per batch) and a fresh one opened; a full disk is met with a reserve file released and
the -wal checkpointed. And when a write fails, a probe write tells whether the database
itself refuses writes (wait and keep everything) or only one op was bad.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from loguru import logger

from .errors import PipecatRoarkError, StoreCorrupt
from .store import DB_NAME, connect, quarantine, transaction
from .writer_state import WriterStats

__all__ = [
    "DatabaseDown",
    "WalFile",
    "connect_or_quarantine",
    "is_busy",
    "is_disk_full",
    "is_transient",
]

RESERVE_NAME = ".reserve"
RESERVE_BYTES = 128 << 10
"""A file kept in the data directory while there is room, and deleted when the disk is
full: room for the events and the ends of calls once audio has stopped for lack of space."""

_TRANSIENT_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.EIO, errno.EAGAIN, errno.EINTR, errno.EACCES, errno.EBUSY}
)
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class DatabaseDown(Exception):
    """The database itself refuses writes (not one op): keep everything and wait."""


def is_disk_full(exc: BaseException | None) -> bool:
    """Did ``exc`` come from a full disk (or quota, or file size limit)?

    Returns:
        True for ENOSPC, EDQUOT and EFBIG, and for SQLite's "full" errors.
    """
    if isinstance(exc, OSError):
        return exc.errno in _DISK_FULL
    return isinstance(exc, sqlite3.Error) and "full" in str(exc).lower()


def is_transient(exc: BaseException) -> bool:
    """Worth a short retry: a brief OS shortage or hiccup, or SQLite's own I/O trouble.

    Returns:
        True for the transient errnos (EMFILE, EIO, EAGAIN, ...) and SQLite's
        OperationalError.
    """
    if isinstance(exc, OSError):
        return exc.errno in _TRANSIENT_ERRNOS
    return isinstance(exc, sqlite3.OperationalError)


def is_busy(exc: BaseException) -> bool:
    """Another connection holds the database ("database is locked", "busy").

    Returns:
        True for SQLite's busy and locked errors.
    """
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


class WalFile:
    """The one write connection of a process to ``<directory>/wal.sqlite``.

    Args:
        directory: the data directory; a damaged database there is moved aside at once.
        min_free_bytes: free space that must remain, beyond twice the reserve, before the
            reserve file is (re)created.
        stats: the writer's counters (``reopened`` counts fresh databases).
    """

    def __init__(self, directory: Path, *, min_free_bytes: int, stats: WriterStats) -> None:
        self.directory = directory
        self._min_free_bytes = min_free_bytes
        self._stats = stats
        self._conn: sqlite3.Connection | None = connect_or_quarantine(directory)
        self._identity = _file_identity(directory)
        self._lost = ""
        """How the database file was lost (deleted, replaced), for the reopening log line."""
        self.on_reopen: Callable[[], list[str]] | None = None
        """Records the calls still open here in a fresh database; returns their ids."""

    def db(self) -> sqlite3.Connection:
        """The connection, reopened on a fresh database after the file was lost.

        Returns:
            The process's write connection to ``wal.sqlite``.

        Raises:
            DatabaseDown: the file was lost and no fresh database can be opened.
        """
        if self._conn is None:
            return self._open_fresh()
        return self._conn

    def close(self) -> None:
        """Close the connection (the writer thread is ending)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def check_file(self) -> None:
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
        with suppress(DatabaseDown):  # else the commit path waits for the disk
            self.db()

    def _open_fresh(self) -> sqlite3.Connection:
        try:
            conn = connect_or_quarantine(self.directory)
        except PipecatRoarkError as exc:
            raise DatabaseDown(str(exc)) from exc
        self._conn = conn
        self._identity = _file_identity(self.directory)
        self._stats.reopened += 1
        recorded = self.on_reopen() if self.on_reopen is not None else []
        logger.error(
            f"pipecat-roark: {self.directory / DB_NAME} was {self._lost} while this process "
            "was recording into it: whatever was committed to the old file is gone with it. "
            f"Started a fresh database; {len(recorded)} call(s) still open here are recorded "
            "in it again from now on (their earlier events are lost, their audio is kept): "
            f"{sorted(recorded)!r}"
        )
        return conn

    def refuses_writes(self, exc: BaseException) -> bool:
        """Is the database itself unwritable (rather than this op bad)? A probe write says.

        Returns:
            True for a full disk, a locked or busy database, or a failing probe write;
            False when the database takes writes, so the op that raised ``exc`` was bad.
        """
        if not isinstance(exc, (sqlite3.Error, OSError)):
            return False
        if is_disk_full(exc) or is_busy(exc):
            return True
        try:
            conn = self.db()
            with transaction(conn):
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                conn.execute(f"PRAGMA user_version = {version}")
        except (sqlite3.Error, DatabaseDown):
            return True
        return False

    # ---- a full disk ----

    def keep_reserve(self) -> None:
        """(Re)create the reserve file when the disk has room for it twice over."""
        path = self.directory / RESERVE_NAME
        try:
            if path.exists():
                return
            stat = os.statvfs(self.directory)
            if stat.f_bavail * stat.f_frsize < 2 * RESERVE_BYTES + self._min_free_bytes:
                return
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, bytes(RESERVE_BYTES))
            finally:
                os.close(fd)
        except OSError:
            path.unlink(missing_ok=True)

    def make_room(self) -> bool:
        """The disk is full: release the reserve, else checkpoint the -wal.

        Returns:
            True if either freed room; False if the disk is still as full.
        """
        return self._release_reserve() or self.reclaim_wal()

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

    def reclaim_wal(self) -> bool:
        """Copy the -wal into the database and truncate it.

        The -wal only shrinks at a checkpoint, and the automatic one waits for ~4 MB of
        frames, mostly older copies of the same few pages: on a full disk that is the
        room the end of a call needs.

        Returns:
            True if the -wal shrank.
        """
        wal = self.directory / f"{DB_NAME}-wal"
        try:
            before = wal.stat().st_size
            self.db().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            return wal.stat().st_size < before
        except (OSError, sqlite3.Error, DatabaseDown):
            return False


def _file_identity(directory: Path) -> tuple[int, int] | None:
    try:
        stat = (directory / DB_NAME).stat()
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino)


def connect_or_quarantine(directory: Path) -> sqlite3.Connection:
    """A bot must keep recording: a damaged database is moved aside and a fresh one started.

    Returns:
        A write connection to ``wal.sqlite``, a fresh one if the old file was damaged.
    """
    try:
        return connect(directory)
    except StoreCorrupt as exc:
        moved = quarantine(directory)
        logger.error(
            f"pipecat-roark: {exc}. It was moved to {moved} (not deleted) and a fresh database "
            "was started; undelivered calls in the old file can be salvaged with sqlite3 .recover"
        )
        return connect(directory)
