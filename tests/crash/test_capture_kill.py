"""SIGKILL a real bot mid-call: the database opens cleanly and keeps every committed event.

The bot (capture_bot.py) reports through a pipe what it saw committed after each step;
we kill it at a seeded point (sometimes right after a report, sometimes a few
milliseconds into the next step) and hold the database to that report. The seed is in
the test id, so a failure names the exact run to repeat.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipecat_roark.events import ChunkRecorded, UserText
from pipecat_roark.events_table import load_events
from pipecat_roark.store import connect
from pipecat_roark.timeline import assemble_call_ended

BOT = Path(__file__).with_name("capture_bot.py")
REPORT_DEADLINE_S = 60.0


def run_and_kill(directory: Path, seed: int, crash_at: str | None = None) -> dict[str, object]:
    """Start the bot, read its reports up to a seeded step, SIGKILL it, return the last report.

    With ``crash_at`` the bot kills itself at that named point (crashpoints.py) instead.
    """
    rng = random.Random(seed)
    kill_after_step = rng.randint(1, 10) if crash_at is None else 10_000
    extra_delay_s = rng.choice([0.0, 0.0, 0.002, 0.01, 0.03])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if crash_at is not None:
        env["PIPECAT_ROARK_CRASH_AT"] = crash_at
    proc = subprocess.Popen(
        [sys.executable, str(BOT), str(directory), "call-x", str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    assert proc.stdout is not None
    last: dict[str, object] | None = None
    deadline = time.monotonic() + REPORT_DEADLINE_S
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            last = json.loads(line)
            if last["step"] >= kill_after_step:
                break
        if extra_delay_s:
            time.sleep(extra_delay_s)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    if crash_at is None:
        assert last is not None, f"seed {seed}: the bot reported nothing before the deadline"
    return last or {
        "step": 0,
        "events": 0,
        "digest": hashlib.sha256(b"").hexdigest(),
        "emitted": [],
    }


def check_database(directory: Path, seed: int, report: dict[str, object]) -> None:
    conn = connect(directory, read_only=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)], f"seed {seed}"
        bodies = [
            b
            for (b,) in conn.execute("SELECT body FROM events WHERE call_id = 'call-x' ORDER BY id")
        ]
        reported = int(report["events"])  # type: ignore[call-overload]
        assert len(bodies) >= reported, f"seed {seed}: committed events were lost"
        prefix = hashlib.sha256(b"".join(bodies[:reported])).hexdigest()
        assert prefix == report["digest"], f"seed {seed}: committed events changed"

        chunks = conn.execute(
            "SELECT idx, path, size, sha256 FROM chunks WHERE call_id = 'call-x' ORDER BY idx"
        ).fetchall()
        assert [c[0] for c in chunks] == list(range(len(chunks))), f"seed {seed}: chunk gap"
        emitted = report["emitted"]
        assert isinstance(emitted, list)
        for _idx, path, size, sha in chunks:
            data = (directory / path).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (size, sha), f"seed {seed}"
        # Every chunk reported durable (emitted before the last flush) is recorded, as
        # emitted; chunks after it may or may not have made it.
        assert [c[3] for c in chunks[: len(emitted)]] == emitted, (
            f"seed {seed}: {len(emitted)} chunks reported durable, "
            f"{len(chunks)} recorded, or their bytes differ"
        )
        events = load_events(conn, "call-x")
        recorded = [e.index for e in events if isinstance(e, ChunkRecorded)]
        assert recorded == [c[0] for c in chunks], f"seed {seed}: chunk rows and events disagree"
        if not events:  # killed before the call's first commit: nothing may be half there
            assert conn.execute("SELECT count(*) FROM calls").fetchone() == (0,)
            assert conn.execute("SELECT count(*) FROM deliveries").fetchone() == (0,)
            return
        assert conn.execute("SELECT state FROM calls WHERE id = 'call-x'").fetchone() == ("open",)
        assert conn.execute(
            "SELECT kind, state FROM deliveries WHERE call_id = 'call-x' AND kind != 'chunk'"
        ).fetchall() == [("call-started", "pending")]
        assert conn.execute(
            "SELECT count(*) FROM deliveries WHERE call_id = 'call-x' AND kind = 'chunk'"
        ).fetchone() == (len(chunks),)
    finally:
        conn.close()

    ended = assemble_call_ended("call-x", events)
    assert ended.call_ended_reason == "observer-lost"
    user_words = " ".join(e.text for e in events if isinstance(e, UserText))
    transcript_user = " ".join(t.content for t in ended.transcript or [] if t.role == "user")
    assert transcript_user == user_words, f"seed {seed}: user text lost in assembly"


@pytest.mark.parametrize("seed", [11, 23, 37])
def test_a_bot_killed_mid_call_leaves_every_committed_event(tmp_path: Path, seed: int) -> None:
    directory = tmp_path / "roark"
    report = run_and_kill(directory, seed)
    check_database(directory, seed, report)


@pytest.mark.parametrize(
    "crash_at",
    [
        "mid-migration:1",
        "before-commit:1",
        "before-commit:4",
        "chunk-half-written:2",
        "chunk-file-durable:1",
        "chunk-file-durable:3",
    ],
)
def test_a_bot_killed_at_a_named_point_leaves_a_consistent_database(
    tmp_path: Path, crash_at: str
) -> None:
    directory = tmp_path / "roark"
    report = run_and_kill(directory, 5, crash_at=crash_at)
    if crash_at.startswith("mid-migration"):
        raw = sqlite3.connect(directory / "wal.sqlite")
        try:  # the half-applied migration rolled back whole
            assert raw.execute("PRAGMA user_version").fetchone() == (0,)
            assert raw.execute("SELECT name FROM sqlite_master").fetchall() == []
        finally:
            raw.close()
        connect(directory).close()  # the next process migrates it
    check_database(directory, 5, report)


@pytest.mark.long
@pytest.mark.parametrize("seed", range(100, 140))
def test_many_kill_points(tmp_path: Path, seed: int) -> None:
    directory = tmp_path / "roark"
    report = run_and_kill(directory, seed)
    check_database(directory, seed, report)
