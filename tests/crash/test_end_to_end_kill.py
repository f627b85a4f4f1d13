"""The whole promise under SIGKILL: a real bot (recording and delivering), a real
`pipecat-roark drain`, the dev server on 127.0.0.1; kill the bot and then the drainer at
seeded points, drain once more, and every call is at the server exactly once, whole.

One scenario = one call. Its seed picks how the bot's call ends (hangs mid-call, or ends
and is killed while delivering), where the bot dies (after a seeded step, or at a named
crash point), and whether the recovering drainer is killed too. The seed is in every
assertion message; `scripts/test --long` runs hundreds and prints a table.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devserver_fixture import RunningDevServer, running_dev_server
from pipecat_roark.events import ChunkRecorded
from pipecat_roark.store import connect
from pipecat_roark.timeline import assemble_call_ended, assemble_call_started, load_events
from pipecat_roark.wire import encode

BOT = Path(__file__).with_name("capture_bot.py")
KEY = "rk_crash_key"  # the bot's (capture_bot.KEY)
BOT_POINTS = ["before-commit", "chunk-half-written", "chunk-file-durable", "after-upload"]
DRAIN_POINTS = ["after-upload", "after-call-ended"]
SCRIPT_STEPS = 12  # capture_bot.seeded_script


@dataclass
class Plan:
    seed: int
    end: str  # "hang": killed mid-call; "end": the call ends, killed while delivering
    bot_kill: str  # "step:N[+ms]" or a crash point "name:n"
    drain_kill: str | None  # a crash point of the first recovering drain, or None

    @classmethod
    def of(cls, seed: int) -> Plan:
        rng = random.Random(seed)
        end = rng.choice(["hang", "hang", "end"])
        if end == "end" or rng.random() < 0.4:
            point = rng.choice(BOT_POINTS if end == "hang" else [*BOT_POINTS, "after-call-ended"])
            bot_kill = f"{point}:{rng.randint(1, 6)}"
        else:
            bot_kill = f"step:{rng.randint(1, 10)}+{rng.choice([0, 0, 2, 10, 30])}"
        drain_kill = None
        if rng.random() < 0.5:
            drain_kill = f"{rng.choice(DRAIN_POINTS)}:{rng.randint(1, 4)}"
        return cls(seed, end, bot_kill, drain_kill)

    def kill_points(self) -> int:
        return 1 + (self.drain_kill is not None)


def env_for(directory: Path, base_url: str, crash_at: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROARK_", "PIPECAT_ROARK"))}
    env |= {
        "PIPECAT_ROARK_DIR": str(directory),
        "ROARK_API_KEY": KEY,
        "ROARK_BASE_URL": base_url,
        "PYTHONUNBUFFERED": "1",
    }
    if crash_at:
        env["PIPECAT_ROARK_CRASH_AT"] = crash_at
    return env


def run_bot(plan: Plan, directory: Path, call_id: str, base_url: str) -> dict[str, Any]:
    """The bot's last report before it died (or ended)."""
    named = not plan.bot_kill.startswith("step:")
    proc = subprocess.Popen(
        [sys.executable, str(BOT), str(directory), call_id, str(plan.seed), plan.end, base_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env_for(directory, base_url, plan.bot_kill if named else None),
        text=True,
    )
    assert proc.stdout is not None
    # A named point may never be reached: a hanging call is then killed after its last step.
    stop_after, delay_ms = (SCRIPT_STEPS if plan.end == "hang" else 10_000), 0
    if not named:
        step, _, delay = plan.bot_kill.removeprefix("step:").partition("+")
        stop_after, delay_ms = int(step), int(delay)
    last: dict[str, Any] = {
        "step": 0,
        "events": 0,
        "digest": hashlib.sha256(b"").hexdigest(),
        "emitted": [],
    }
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break  # it died at its crash point, or the call ended and it exited
            last = json.loads(line)
            if last["step"] >= stop_after:
                time.sleep(delay_ms / 1000)
                break
        if plan.end == "hang" or not named:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=90)  # a bot whose call ended exits by itself after its exit drain
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    return last


def drain(directory: Path, base_url: str, crash_at: str | None) -> int:
    done = subprocess.run(
        [sys.executable, "-m", "pipecat_roark.cli", "drain", "--timeout", "60"],
        capture_output=True,
        text=True,
        env=env_for(directory, base_url, crash_at),
        timeout=180,
        check=False,
    )
    if done.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"drain failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.returncode


def run_scenario(plan: Plan, root: Path, server: RunningDevServer) -> dict[str, Any]:
    directory = root / f"seed-{plan.seed}"
    call_id = f"e2e-{plan.seed}"
    report = run_bot(plan, directory, call_id, server.base_url)
    drain_code = None
    if plan.drain_kill:
        drain_code = drain(directory, server.base_url, plan.drain_kill)
    assert drain(directory, server.base_url, None) == 0, f"seed {plan.seed}: final drain"
    chunks = check_arrival(plan.seed, directory, call_id, report, server)
    return {
        "kills": 1 + (drain_code == -signal.SIGKILL),
        "chunks": chunks,
        "reason": server.call(call_id)["callEnded"]["callEndedReason"] if chunks >= 0 else "-",
    }


