"""A killed bot's writer child still commits its calls: no drainer may end them meanwhile.

The bot (``tests/writer_process_bot.py``, ``writer_process=True``) is SIGKILLed while its
writer child is stopped (SIGSTOP) with the rest of the call in its pipe. The bot's pid is
dead, but the child lives and will commit those records once it runs again. A real
``pipecat-roark drain`` runs meanwhile, then the child is let go (SIGCONT), then another
drain: Roark must get everything the bot handed over, the call ended once, and nothing
recorded after it was finalized and delivered. A child killed with SIGKILL holds nothing:
its bot's call is finalized at once.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from devserver_fixture import RunningDevServer
from test_drain import assert_arrived_whole
from test_writer_process import (
    BOT,
    bot_env,
    exit_status,
    hand_the_rest_to_a_stopped_child,
    kill_and_reap,
    owners,
    reaper,
    report,
    tell,
)

pytestmark = pytest.mark.strict_order

CALL = "killed-bot-child-writes"
__all__ = ["reaper"]  # the fixture, imported for pytest to find


@dataclass
class KilledBot:
    """A bot SIGKILLed mid-call whose writer child is stopped with records in its pipe."""

    child: int
    flushed: list[str]
    """sha256 of the chunks the bot saw committed before it stopped the child."""
    handed: list[str]
    """sha256 of every chunk the bot handed to its child, in order."""
    delivery: int | None
    """The bot's delivery child, if it had one."""
    stderr: StderrReader | None
    """What the bot and its children write to their shared stderr, if the test reads it."""


