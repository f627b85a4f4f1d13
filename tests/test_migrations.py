"""Migrations: a database written by an older version is upgraded in place, data kept."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from pipecat_roark.errors import StoreUnavailable
from pipecat_roark.store import SCHEMA_VERSION, connect


def test_a_version_1_database_is_upgraded_by_a_writer_and_refused_by_a_reader(
    tmp_path: Path,
) -> None:
    connect(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "wal.sqlite")
    conn.execute("DROP INDEX deliveries_state_id")  # what 0002 adds
    conn.execute(
        "INSERT INTO calls (id, agent_id, owner_host, owner_pid, owner_token, started_at,"
        " heartbeat_at) VALUES ('old-call', 'a', 'h', 1, 't', 1, 1)"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()

    with pytest.raises(StoreUnavailable, match="needs migrating to 2; run `pipecat-roark drain`"):
        connect(tmp_path, read_only=True)

    upgraded = connect(tmp_path)
    try:
        assert upgraded.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        indexes = [
            r[0] for r in upgraded.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        ]
        assert "deliveries_state_id" in indexes
        assert upgraded.execute("SELECT id FROM calls").fetchall() == [("old-call",)]
    finally:
        upgraded.close()
