"""Migrations: a database written by an older version is upgraded in place, data kept."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from pipecat_roark.errors import StoreUnavailable
from pipecat_roark.store import MIGRATIONS, SCHEMA_VERSION, connect


def make_database_at(directory: Path, version: int) -> None:
    """A database exactly as an older release left it: only the first ``version`` migrations."""
    directory.mkdir(mode=0o700, exist_ok=True)
    conn = sqlite3.connect(directory / "wal.sqlite", isolation_level=None)
    for migration in MIGRATIONS[:version]:
        conn.executescript(migration.sql)
    conn.execute(f"PRAGMA user_version = {version}")
    conn.execute(
        "INSERT INTO calls (id, agent_id, owner_host, owner_pid, owner_token, started_at,"
        " heartbeat_at) VALUES ('old-call', 'a', 'h', 1, 't', 1, 1)"
    )
    conn.execute(
        "INSERT INTO chunks (call_id, idx, path, size, sha256, sample_rate, num_channels,"
        " created_at) VALUES ('old-call', 0, 'chunks/old-call/000000.pcm', 4, 'x', 16000, 2, 1)"
    )
    conn.close()
    (directory / "wal.sqlite").chmod(0o600)


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
def test_an_older_database_is_upgraded_by_a_writer_and_refused_by_a_reader(
    tmp_path: Path, version: int
) -> None:
    make_database_at(tmp_path, version)

    with pytest.raises(
        StoreUnavailable,
        match=f"needs migrating to {SCHEMA_VERSION}; run `pipecat-roark drain`",
    ):
        connect(tmp_path, read_only=True)

    upgraded = connect(tmp_path)
    try:
        assert upgraded.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
        indexes = [
            r[0] for r in upgraded.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        ]
        assert "deliveries_state_id" in indexes  # 0002
        chunk_columns = [r[1] for r in upgraded.execute("PRAGMA table_info(chunks)")]
        assert chunk_columns[-1] == "discarded_at"  # 0003
        assert upgraded.execute("SELECT id FROM calls").fetchall() == [("old-call",)]
        assert upgraded.execute("SELECT call_id, idx, discarded_at FROM chunks").fetchall() == [
            ("old-call", 0, None)
        ]
    finally:
        upgraded.close()
