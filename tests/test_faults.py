"""Fault suite: Roark away, then erroring, then back; garbage answers; attempts that run
out; a database with corrupt pages. Nothing is lost, attempts are bounded, logs are clear."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from pathlib import Path

import pytest

from devserver_fixture import running_dev_server
from helpers import LogCapture
from pipecat_roark.drain import Drainer
from pipecat_roark.lifecycle import close_all_writers
from test_cli import cli
from test_drain import KEY, QUICK, assert_arrived_whole, delivery_states, record

pytestmark = pytest.mark.anyio


def attempts(directory: Path) -> dict[str, int]:
    conn = sqlite3.connect(directory / "wal.sqlite")
    try:
        return dict(conn.execute("SELECT idempotency_key, attempts FROM deliveries"))
    finally:
        conn.close()


async def test_an_outage_then_errors_then_recovery_delivers_everything_once(
    data_dir: Path, tmp_path: Path, logs: LogCapture
) -> None:
    for n in range(3):
        await record(data_dir, f"outage-{n}", n)

    # Roark unreachable: connection refused on every request.
    down = await Drainer(data_dir, KEY, "http://127.0.0.1:9", QUICK).run_once(budget_s=0.5)
    assert (down.delivered, down.dead_total) == (0, 0)
    assert down.retried > 0 and down.last_error is not None
    assert set(delivery_states(data_dir).values()) == {"pending"}

    with running_dev_server(tmp_path, fail_rate=1.0) as server:  # up, but failing
        failing = await Drainer(data_dir, KEY, server.base_url, QUICK).run_once(budget_s=0.5)
        assert (failing.delivered, failing.dead_total) == (0, 0)
        assert "503" in (failing.last_error or "")

        server.configure(fail_rate=0.0)  # back
        report = await Drainer(data_dir, KEY, server.base_url, QUICK).run_once(budget_s=60)
        assert report.complete, str(report)
        for n in range(3):
            assert_arrived_whole(server, data_dir, f"outage-{n}")
    assert max(attempts(data_dir).values()) < QUICK.max_attempts
    assert logs.messages("ERROR") == [], "retries are not errors: nothing gave up"


async def test_when_attempts_run_out_rows_go_dead_with_the_reason_and_retry_recovers_them(
    data_dir: Path, tmp_path: Path, logs: LogCapture
) -> None:
    await record(data_dir, "stubborn", 0)
    policy = dataclasses.replace(QUICK, max_attempts=3)
    with running_dev_server(tmp_path, fail_rate=1.0) as server:
        report = await Drainer(data_dir, KEY, server.base_url, policy).run_once(budget_s=30)
        rows = attempts(data_dir)
        assert report.dead_total == len(rows), "every row gave up, none was dropped"
        assert set(rows.values()) == {3}, "exactly max_attempts each"
        dead = logs.matching("is dead")
        assert len(dead) == len(rows), "one line per dead row"
        assert all("gave up after 3 attempts" in line and "503" in line for line in dead)

        server.configure(fail_rate=0.0)
        assert cli(data_dir, "retry", "--dead").returncode == 0
        done = cli(data_dir, "drain", "--keep-delivered-audio", base_url=server.base_url)
        assert done.returncode == 0, done.stderr
        assert_arrived_whole(server, data_dir, "stubborn")


async def test_truncated_upload_url_answers_are_retried_until_whole(
    data_dir: Path, tmp_path: Path
) -> None:
    await record(data_dir, "garbled", 0)
    with running_dev_server(tmp_path, garbage_rate=0.5, seed=3) as server:
        report = await Drainer(data_dir, KEY, server.base_url, QUICK).run_once(budget_s=60)
        assert report.complete and report.retried > 0, str(report)
        assert_arrived_whole(server, data_dir, "garbled")


async def test_corrupt_pages_are_found_by_doctor_and_moved_aside_by_repair(
    data_dir: Path,
) -> None:
    for n in range(3):
        await record(data_dir, f"page-{n}", n)
    close_all_writers()  # checkpointed into wal.sqlite itself
    db = data_dir / "wal.sqlite"
    assert (
        not (data_dir / "wal.sqlite-wal").exists()
        or (data_dir / "wal.sqlite-wal").stat().st_size == 0
    )
    page = 4096
    with db.open("r+b") as f:  # scribble over a page in the middle of the file
        f.seek(page * 3)
        f.write(b"\xde\xad\xbe\xef" * (page // 4))
    damaged = db.read_bytes()

    checked = cli(data_dir, "doctor", "--offline")
    assert checked.returncode == 1
    assert "doctor --repair" in checked.stdout
    assert "Traceback" not in checked.stdout + checked.stderr

    repaired = cli(data_dir, "doctor", "--repair", "--offline")
    assert "moved the corrupt database to" in repaired.stderr
    [moved] = list(data_dir.glob("wal.sqlite.corrupt-*"))
    assert moved.read_bytes() == damaged, "kept byte for byte for salvage"

    await record(data_dir, "after-repair", 9)  # the next call records into a fresh file
    assert delivery_states(data_dir) == {
        "after-repair:call-started": "pending",
        **{k: "pending" for k in delivery_states(data_dir) if ":chunk:" in k},
        "after-repair:call-ended": "pending",
    }


async def test_a_claim_that_reaches_its_thread_after_the_run_ended_leases_nothing(
    data_dir: Path,
) -> None:
    """A claim cancelled with its run (the budget ran out while it waited for a worker
    thread) runs in that thread later, after the leases were handed back: it must take
    none, or its rows stay leased by a drainer that is gone until the lease expires."""
    await record(data_dir, "late-claim", 0)
    drainer = Drainer(data_dir, KEY, "http://127.0.0.1:9", QUICK)
    await drainer.run_once(budget_s=0.2)
    assert set(delivery_states(data_dir).values()) == {"pending"}
    due_in = await drainer._db.run(drainer._next_due_in, None)
    assert due_in is not None
    await asyncio.sleep(due_in + 0.05)  # the rows are due again: a claim would take them
    late = await drainer._db.run(drainer._claim, None)  # what the late thread runs
    drainer._db.close()
    assert late == []
    assert set(delivery_states(data_dir).values()) == {"pending"}
