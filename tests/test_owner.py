"""Owner identities: what makes a pid meaningful, who may judge it, and how old rows and
bad settings are handled. Real processes and real SQLite files; the namespace cases that
need ``unshare`` are in test_liveness.py."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers import LogCapture
from pipecat_roark import call_ending, faultpoints, outbox
from pipecat_roark.events import CallOpened
from pipecat_roark.ops import OpenOp
from pipecat_roark.owner import (
    ENV_HEARTBEAT_S,
    ENV_ORPHAN_GRACE_S,
    Identity,
    Owner,
    current_owner,
    heartbeat_interval_s,
    orphan_grace_s,
    owner_is_gone,
    parse_identity,
)
from pipecat_roark.store import connect, now_us
from pipecat_roark.writer import Writer

SHOW_OWNER = (
    "import sys; from pipecat_roark.owner import current_owner; "
    "print(current_owner().token, flush=True); sys.stdin.read()"
)


@contextmanager
def live_owner() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A live process that printed its own owner token; it lives until the block ends."""
    with subprocess.Popen(
        [sys.executable, "-c", SHOW_OWNER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        try:
            yield proc, proc.stdout.readline().strip()
        finally:
            proc.kill()


def state_of(pid: int) -> str:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rfind(")") + 2 :].split()[0]


def test_an_owner_token_records_what_makes_its_pid_meaningful() -> None:
    identity = parse_identity(current_owner().token)
    assert identity is not None
    assert identity.boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert f"pid:[{identity.pid_ns}]" == str(Path("/proc/self/ns/pid").readlink())
    stat = Path("/proc/self/stat").read_text()
    assert identity.start == stat[stat.rfind(")") + 2 :].split()[19]
    assert identity.heartbeat_ms == 5000
    assert parse_identity(identity.token()) == identity


def test_a_process_of_our_namespace_is_judged_by_its_pid_even_unreaped() -> None:
    with live_owner() as (proc, token):
        assert owner_is_gone("any-host", proc.pid, token) is False
        proc.send_signal(signal.SIGKILL)
        for _ in range(1000):  # bounded: the kernel makes it a zombie at once
            if state_of(proc.pid) == "Z":
                break
            time.sleep(0.01)
        assert state_of(proc.pid) == "Z", "killed but not reaped yet"
        assert owner_is_gone("any-host", proc.pid, token) is True
    assert owner_is_gone("any-host", proc.pid, token) is True


def test_a_reused_pid_is_not_taken_for_the_owner() -> None:
    with live_owner() as (proc, token):
        identity = parse_identity(token)
        assert identity is not None
        earlier = Identity(identity.boot_id, identity.pid_ns, "1", 5000, "").token()
        assert owner_is_gone("any-host", proc.pid, earlier) is True


def test_only_a_checker_of_the_same_boot_and_namespace_judges_by_pid() -> None:
    with live_owner() as (proc, token):
        identity = parse_identity(token)
        assert identity is not None
        for other in (
            Identity(identity.boot_id, "4026500000", identity.start, 5000, ""),  # another ns
            Identity("another-boot", identity.pid_ns, identity.start, 5000, ""),
            Identity("", "", identity.start, 5000, ""),  # no /proc where it was written
        ):
            assert owner_is_gone("same-host", proc.pid, other.token()) is None
            assert owner_is_gone("same-host", 999_999_999, other.token()) is None
        # A row written before identities existed: its pid proves nothing either.
        assert owner_is_gone(os.uname().nodename, 999_999_999, "12345:678") is None


def open_call(directory: Path, call_id: str, owner: Owner) -> int:
    """A call recorded by a real writer under ``owner``; returns its heartbeat time."""
    writer = Writer(directory, owner=owner)
    try:
        writer.submit(OpenOp(call_id, CallOpened(at=now_us(), agent_id="a"), None))
        assert writer.flush_sync(10)
    finally:
        writer.close()
    with sqlite3.connect(directory / "wal.sqlite") as conn:
        (heartbeat,) = conn.execute(
            "SELECT heartbeat_at FROM calls WHERE id = ?", (call_id,)
        ).fetchone()
    conn.close()
    return int(heartbeat)


@pytest.mark.parametrize(
    ("token", "grace_s", "ended_after_s"),
    [
        ("12345:678", 20.0, 20.0),  # an old row: heartbeat alone, the plain grace
        ("v2:other-boot:1:5:5000:", 20.0, 20.0),  # another host
        ("v2:other-boot:1:5:30000:", 20.0, 90.0),  # its heartbeats are every 30 s: 3 of them
    ],
)
def test_calls_judged_by_heartbeat_end_once_only_after_the_grace(
    tmp_path: Path, token: str, grace_s: float, ended_after_s: float
) -> None:
    heartbeat = open_call(tmp_path, "c", Owner("same-host", 1, token))
    conn = connect(tmp_path)
    try:
        grace_us = int(grace_s * 1e6)
        just_before = heartbeat + int(ended_after_s * 1e6) - 1
        assert call_ending.finalize_orphans(conn, now=just_before, grace_us=grace_us) == []
        after = heartbeat + int(ended_after_s * 1e6) + 1
        assert call_ending.finalize_orphans(conn, now=after, grace_us=grace_us) == ["c"]
        assert call_ending.finalize_orphans(conn, now=after + 1, grace_us=grace_us) == []
        row = conn.execute("SELECT state, end_reason FROM calls").fetchone()
        assert row == ("ended", "observer-lost")
    finally:
        conn.close()


def test_bad_liveness_settings_are_named_once_and_the_defaults_used(
    monkeypatch: pytest.MonkeyPatch, logs: LogCapture, tmp_path: Path
) -> None:
    monkeypatch.setenv(ENV_HEARTBEAT_S, "often")
    monkeypatch.setenv(ENV_ORPHAN_GRACE_S, "-3")
    assert heartbeat_interval_s() == 5.0
    assert orphan_grace_s() == 20.0
    [heartbeat_line] = logs.matching(ENV_HEARTBEAT_S)
    assert heartbeat_line == (
        f"pipecat-roark: {ENV_HEARTBEAT_S}='often' is not a number of seconds between 0 and "
        f"86400; using 5. Fix or unset {ENV_HEARTBEAT_S}"
    )
    [grace_line] = logs.matching(ENV_ORPHAN_GRACE_S)
    assert "'-3'" in grace_line and "using 20" in grace_line
    writer = Writer(tmp_path)  # recording goes on with the default
    try:
        assert writer.heartbeat_s == 5.0
        assert parse_identity(writer.owner.token).heartbeat_ms == 5000  # type: ignore[union-attr]
    finally:
        writer.close()
    monkeypatch.setenv(ENV_HEARTBEAT_S, "0.5")
    assert parse_identity(current_owner(heartbeat_interval_s()).token).heartbeat_ms == 500  # type: ignore[union-attr]


def test_one_call_that_cannot_be_finalized_keeps_no_other_open(
    tmp_path: Path, logs: LogCapture
) -> None:
    elsewhere = Owner("same-host", 1, "v2:other-boot:1:5:5000:")
    heartbeat = max(open_call(tmp_path, call_id, elsewhere) for call_id in ("a", "b", "c"))
    later = heartbeat + 60_000_000
    conn = connect(tmp_path)
    try:
        faultpoints.inject("drain:finalize-orphan", RuntimeError("boom"), call_id="b")
        try:
            assert call_ending.finalize_orphans(conn, now=later, grace_us=20_000_000) == ["a", "c"]
        finally:
            faultpoints.clear()
        [line] = logs.matching("could not finalize call 'b'")
        assert "(RuntimeError: boom)" in line and "tried again" in line
        assert conn.execute("SELECT state FROM calls WHERE id = 'b'").fetchone() == ("open",)
        assert call_ending.finalize_orphans(conn, now=later, grace_us=20_000_000) == ["b"]
        states = conn.execute("SELECT id, state, end_reason FROM calls ORDER BY id").fetchall()
        assert states == [(c, "ended", "observer-lost") for c in ("a", "b", "c")]
    finally:
        conn.close()


def test_the_exit_drain_takes_back_only_the_leases_of_its_own_process(tmp_path: Path) -> None:
    for call_id in ("a", "b", "c", "d"):
        open_call(tmp_path, call_id, current_owner())
    me = current_owner()
    identity = parse_identity(me.token)
    assert identity is not None
    other_ns = Identity(identity.boot_id, "4026500000", identity.start, 5000, "").token()
    holders = {
        "a": outbox.lease_owner_id(me, "cancelled-drainer"),
        "b": outbox.lease_owner_id(Owner(me.host, me.pid, identity.token()), "other-heartbeat"),
        "c": outbox.lease_owner_id(Owner(me.host, me.pid, other_ns), "pid-1-elsewhere"),
        "d": outbox.lease_owner_id(Owner("other-host", me.pid, me.token), "same-pid-elsewhere"),
    }
    conn = connect(tmp_path)
    try:
        for call_id, holder in holders.items():
            [row] = outbox.claim(
                conn,
                owner=holder,
                now=now_us(),
                lease_us=60_000_000,
                limit=1,
                key_fp=None,
                call_id=call_id,
            )
            assert row.call_id == call_id
        assert outbox.release_process_leases(conn, me) == 2
        states = dict(conn.execute("SELECT call_id, state FROM deliveries").fetchall())
        assert states == {"a": "pending", "b": "pending", "c": "leased", "d": "leased"}
    finally:
        conn.close()
