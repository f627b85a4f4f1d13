"""The WAL database: opening it safely, migrating it, and refusing what is not ours.

Every process (bot workers, ``pipecat-roark`` commands) opens the same file; SQLite's
WAL mode lets them read while one writes, and ``busy_timeout`` turns short write
contention into waiting instead of errors. Files we create are 0600, folders 0700:
transcripts are personal data.

Store owns the schema (migrations, ``user_version``, the one look at ``sqlite_schema``),
never a table's rows: each table's statements are in its owner module (``calls_table``,
``events_table``, ``chunks_table``, ``paused_keys``, the ``outbox`` package), as
``tests/test_table_owners.py`` checks.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import quote

from . import crashpoints
from .errors import StoreCorrupt, StoreForeign, StoreFromFuture, StoreUnavailable

__all__ = [
    "APPLICATION_ID",
    "DB_NAME",
    "Migration",
    "SCHEMA_VERSION",
    "connect",
    "ensure_dir",
    "load_migrations",
    "make_private_dirs",
    "now_us",
    "quarantine",
    "transaction",
]

DB_NAME = "wal.sqlite"
APPLICATION_ID = 1885565554  # 'pcrr'
BUSY_TIMEOUT_MS = 5000


def now_us() -> int:
    """Wall-clock microseconds since the Unix epoch: the time unit of every stored row.

    Returns:
        The current time, in whole microseconds.
    """
    return time.time_ns() // 1000


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema step: ``migrations/NNNN_name.sql``, applied once in its own transaction."""

    version: int
    name: str
    sql: str


def _migrations_dir() -> Path:
    # Installed wheel: pipecat_roark/migrations; source checkout: <repo>/migrations.
    packaged = Path(str(resources.files("pipecat_roark"))) / "migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "migrations"


def load_migrations() -> list[Migration]:
    """The named, ordered list of migrations (``NNNN_name.sql``).

    Returns:
        Every migration, in version order from 1.

    Raises:
        RuntimeError: the files are not numbered 1..n without gaps (a packaging mistake).
    """
    found = []
    for path in sorted(_migrations_dir().glob("[0-9][0-9][0-9][0-9]_*.sql")):
        version = int(path.name[:4])
        found.append(Migration(version, path.stem[5:], path.read_text()))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations are not numbered 1..n without gaps: {versions}")
    return found


MIGRATIONS = load_migrations()
SCHEMA_VERSION = len(MIGRATIONS)


def make_private_dirs(path: Path) -> None:
    """``mkdir -p`` where every folder created (parents too) is 0700, whatever the umask.

    ``Path.mkdir(parents=True)`` gives parents the umask's default (0777 under umask 0).

    Raises:
        NotADirectoryError: a file is in the way of ``path``.
        OSError: a folder cannot be created or made private.
    """
    missing = []
    folder = path
    while not folder.is_dir() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            continue  # made by another process meanwhile: not ours to change
        if stat.S_IMODE(folder.stat().st_mode) != 0o700:  # an umask such as 0o277
            folder.chmod(0o700)
    if not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "a file is in the way", str(path))


def ensure_dir(path: Path) -> None:
    """Create ``path`` (and parents) as 0700; tighten an existing folder we own.

    Raises:
        StoreUnavailable: the folder cannot be created or is not writable (the message
            says to set ``PIPECAT_ROARK_DIR``).
    """
    try:
        make_private_dirs(path)
        if stat.S_IMODE(path.stat().st_mode) & 0o077 and path.stat().st_uid == os.getuid():
            path.chmod(0o700)
    except OSError as exc:
        raise StoreUnavailable(
            f"cannot create data directory {path}: {exc.strerror or exc}; "
            "set PIPECAT_ROARK_DIR (or data_dir=) to a writable folder"
        ) from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise StoreUnavailable(
            f"data directory {path} is not writable; fix its permissions or set "
            "PIPECAT_ROARK_DIR to a writable folder"
        )