def kill_bot(data_dir: Path, server: RunningDevServer, *, delivery: bool) -> KilledBot:
    """Start the bot, stop its writer child after three committed steps, let the bot hand
    over the rest (it waits in the child's pipe), then SIGKILL the bot. The child is left
    stopped. With ``delivery``, the bot delivers through its delivery child, whose stderr
    (shared by the bot's children) is read into ``KilledBot.stderr``."""
    bot = subprocess.Popen(
        [sys.executable, str(BOT), str(data_dir), CALL, *(["delivery-process"] * delivery)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if delivery else subprocess.DEVNULL,
        text=True,
        env=bot_env(data_dir, server),
    )
    stderr = None if bot.stderr is None else StderrReader(bot.stderr)
    try:
        return _stop_child_and_kill(bot, stderr)
    except BaseException:
        if stderr is not None:
            stderr.close(timeout=1.0)
        raise


class StderrReader:
    """Reads a pipe to its end on a thread, so no writer ever blocks on a full pipe."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._chunks: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while chunk := os.read(self._stream.fileno(), 65536):
            self._chunks.append(chunk.decode(errors="replace"))

    def text(self) -> str:
        return "".join(list(self._chunks))

    def close(self, timeout: float = 30.0) -> None:
        """Once every writer is gone, the thread reads to EOF and the pipe is closed; a
        writer still there (a failed test's) keeps the thread, which owns the pipe."""
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._stream.close()


def _stop_child_and_kill(bot: subprocess.Popen[str], stderr: StderrReader | None) -> KilledBot:
    try:
        child = int(report(bot)["child"])
        flushed: list[str] = []
        for step in (1, 2, 3):
            line = report(bot)
            assert (line["step"], line["flushed"]) == (step, True)
            flushed, delivery_pid = line["chunks"], line["delivery"]
            if step < 3:
                tell(bot, "go")
        assert len(flushed) >= 2, "some chunks were committed before the stop"
        assert (delivery_pid is not None) == (stderr is not None)
        handed = hand_the_rest_to_a_stopped_child(bot, child, flushed)
    finally:
        kill_and_reap(bot)
    assert bot.returncode == -signal.SIGKILL
    return KilledBot(child, flushed, handed, delivery_pid, stderr)


def end_children(bot: KilledBot) -> None:
    """Kill and reap what the test left of the bot's children."""
    for pid in (bot.child, bot.delivery):
        if pid is not None and Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
            exit_status(pid)
    if bot.stderr is not None:
        bot.stderr.close()


@pytest.fixture
def killed_bot(data_dir: Path, dev_server: RunningDevServer, reaper: None) -> Iterator[KilledBot]:
    """A bot killed while its writer child, stopped, still had records to commit."""
    bot = kill_bot(data_dir, dev_server, delivery=False)
    yield bot
    end_children(bot)


@pytest.fixture
def killed_delivering_bot(
    data_dir: Path, dev_server: RunningDevServer, reaper: None
) -> Iterator[KilledBot]:
    """The same, with a delivery child (``delivery_process=True``) that saw the bot die."""
    bot = kill_bot(data_dir, dev_server, delivery=True)
    yield bot
    end_children(bot)


def drain(data_dir: Path, dev_server: RunningDevServer) -> subprocess.CompletedProcess[str]:
    """One real ``pipecat-roark drain`` (a user's, after the bot died), to its end."""
    done = subprocess.run(
        [sys.executable, "-m", "pipecat_roark.cli", "drain", "--timeout", "60"],
        capture_output=True,
        text=True,
        env=bot_env(data_dir, dev_server),
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def call_state(data_dir: Path) -> str:
    with sqlite3.connect(data_dir / "wal.sqlite") as conn:
        (state,) = conn.execute("SELECT state FROM calls WHERE id = ?", (CALL,)).fetchone()
    conn.close()
    return str(state)


def dead_deliveries(data_dir: Path) -> list[str]:
    with sqlite3.connect(data_dir / "wal.sqlite") as conn:
        rows = conn.execute("SELECT idempotency_key FROM deliveries WHERE state = 'dead'")
        dead = [str(key) for (key,) in rows]
    conn.close()
    return dead


def delivered_shas(call: dict[str, object]) -> list[str]:
    chunks = call["chunks"]
    assert isinstance(chunks, dict)
    return [chunks[str(i)]["sha256"] for i in range(len(chunks))]


def lock_file(data_dir: Path, token: str) -> Path:
    """The owner's lock file: named from a hash of its token, nothing else."""
    return data_dir / f"owner-{hashlib.sha256(token.encode()).hexdigest()[:32]}.lock"


def test_a_drain_waits_for_a_dead_bots_writer_child_and_roark_gets_all_it_was_handed(
    data_dir: Path, dev_server: RunningDevServer, killed_bot: KilledBot
) -> None:
    drain(data_dir, dev_server)  # the bot's pid is dead; its child lives, stopped
    assert call_state(data_dir) == "open", "not finalized while the child can still write it"
    assert dev_server.call(CALL)["callEnded"] is None

    ((_, _, token),) = owners(data_dir)
    (lock,) = data_dir.glob("owner-*.lock")
    assert lock == lock_file(data_dir, token), "named from a hash: no key, no token, no pid"
    mode = stat.S_IMODE(lock.stat().st_mode)
    assert mode == 0o600, oct(mode)

    os.kill(killed_bot.child, signal.SIGCONT)
    assert exit_status(killed_bot.child) == 0, "the child committed the rest and exited"
    assert not lock.exists(), "the child removed its lock file at its clean exit"

    drain(data_dir, dev_server)  # the child is gone: now the call is an orphan
    # Once, in order, exactly as stored: the records the child committed late included.
    call = assert_arrived_whole(dev_server, data_dir, CALL)
    assert call["callEnded"]["callEndedReason"] == "observer-lost"
    delivered = delivered_shas(call)
    assert delivered[: len(killed_bot.flushed)] == killed_bot.flushed
    assert delivered == killed_bot.handed[: len(delivered)], "what was handed, once, in order"
    assert len(delivered) > len(killed_bot.flushed), "the child committed what was in its pipe"
    assert not dead_deliveries(data_dir)


def test_a_writer_child_killed_with_its_bot_holds_nothing_and_the_call_ends_at_once(
    data_dir: Path, dev_server: RunningDevServer, killed_bot: KilledBot
) -> None:
    ((_, _, token),) = owners(data_dir)
    assert lock_file(data_dir, token).exists()
    os.kill(killed_bot.child, signal.SIGKILL)
    assert exit_status(killed_bot.child) == -signal.SIGKILL

    drain(data_dir, dev_server)  # one pass: the stale lock file holds no lock
    assert call_state(data_dir) == "ended"
    call = assert_arrived_whole(dev_server, data_dir, CALL)
    assert call["callEnded"]["callEndedReason"] == "observer-lost"
    delivered = delivered_shas(call)
    assert delivered[: len(killed_bot.flushed)] == killed_bot.flushed
    assert delivered == killed_bot.handed[: len(delivered)], "only what was handed, once"
    assert not lock_file(data_dir, token).exists(), "the drainer swept the stale lock file"


def said_it_waits(bot: KilledBot) -> bool:
    """Read the children's stderr until the delivery child says it waits for the writer
    child (True), or exits without saying so (False); bounded to 60 s."""
    assert bot.stderr is not None and bot.delivery is not None
    for _ in range(600):
        if "waiting up to" in bot.stderr.text():
            return True
        done, _ = os.waitpid(bot.delivery, os.WNOHANG)
        if done:
            return False
        time.sleep(0.1)
    return False


def test_a_dead_bots_delivery_child_waits_for_its_writer_child_and_delivers_the_call_whole(
    data_dir: Path, dev_server: RunningDevServer, killed_delivering_bot: KilledBot
) -> None:
    bot = killed_delivering_bot
    assert bot.delivery is not None
    assert said_it_waits(bot), "the last pass waits for the writer child instead of ending"
    assert dev_server.call(CALL)["callEnded"] is None

    os.kill(bot.child, signal.SIGCONT)
    assert exit_status(bot.child) == 0
    assert exit_status(bot.delivery) == 0, "its last pass delivered everything, then it exited"

    call = assert_arrived_whole(dev_server, data_dir, CALL)  # no other drain ran
    assert call["callEnded"]["callEndedReason"] == "observer-lost"
    delivered = delivered_shas(call)
    assert delivered[: len(bot.flushed)] == bot.flushed
    assert delivered == bot.handed[: len(delivered)], "what was handed, once, in order"
    assert len(delivered) > len(bot.flushed), "the child committed what was in its pipe"
    assert not dead_deliveries(data_dir)


def heartbeat(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "wal.sqlite") as conn:
        (beat,) = conn.execute("SELECT heartbeat_at FROM calls WHERE id = ?", (CALL,)).fetchone()
    conn.close()
    return int(beat)


def test_the_writer_child_heartbeats_the_bots_calls_itself(
    data_dir: Path, dev_server: RunningDevServer, reaper: None
) -> None:
    """A checker in another PID namespace judges by heartbeat: the child's own heartbeats
    keep a call open while the child lives, whatever becomes of the bot (stopped here)."""
    env = bot_env(data_dir, dev_server) | {"PIPECAT_ROARK_HEARTBEAT_S": "0.2"}
    bot = subprocess.Popen(
        [sys.executable, str(BOT), str(data_dir), CALL],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    child = None
    try:
        child = int(report(bot)["child"])
        assert report(bot)["flushed"], "the call is open and committed"
        os.kill(bot.pid, signal.SIGSTOP)  # the bot does nothing from here on
        stopped_at = heartbeat(data_dir)
        for _ in range(300):  # bounded: 0.2 s heartbeats
            if heartbeat(data_dir) > stopped_at:
                break
            time.sleep(0.1)
        assert heartbeat(data_dir) > stopped_at, "the child heartbeated the bot's call"
    finally:
        kill_and_reap(bot)
    assert child is not None
    assert exit_status(child) == 0
