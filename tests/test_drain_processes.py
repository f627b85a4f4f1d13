"""Drainers as real processes: orphans of a killed bot (here and on another host), three
drainers on one database, and a drainer killed with SIGKILL mid-delivery, then drained
again. The dev server refuses out-of-order requests (strict order mode)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from devserver_fixture import RunningDevServer
from helpers import stored_events
from pipecat_roark.drain import Drainer
from pipecat_roark.events import CallClosed
from pipecat_roark.owner import parse_identity
from test_drain import KEY, QUICK, assert_arrived_whole, delivery_states, record

HERE = Path(__file__).parent
WORKER = HERE / "drain_worker.py"
BOT = HERE / "lifecycle_bot.py"

pytestmark = pytest.mark.strict_order


def run_worker(
    directory: Path, base_url: str, crash_at: str | None = None, gate: Path | None = None
) -> subprocess.Popen[str]:
    env = {**os.environ}
    env.pop("PIPECAT_ROARK_CRASH_AT", None)
    if crash_at:
        env["PIPECAT_ROARK_CRASH_AT"] = crash_at
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(directory), KEY, base_url]
        + ([] if gate is None else [str(gate)]),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """Exit code and the report (the last line of output)."""
    out, _ = proc.communicate(timeout=120)
    lines = out.strip().splitlines()
    return proc.returncode, lines[-1] if lines else ""


def start_bot_mid_call(
    directory: Path, call_id: str, chunk_bytes: int = 256 * 1024, **env_extra: str
) -> subprocess.Popen[str]:
    """A live bot, mid-call (everything so far committed), recording under our key.

    It only records: its own drainer would otherwise try (and fail) to deliver every
    call in the directory, leaving errors on rows the tests look at."""
    env = {k: v for k, v in os.environ.items() if k not in ("ROARK_API_KEY", "ROARK_BASE_URL")}
    env["ROARK_API_KEY"] = KEY
    env.update(env_extra)
    proc = subprocess.Popen(
        [sys.executable, str(BOT), str(directory), call_id, "record", str(chunk_bytes)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "ready"
    except BaseException:
        kill(proc)
        raise
    return proc


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.stdout is not None
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL


def kill_bot_mid_call(directory: Path, call_id: str, chunk_bytes: int = 256 * 1024) -> None:
    kill(start_bot_mid_call(directory, call_id, chunk_bytes))


@pytest.mark.anyio
async def test_a_killed_bots_call_is_finalized_once_as_observer_lost(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    kill_bot_mid_call(data_dir, "orphan-1")
    with sqlite3.connect(data_dir / "wal.sqlite") as conn:
        assert conn.execute("SELECT state FROM calls").fetchall() == [("open",)]
    conn.close()

    first, second = await asyncio.gather(
        Drainer(data_dir, KEY, dev_server.base_url, QUICK).run_once(),
        Drainer(data_dir, KEY, dev_server.base_url, QUICK).run_once(),
    )
    assert sorted(first.finalized + second.finalized) == ["orphan-1"], "finalized exactly once"
    closed = [e for e in stored_events(data_dir, "orphan-1") if isinstance(e, CallClosed)]
    assert [e.reason for e in closed] == ["observer-lost"]
    call = dev_server.call("orphan-1")
    assert call["callEnded"]["callEndedReason"] == "observer-lost"
    assert [t["content"] for t in call["callEnded"]["transcript"]][:2] == ["Hello there.", "Hi."]
    assert call["eventCounts"] == {"callStarted": 1, "callEnded": 1}
    assert set(delivery_states(data_dir).values()) == {"delivered"}


@pytest.mark.anyio
async def test_three_drainer_processes_deliver_each_row_once(
    data_dir: Path, dev_server: RunningDevServer, tmp_path: Path
) -> None:
    for n in range(6):
        await record(data_dir, f"multi-{n}", n)
    # All three start together, each with one request in flight at a time, and the
    # server holds the first three requests until all three are in flight: so each
    # process delivers at least one row, whichever the scheduler runs first.
    dev_server.configure(rendezvous=3)
    gate = tmp_path / "go"
    procs = [run_worker(data_dir, dev_server.base_url, gate=gate) for _ in range(3)]
    for proc in procs:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
    gate.touch()
    results = [finish(p) for p in procs]
    assert [code for code, _ in results] == [0, 0, 0]
    reports = [json.loads(out) for _, out in results]
    rows = len(delivery_states(data_dir))
    assert sum(r["delivered"] for r in reports) == rows, (
        "every row delivered by exactly one drainer"
    )
    assert [r["delivered"] > 0 for r in reports] == [True] * 3, f"the work was shared: {reports}"
    posts: dict[str, int] = {}
    for request in dev_server.requests():
        if request["method"] == "POST":
            posts[request["idempotencyKey"]] = posts.get(request["idempotencyKey"], 0) + 1
    assert set(posts.values()) == {1}, "no request was sent twice"
    for n in range(6):
        assert_arrived_whole(dev_server, data_dir, f"multi-{n}")


@pytest.mark.anyio
@pytest.mark.parametrize("crash_at", ["after-upload:3", "after-call-ended:1"])
async def test_a_drainer_killed_mid_delivery_is_finished_by_the_next_with_the_same_keys(
    data_dir: Path, dev_server: RunningDevServer, crash_at: str
) -> None:
    await record(data_dir, "killed-1")
    code, _ = finish(run_worker(data_dir, dev_server.base_url, crash_at=crash_at))
    assert code == -signal.SIGKILL
    assert (
        "pending" in delivery_states(data_dir).values()
        or "leased" in delivery_states(data_dir).values()
    )

    # The dead drainer's leases (60 s) go back at once: its process is gone.
    report = await Drainer(data_dir, KEY, dev_server.base_url, QUICK).run_once(budget_s=30)
    assert report.complete, str(report)
    call = assert_arrived_whole(dev_server, data_dir, "killed-1")
    keys = call["idempotencyKeys"]
    if crash_at.startswith("after-call-ended"):
        assert keys["killed-1:call-ended"] == 2, "sent again with the same key, recorded once"
    else:
        # The third upload's chunk (with others of the same claim, their uploads in flight
        # when the drainer died: which ones depends on how its workers took turns).
        again = sorted(n for n, chunk in call["chunks"].items() if chunk["puts"] == 2)
        assert again, "the chunk uploaded when the drainer died was PUT again"
        assert {n: chunk["puts"] for n, chunk in call["chunks"].items()} == {
            n: 2 if n in again else 1 for n in call["chunks"]
        }, "to the same object, and no other chunk twice"
        assert all(keys[f"killed-1:chunk:{n}:url:0"] == 2 for n in again), (
            "its URL was asked for again with the same key"
        )


@pytest.mark.anyio
async def test_a_call_of_another_host_waits_for_its_heartbeat_grace_then_ends_once(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    kill_bot_mid_call(data_dir, "elsewhere", chunk_bytes=8000)
    # The same call, as if a bot on another host (another pod, same volume) owned it: its
    # pid means nothing here, only its heartbeat's age does.
    heartbeat = time.time_ns() // 1000 - 60_000_000  # a minute ago
    with sqlite3.connect(data_dir / "wal.sqlite") as conn:
        (token,) = conn.execute("SELECT owner_token FROM calls WHERE id = 'elsewhere'").fetchone()
        identity = parse_identity(token)
        assert identity is not None
        # Another machine: another host name and another boot, so its pid means nothing here.
        elsewhere = replace(identity, boot_id="another-boot").token()
        conn.execute(
            "UPDATE calls SET owner_host = 'another-host', owner_token = ?, heartbeat_at = ?"
            " WHERE id = ?",
            (elsewhere, heartbeat, "elsewhere"),
        )
    conn.close()

    patient = replace(QUICK, orphan_grace_s=120.0)  # the heartbeat is younger than the grace
    early = await Drainer(data_dir, KEY, dev_server.base_url, patient).run_once(budget_s=30)
    assert early.finalized == []
    with sqlite3.connect(data_dir / "wal.sqlite") as conn:
        assert conn.execute("SELECT state FROM calls").fetchall() == [("open",)]
    conn.close()
    assert dev_server.call("elsewhere")["callEnded"] is None, "not ended while it may live"

    expired = replace(QUICK, orphan_grace_s=30.0)  # now the heartbeat is older than the grace
    first, second = await asyncio.gather(
        Drainer(data_dir, KEY, dev_server.base_url, expired).run_once(budget_s=30),
        Drainer(data_dir, KEY, dev_server.base_url, expired).run_once(budget_s=30),
    )
    assert sorted(first.finalized + second.finalized) == ["elsewhere"], "finalized exactly once"
    closed = [e for e in stored_events(data_dir, "elsewhere") if isinstance(e, CallClosed)]
    assert [e.reason for e in closed] == ["observer-lost"]
    call = assert_arrived_whole(dev_server, data_dir, "elsewhere")
    assert call["callEnded"]["callEndedReason"] == "observer-lost"


@pytest.mark.anyio
async def test_a_live_bots_call_is_left_alone_until_its_process_dies(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    # Its heartbeat has stalled (an hour between beats, the last one a day ago), as a
    # starved writer thread's would: only the pid, alive in our own namespace, keeps it.
    bot = start_bot_mid_call(data_dir, "alive", PIPECAT_ROARK_HEARTBEAT_S="3600")
    day_ago = time.time_ns() // 1000 - 86_400_000_000
    with sqlite3.connect(data_dir / "wal.sqlite") as conn:
        conn.execute("UPDATE calls SET heartbeat_at = ? WHERE id = 'alive'", (day_ago,))
    conn.close()
    try:  # its owner lives on this host: no heartbeat age makes it an orphan
        stale = replace(QUICK, orphan_grace_s=0.0)
        report = await Drainer(data_dir, KEY, dev_server.base_url, stale).run_once(budget_s=30)
        assert report.finalized == []
        assert dev_server.call("alive")["callEnded"] is None
    finally:
        kill(bot)
    report = await Drainer(data_dir, KEY, dev_server.base_url, QUICK).run_once(budget_s=30)
    assert report.finalized == ["alive"]
    assert dev_server.call("alive")["callEnded"]["callEndedReason"] == "observer-lost"