def _touch_private(db: Path) -> None:
    """Create the database file 0600 before SQLite does (its -wal/-shm take the db's mode).

    Never open and close an existing file here: closing any descriptor of a file drops
    every POSIX lock this process holds on it, including SQLite's own. Another process
    could then believe it is alone, truncate the -shm file we have mapped, and this
    process dies of SIGBUS. Existing files only get a chmod, which touches no lock.

    Raises:
        StoreUnavailable: the file cannot be created or its mode set.
    """
    try:
        if not db.exists():
            with suppress(FileExistsError):  # another process was first
                os.close(os.open(db, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        for suffix in ("", "-wal", "-shm"):
            target = db.with_name(db.name + suffix)
            try:
                if stat.S_IMODE(target.stat().st_mode) != 0o600:
                    target.chmod(0o600)
            except FileNotFoundError:
                continue
    except OSError as exc:
        raise StoreUnavailable(
            f"cannot open {db}: {exc.strerror or exc}; check the folder's "
            "permissions and free space"
        ) from exc


def _classify(exc: sqlite3.Error, db: Path) -> Exception:
    text = str(exc).lower()
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return StoreCorrupt(
            f"{db} is damaged or not a database ({exc}); move it aside with "
            "`pipecat-roark doctor --repair` (a recording process does it by itself) and a "
            "fresh one is created"
        )
    if "locked" in text or "busy" in text:
        return StoreUnavailable(
            f"{db} stayed locked for {BUSY_TIMEOUT_MS // 1000} s ({exc}); another process holds a "
            "long write transaction: retry, or find the process with `fuser {db}`"
        )
    if "disk" in text and "full" in text:
        return StoreUnavailable(f"disk full while writing {db}; free space in {db.parent}")
    return StoreUnavailable(f"cannot use {db}: {exc}")


def connect(
    directory: Path, *, read_only: bool = False, migrate: bool = True
) -> sqlite3.Connection:
    """Open ``<directory>/wal.sqlite``: WAL mode, busy timeout, foreign keys, migrated.

    ``read_only`` opens for inspection: ``PRAGMA query_only`` guarantees looking never
    writes, and a database that would need migrating is reported, not changed.

    Returns:
        An autocommit connection (transactions are explicit, see ``transaction``), usable
        from any thread.

    Raises:
        StoreUnavailable: no database to read, the folder or file cannot be used, it
            stayed locked, the disk is full, or it needs migrating and ``read_only``.
        StoreCorrupt: the file is damaged or not a database.
        StoreForeign: a SQLite database pipecat-roark did not create (left unchanged).
        StoreFromFuture: its schema is newer than this version (left unchanged).
    """  # noqa: DOC501 (sqlite3 errors become one of these in _classify)
    db = directory / DB_NAME
    if read_only:
        if not db.exists():
            raise StoreUnavailable(
                f"no database at {db}: nothing has been recorded there yet "
                "(check --dir / PIPECAT_ROARK_DIR)"
            )
    else:
        ensure_dir(directory)
        _touch_private(db)
    # On a read-only filesystem (a mounted copy, a volume from a dead container) SQLite
    # cannot create the WAL index: open it as immutable, since nobody can write there.
    frozen = read_only and not os.access(directory, os.W_OK)
    target = f"file:{quote(str(db))}?mode=ro&immutable=1" if frozen else str(db)
    try:
        conn = sqlite3.connect(
            target,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
            uri=frozen,
        )
    except sqlite3.Error as exc:
        raise _classify(exc, db) from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        _check_identity(conn, db)
        if not read_only:
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        if migrate and not read_only:
            _migrate(conn, db)
        else:
            _check_version(conn, db, allow_older=False)
        if read_only:
            conn.execute("PRAGMA query_only = ON")
        if not frozen:
            _touch_private(db)
    except sqlite3.Error as exc:
        conn.close()
        raise _classify(exc, db) from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _check_identity(conn: sqlite3.Connection, db: Path) -> None:
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    if app_id == APPLICATION_ID:
        return
    tables = conn.execute(
        "SELECT count(*) FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%'"
    ).fetchone()[0]
    if app_id != 0 or tables:
        raise StoreForeign(
            f"{db} is a SQLite database that pipecat-roark did not create; "
            "point --dir / PIPECAT_ROARK_DIR at a folder of its own (nothing was changed)"
        )


def _check_version(conn: sqlite3.Connection, db: Path, *, allow_older: bool) -> int:
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise StoreFromFuture(
            f"{db} has schema version {version}, newer than this pipecat-roark understands "
            f"({SCHEMA_VERSION}); upgrade pipecat-roark (the file was not changed)",
            found=version,
            supported=SCHEMA_VERSION,
        )
    if version < SCHEMA_VERSION and not allow_older:
        raise StoreUnavailable(
            f"{db} is at schema version {version} and needs migrating to {SCHEMA_VERSION}; "
            "run `pipecat-roark drain` (or start a bot) once to upgrade it"
        )
    return version


def _migrate(conn: sqlite3.Connection, db: Path) -> None:
    version = _check_version(conn, db, allow_older=True)
    for migration in MIGRATIONS[version:]:
        # Each migration and its version bump commit together, or not at all.
        conn.execute("BEGIN IMMEDIATE")
        try:
            current = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if current >= migration.version:  # another process got there first
                conn.execute("ROLLBACK")
                continue
            for statement in _statements(migration.sql):
                conn.execute(statement)
                crashpoints.reached("mid-migration")
            conn.execute(f"PRAGMA user_version = {migration.version}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _statements(sql: str) -> Iterator[str]:
    buffer = ""
    for line in sql.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                yield buffer
            buffer = ""
    if buffer.strip() and not buffer.strip().startswith("--"):
        yield buffer


def quarantine(directory: Path) -> Path:
    """Move a damaged ``wal.sqlite`` (and its -wal/-shm) aside; never delete it.

    Returns:
        The new path of the main file, ``wal.sqlite.corrupt-<UTC timestamp>``, kept so
        its data can still be salvaged (``sqlite3 … .recover``).
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    db = directory / DB_NAME
    target = db.with_name(f"{DB_NAME}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = db.with_name(f"{DB_NAME}.corrupt-{stamp}-{n}")
    for suffix in ("-wal", "-shm", ""):
        source = db.with_name(db.name + suffix)
        if source.exists():
            source.rename(target.with_name(target.name + suffix))
    return target


@contextmanager
def transaction(
    conn: sqlite3.Connection, *, immediate: bool = True
) -> Iterator[sqlite3.Connection]:
    """BEGIN (IMMEDIATE: take the write lock up front, so busy_timeout applies) … COMMIT.

    Anything raised inside rolls the transaction back and propagates.

    Yields:
        ``conn``, inside the transaction.
    """
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    else:
        conn.execute("COMMIT")
