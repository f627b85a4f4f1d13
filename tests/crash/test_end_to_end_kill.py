"""The whole promise under SIGKILL: a real bot (recording and delivering), a real
`pipecat-roark drain`, the dev server on 127.0.0.1; kill the bot and then the drainer at
seeded points, drain once more, and every call is at the server exactly once, whole.

One scenario = one call. Its seed picks how the bot's call ends (hangs mid-call, or ends
and is killed while delivering), where the bot dies (after a seeded step, or at a named
crash point), and whether the recovering drainer is killed too. The seed is in every
assertion message; `scripts/test --long` runs hundreds and prints a table.

A kill is counted only when it happened: the process's exit status says it died of
SIGKILL, and where (its own crash point, or our signal after a step). A plan whose
point a call can never reach (call-ended is sent once, so `after-call-ended:2` never
comes) is not made; a point that this run did not reach is reported as "not killed".
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
from pipecat_roark.events_table import load_events
from pipecat_roark.store import connect
from pipecat_roark.timeline import assemble_call_ended, assemble_call_started
from pipecat_roark.wire import encode
from test_drain import assert_in_order

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
            bot_kill = f"{point}:{reachable(point, rng.randint(1, 6))}"
        else:
            bot_kill = f"step:{rng.randint(1, 10)}+{rng.choice([0, 0, 2, 10, 30])}"
        drain_kill = None
        if rng.random() < 0.5:
            point = rng.choice(DRAIN_POINTS)
            drain_kill = f"{point}:{reachable(point, rng.randint(1, 4))}"
        return cls(seed, end, bot_kill, drain_kill)

    def planned_kills(self) -> int:
        return 1 + (self.drain_kill is not None)


def reachable(point: str, n: int) -> int:
    """One call sends call-ended once: its n-th time (n > 1) never comes."""
    return 1 if point == "after-call-ended" else n


@dataclass
class Outcome:
    """How one process of a scenario ended: ``killed_at`` is None when it was not killed."""

    returncode: int
    killed_at: str | None


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


def run_bot(
    plan: Plan, directory: Path, call_id: str, base_url: str
) -> tuple[dict[str, Any], Outcome]:
    """The bot's last report before it died (or ended), and how it ended."""
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
    ours = False  # whether the SIGKILL is ours (after a step) rather than its crash point's
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break  # it died at its crash point, or the call ended and it exits
            last = json.loads(line)
            if last["step"] >= stop_after:
                time.sleep(delay_ms / 1000)
                ours = plan.end == "hang" or not named
                break
        else:  # the deadline passed with the bot still talking: kill it, and say so
            ours = plan.end == "hang" or not named
        if ours:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=90)  # a bot whose call ended exits by itself after its exit drain
    finally:
        if proc.poll() is None:  # only a bot that outlived every deadline gets here
            proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    return last, outcome(proc.returncode, plan.bot_kill, ours=ours, step=int(last["step"]))


def outcome(returncode: int, planned: str, *, ours: bool, step: int = 0) -> Outcome:
    """Where a process died: its planned crash point, or our SIGKILL after ``step``."""
    if returncode != -signal.SIGKILL:
        return Outcome(returncode, None)
    if ours:
        return Outcome(returncode, planned if planned.startswith("step:") else f"step:{step}")
    return Outcome(returncode, planned)


def drain(directory: Path, base_url: str, crash_at: str | None) -> int:
    """Exit status of one `pipecat-roark drain`: 0, or -SIGKILL at ``crash_at``."""
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


@dataclass
class Result:
    plan: Plan
    bot: Outcome
    drain: Outcome | None
    chunks: int
    reason: str

    def kills(self) -> list[str]:
        """The kills that happened, as "bot@point" / "drain@point"."""
        out = [f"bot@{self.bot.killed_at.split(':')[0]}"] if self.bot.killed_at else []
        if self.drain is not None and self.drain.killed_at:
            out.append(f"drain@{self.drain.killed_at.split(':')[0]}")
        return out


def run_scenario(plan: Plan, root: Path, server: RunningDevServer) -> Result:
    directory = root / f"seed-{plan.seed}"
    call_id = f"e2e-{plan.seed}"
    report, bot = run_bot(plan, directory, call_id, server.base_url)
    drained = None
    if plan.drain_kill:
        code = drain(directory, server.base_url, plan.drain_kill)
        drained = outcome(code, plan.drain_kill, ours=False)
    assert drain(directory, server.base_url, None) == 0, f"seed {plan.seed}: final drain"
    chunks = check_arrival(plan.seed, directory, call_id, report, server)
    reason = server.call(call_id)["callEnded"]["callEndedReason"] if chunks >= 0 else "-"
    return Result(plan, bot, drained, chunks, reason)


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
            "SELECT idx, size, sha256 FROM chunks WHERE call_id = ? ORDER BY idx", (call_id,)
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
    # The chunk files are gone once Roark has the whole call: each row's sha256 (hashed from
    # the bytes when they were made durable) is checked against the server's recording.
    recording = server.recording(call_id)[44:] if chunks else b""
    assert len(recording) == sum(size for _, size, _ in chunks), f"seed {seed}: recording size"
    offset = 0
    for idx, size, sha in chunks:
        piece = recording[offset : offset + size]
        assert hashlib.sha256(piece).hexdigest() == sha == call["chunks"][str(idx)]["sha256"], (
            f"seed {seed}: recording differs at chunk {idx}"
        )
        offset += size
    keys = call["idempotencyKeys"]
    assert all(k.startswith(f"{call_id}:") for k in keys), f"seed {seed}"
    assert_in_order(call, len(chunks))
    return len(chunks)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDevServer]:
    # Strict order: a recovery that sent a chunk before call-started, or call-ended before
    # a chunk, is refused (409) and the call cannot arrive whole.
    with running_dev_server(tmp_path_factory.mktemp("e2e-server"), strict_order=True) as running:
        yield running


