"""`DrainReport.as_json()` is what `pipecat-roark drain --json` prints: the same drain of
the same database, once through the library and once through the CLI."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from devserver_fixture import RunningDevServer, running_dev_server
from pipecat_roark.drain import Drainer
from pipecat_roark.wire import call_ended_key, call_started_key, chunk_key, key_label
from test_cli import cli_json
from test_drain import KEY, record

pytestmark = pytest.mark.anyio


def copy_database(source: Path, target: Path) -> None:
    """A consistent copy of a data directory: the database through SQLite's backup (the
    writer of this process may still hold it open), the chunk files as they are."""
    target.mkdir(mode=0o700)
    shutil.copytree(source / "chunks", target / "chunks")
    with (
        sqlite3.connect(source / "wal.sqlite") as src,
        sqlite3.connect(target / "wal.sqlite") as dst,
    ):
        src.backup(dst)
    src.close()
    dst.close()


async def test_as_json_is_exactly_what_drain_json_prints(
    data_dir: Path, dev_server: RunningDevServer, tmp_path: Path
) -> None:
    await record(data_dir, "mine", 0)
    await record(data_dir, "theirs", 1, key="rk_live_another_key")
    twin = tmp_path / "twin"
    copy_database(data_dir, twin)

    report = await Drainer(data_dir, KEY, dev_server.base_url).run_once()
    with running_dev_server(tmp_path / "second") as second:
        printed = cli_json(twin, "drain", expect=1, base_url=second.base_url)

    assert report.as_json() == printed
    assert printed["delivered"] >= 3 and printed["chunks"] >= 1, "a drain that did something"
    assert printed["skippedCalls"] == ["theirs"] and printed["complete"] is True


async def test_the_keys_a_recorded_call_is_delivered_under_and_their_labels(
    data_dir: Path,
) -> None:
    await record(data_dir, "labelled", 0)
    with sqlite3.connect(data_dir / "wal.sqlite") as conn:
        rows = conn.execute(
            "SELECT kind, chunk_idx, idempotency_key FROM deliveries ORDER BY id"
        ).fetchall()
    conn.close()

    expected = {
        "call-started": lambda _: call_started_key("labelled"),
        "chunk": lambda i: chunk_key("labelled", i),
        "call-ended": lambda _: call_ended_key("labelled"),
    }
    assert [key for _, _, key in rows] == [expected[kind](i) for kind, i, _ in rows]
    labels = [key_label(key, "labelled") for _, _, key in rows]
    assert labels[0] == "call-started" and labels[-1] == "call-ended"
    assert labels[1:-1] == [f"chunk:{i}" for i in range(len(rows) - 2)]
