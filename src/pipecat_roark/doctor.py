"""`pipecat-roark doctor`: everything that stops calls from being recorded or delivered.

One check per line (the directory, the database, stored data, free space, the API key,
Roark's reachability), and the one repair there is: a corrupt database moved aside,
never deleted.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path

import httpx

from . import config
from .errors import ConfigError, PipecatRoarkError, StoreCorrupt
from .store import DB_NAME, SCHEMA_VERSION, connect, quarantine

__all__ = ["Check", "damage", "doctor", "repair"]


@dataclass(frozen=True)
class Check:
    """One line of ``doctor``: what was checked, whether it is fine, and what was found."""

    name: str
    ok: bool
    detail: str


def doctor(
    directory: Path, *, api_key: str | None, base_url: str | None, reachability: bool = True
) -> list[Check]:
    """Everything that stops calls from being recorded or delivered, one check per line.

    Returns:
        The checks in order: directory, database, stored data, file modes, disk space,
        API key, base URL (reached only with ``reachability``).
    """
    checks: list[Check] = []
    if not directory.is_dir():
        checks.append(
            Check("directory", False, f"{directory} does not exist (nothing recorded there yet)")
        )
    else:
        mode = stat.S_IMODE(directory.stat().st_mode)
        writable = os.access(directory, os.W_OK)
        checks.append(
            Check(
                "directory",
                writable and mode & 0o077 == 0,
                f"{directory} mode {mode:04o}"
                + ("" if writable else ", not writable")
                + ("" if mode & 0o077 == 0 else " (should be 0700: chmod 700 it)"),
            )
        )
        db = directory / DB_NAME
        if db.exists():
            checks.append(_database_check(directory))
            if checks[-1].ok:
                checks += _stored_data_checks(directory)
            db_mode = stat.S_IMODE(db.stat().st_mode)
            checks.append(
                Check("file modes", db_mode & 0o077 == 0, f"{db.name} mode {db_mode:04o}")
            )
        free = shutil.disk_usage(directory).free
        floor = config.DEFAULT_MIN_FREE_BYTES
        checks.append(Check("disk space", free > floor, f"{free / 2**30:.1f} GiB free"))
    fp = config.key_fingerprint(api_key)
    checks.append(
        Check(
            "api key",
            fp is not None,
            f"ROARK_API_KEY set ({fp})" if fp else "ROARK_API_KEY is not set",
        )
    )
    try:
        url = config.resolve_base_url(base_url)
    except ConfigError as exc:
        checks.append(Check("base url", False, str(exc)))
        return checks
    if reachability:
        try:
            response = httpx.get(url, timeout=5.0)
            checks.append(Check("base url", True, f"{url} answered HTTP {response.status_code}"))
        except httpx.HTTPError as exc:
            checks.append(
                Check("base url", False, f"{url} unreachable: {type(exc).__name__}: {exc}")
            )
    return checks


def repair(directory: Path) -> Path | None:
    """Move a corrupt database aside (timestamped, never deleted) for a fresh one to start.

    Returns:
        Where the database went, or None when there is none or it is sound.
    """
    if not (directory / DB_NAME).exists() or damage(directory)[0] is None:
        return None
    return quarantine(directory)


def damage(directory: Path) -> tuple[str | None, int]:
    """What is wrong with the database file, if anything, read-only.

    Returns:
        What is wrong (None when the file opens and every page passes
        ``integrity_check``) and the schema version (0 when it cannot be read).

    Raises:
        StoreError: the file is not ours to judge (newer, foreign, unavailable).
    """
    try:
        conn = connect(directory, read_only=True)
    except StoreCorrupt as exc:
        return str(exc), 0
    try:
        result = conn.execute("PRAGMA integrity_check").fetchone()[0]
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.DatabaseError as exc:
        return (
            f"{directory / DB_NAME} is corrupt ({exc}); run `pipecat-roark doctor --repair`",
            0,
        )
    finally:
        conn.close()
    if result != "ok":
        return f"integrity_check: {result}; run `pipecat-roark doctor --repair`", version
    return None, version


def _stored_data_checks(directory: Path) -> list[Check]:
    """Stored data that was salvaged, but is worth knowing about.

    Events that no longer decode (their calls go without them) and undelivered chunk
    files that are gone (they go dead).

    Returns:
        The stored-events check and the chunk-files check.
    """
    from .inspection import damaged_calls, missing_chunks

    conn = connect(directory, read_only=True)
    try:
        found = damaged_calls(conn, every_call=True)
        gone = missing_chunks(conn, directory)
    finally:
        conn.close()
    chunks = Check(
        "chunk files",
        not gone,
        "every undelivered chunk file is there"
        if not gone
        else f"{len(gone)} undelivered chunk file(s) missing or truncated, first: {gone[0]['path']}",
    )
    if not found:
        return [Check("stored events", True, "every stored event decodes"), chunks]
    names = ", ".join(repr(c)[1:-1] for c in list(found)[:5]) + (" …" if len(found) > 5 else "")
    events = Check(
        "stored events",
        False,
        f"{sum(max(n, 0) for n in found.values())} event(s) of {len(found)} call(s) do not"
        f" decode: {names}",
    )
    return [events, chunks]


def _database_check(directory: Path) -> Check:
    try:
        problem, version = damage(directory)
    except PipecatRoarkError as exc:
        return Check("database", False, str(exc))
    if problem is not None:
        return Check("database", False, problem)
    return Check(
        "database", True, f"integrity ok, schema {version} (this version: {SCHEMA_VERSION})"
    )