# Each kind below, and every kill in them reached deterministically (no race decides it).
QUICK_SEEDS = [1, 2, 6, 15, 17, 37, 74]


def kind(plan: Plan) -> str:
    """What a plan kills: how the call ends, where the bot dies, where the drainer dies."""
    bot = "step" if plan.bot_kill.startswith("step:") else plan.bot_kill.split(":")[0]
    drain = plan.drain_kill.split(":")[0] if plan.drain_kill else "-"
    return f"{plan.end} / bot {bot} / drain {drain}"


@pytest.mark.parametrize("seed", QUICK_SEEDS)
def test_a_call_survives_kills_of_its_bot_and_drainer(
    seed: int, tmp_path: Path, server: RunningDevServer
) -> None:
    plan = Plan.of(seed)
    result = run_scenario(plan, tmp_path, server)
    # The kills happened, where they were planned: not merely planned.
    assert result.bot == Outcome(-signal.SIGKILL, plan.bot_kill), f"seed {seed}: bot {result.bot}"
    if plan.drain_kill:
        assert result.drain == Outcome(-signal.SIGKILL, plan.drain_kill), f"seed {seed}"
    assert len(result.kills()) == plan.planned_kills()


def test_the_quick_seeds_cover_every_kind_of_kill() -> None:
    """With the test above (each planned kill happened), every kind of kill is exercised."""
    assert sorted(kind(Plan.of(s)) for s in QUICK_SEEDS) == [
        "end / bot after-call-ended / drain -",  # the call ended; killed while delivering
        "end / bot after-call-ended / drain after-call-ended",
        "end / bot after-upload / drain -",
        "end / bot before-commit / drain -",  # killed mid-call, while the call would end
        "hang / bot before-commit / drain -",
        "hang / bot chunk-file-durable / drain -",
        "hang / bot step / drain after-call-ended",
    ]


def test_no_plan_kills_at_a_point_a_call_never_reaches() -> None:
    plans = [Plan.of(s) for s in range(1000, 1260)]
    ended = [p.bot_kill for p in plans if p.bot_kill.startswith("after-call-ended")]
    ended += [p.drain_kill for p in plans if (p.drain_kill or "").startswith("after-call-ended")]
    assert ended and set(ended) == {"after-call-ended:1"}


def test_a_kill_is_counted_only_when_the_process_died_of_sigkill() -> None:
    assert outcome(0, "after-call-ended:1", ours=False) == Outcome(0, None)
    assert outcome(-signal.SIGKILL, "after-upload:2", ours=False).killed_at == "after-upload:2"
    assert outcome(-signal.SIGKILL, "after-upload:9", ours=True, step=12).killed_at == "step:12"
    assert outcome(-signal.SIGKILL, "step:3+2", ours=True, step=3).killed_at == "step:3+2"


@pytest.mark.long
@pytest.mark.timeout(4 * 3600)
def test_hundreds_of_kill_points_lose_and_duplicate_nothing(
    tmp_path: Path, server: RunningDevServer, capsys: pytest.CaptureFixture[str]
) -> None:
    seeds = range(1000, 1000 + int(os.environ.get("E2E_SCENARIOS", "260")))
    plans = [Plan.of(s) for s in seeds]
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda p: run_scenario(p, tmp_path, server), plans))
    lines = kill_table(results)
    with capsys.disabled():  # the table is the point of the long run: always show it
        print("\n" + "\n".join(lines))
    # A hanging bot always dies of SIGKILL (its point's, or ours after its last step).
    assert all(r.bot.killed_at for r in results if r.plan.end == "hang"), "\n".join(lines)


def kill_table(results: list[Result]) -> list[str]:
    """Planned kills, kills that happened (exit status -9), and where they happened."""
    planned = sum(r.plan.planned_kills() for r in results)
    happened = Counter(k for r in results for k in r.kills())
    missed = Counter(
        f"{who}@{r.plan.bot_kill if who == 'bot' else r.plan.drain_kill}"
        for r in results
        for who, o in (("bot", r.bot), ("drain", r.drain))
        if o is not None and o.killed_at is None
    )
    reasons = Counter((r.plan.end, r.reason) for r in results)
    lines = [
        f"{len(results)} calls, {planned} planned kills, {sum(happened.values())} SIGKILLs "
        f"that happened (exit status -9), 0 lost, 0 duplicated",
        f"{'killed at':<32} kills",
    ]
    lines += [f"{where:<32} {n}" for where, n in sorted(happened.items())]
    lines += [f"not killed: {where:<20} {n}" for where, n in sorted(missed.items())]
    lines.append(f"{'call ends':<10} {'arrived with reason':<22} calls")
    lines += [f"{end:<10} {reason:<22} {n}" for (end, reason), n in sorted(reasons.items())]
    return lines