def check_arrival(
    seed: int, directory: Path, call_id: str, report: dict[str, Any], server: RunningDevServer
) -> int:
    """-1 when the bot died before the call's first commit (then nothing may arrive)."""
    if not (directory / "wal.sqlite").exists():
        assert call_id not in {c["pipecatCallId"] for c in server.calls()}, f"seed {seed}"
        return -1
    conn = connect(directory, read_only=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)], f"seed {seed}"
        bodies = [
            b
            for (b,) in conn.execute(
                "SELECT body FROM events WHERE call_id = ? ORDER BY id", (call_id,)
            )
        ]
        events = load_events(conn, call_id)
        chunks = conn.execute(
            "SELECT idx, path, sha256 FROM chunks WHERE call_id = ? ORDER BY idx", (call_id,)
        ).fetchall()
        states = Counter(r[0] for r in conn.execute("SELECT state FROM deliveries"))
    finally:
        conn.close()
    # What the bot saw committed is still there, unchanged.
    assert len(bodies) >= report["events"], f"seed {seed}: committed events lost"
    prefix = hashlib.sha256(b"".join(bodies[: report["events"]])).hexdigest()
    assert prefix == report["digest"], f"seed {seed}: committed events changed"
    if not bodies:
        assert call_id not in {c["pipecatCallId"] for c in server.calls()}, f"seed {seed}"
        return -1
    assert set(states) == {"delivered"}, f"seed {seed}: {states}"

    call = server.call(call_id)
    assert call["eventCounts"] == {"callStarted": 1, "callEnded": 1}, f"seed {seed}"
    assert call["callStarted"] == json.loads(encode(assemble_call_started(call_id, events)))
    assert call["callEnded"] == json.loads(encode(assemble_call_ended(call_id, events))), (
        f"seed {seed}: call-ended differs from the stored timeline"
    )
    # Every chunk the AudioBufferProcessor emitted before the last report is durable,
    # identical, and arrived byte for byte, in order.
    emitted = report["emitted"]
    assert len(chunks) >= len(emitted), f"seed {seed}: emitted audio not durable"
    assert [c[2] for c in chunks[: len(emitted)]] == emitted, f"seed {seed}: chunk bytes"
    assert [e.index for e in events if isinstance(e, ChunkRecorded)] == [c[0] for c in chunks]
    assert sorted(int(i) for i in call["chunks"]) == [c[0] for c in chunks], f"seed {seed}"
    for idx, path, sha in chunks:
        data = (directory / path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha == call["chunks"][str(idx)]["sha256"]
    if chunks:
        audio = b"".join((directory / path).read_bytes() for _, path, _ in chunks)
        assert server.recording(call_id)[44:] == audio, f"seed {seed}: recording differs"
    keys = call["idempotencyKeys"]
    assert all(k.startswith(f"{call_id}:") for k in keys), f"seed {seed}"
    return len(chunks)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDevServer]:
    with running_dev_server(tmp_path_factory.mktemp("e2e-server")) as running:
        yield running


QUICK_SEEDS = [1, 2, 4, 6, 9, 15]


@pytest.mark.parametrize("seed", QUICK_SEEDS)
def test_a_call_survives_kills_of_its_bot_and_drainer(
    seed: int, tmp_path: Path, server: RunningDevServer
) -> None:
    run_scenario(Plan.of(seed), tmp_path, server)


def test_the_quick_seeds_cover_every_kind_of_kill() -> None:
    plans = [Plan.of(s) for s in QUICK_SEEDS]
    assert {p.end for p in plans} == {"hang", "end"}
    assert any(p.bot_kill.startswith("step:") for p in plans)
    assert any(not p.bot_kill.startswith("step:") for p in plans)
    assert any(p.drain_kill for p in plans)


@pytest.mark.long
def test_hundreds_of_kill_points_lose_and_duplicate_nothing(
    tmp_path: Path, server: RunningDevServer, capsys: pytest.CaptureFixture[str]
) -> None:
    seeds = range(1000, 1000 + int(os.environ.get("E2E_SCENARIOS", "260")))
    plans = [Plan.of(s) for s in seeds]
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda p: run_scenario(p, tmp_path, server), plans))
    kills = sum(r["kills"] for r in results)
    table = Counter(
        (p.end, p.bot_kill.split(":")[0], r["reason"]) for p, r in zip(plans, results, strict=True)
    )
    lines = [
        f"{len(plans)} calls, {kills} SIGKILLs, 0 lost, 0 duplicated",
        f"{'call ends':<10} {'bot killed at':<20} {'arrived with reason':<22} calls",
    ]
    for (end, where, reason), count in sorted(table.items()):
        lines.append(f"{end:<10} {where:<20} {reason:<22} {count}")
    with capsys.disabled():  # the table is the point of the long run: always show it
        print("\n" + "\n".join(lines))
    assert kills >= 300, f"only {kills} kill points"
