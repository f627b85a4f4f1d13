"""Delivery from a child process (``RoarkObserver(delivery_process=True)``), for real: a
Pipecat pipeline, the dev server on 127.0.0.1 in strict order mode, a real
``pipecat-roark drain --follow --parent-pipe`` child, and a bot killed with SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from devserver_fixture import RunningDevServer
from helpers import LogCapture
from pipecat_roark import RoarkObserver, config, lifecycle
from pipecat_roark.background_drainer import stop_background_drainers
from pipecat_roark.delivery_process import DeliveryProcess
from pipecat_roark.testing import ScriptedCall, run_pipeline
from test_drain import assert_arrived_whole, delivery_states, record, short_script

pytestmark = pytest.mark.strict_order

BOTS_POLICY = os.sched_getscheduler(0)
"""This process's scheduling policy before any child started (theirs is their own)."""

KEY = "rk_live_child_secret"
HERE = Path(__file__).parent
BOT = HERE / "delivery_process_bot.py"


@pytest.fixture
def children() -> Iterator[None]:
    """Every delivery child a test started gets its EOF at the end and is waited for."""
    yield
    with lifecycle.PROCESS.lock:
        started = list(lifecycle.PROCESS.delivery_processes.values())
        lifecycle.PROCESS.delivery_processes.clear()
    for child in started:
        child.close()
        assert isinstance(child, DeliveryProcess)
        assert child.exited.wait(150), "the delivery child exited after its last pass"


def registry_key(directory: Path) -> tuple[Path, str | None]:
    return (config.registry_key(directory), config.key_fingerprint(KEY))


def child_of(directory: Path) -> DeliveryProcess:
    child = lifecycle.PROCESS.delivery_processes[registry_key(directory)]
    assert isinstance(child, DeliveryProcess)
    for _ in range(600):  # bounded: it is spawned in a thread
        if child.pid is not None or child.exited.is_set():
            break
        time.sleep(0.05)
    assert child.pid is not None, "the delivery child started"
    return child


def ended(server: RunningDevServer, call_id: str) -> bool:
    return any(c["pipecatCallId"] == call_id and c["ended"] for c in server.calls())


async def arrived(server: RunningDevServer, call_id: str) -> bool:
    """Whether the call ended at the server within 60 s, the loop free meanwhile (the
    bot's own drainer may be the one delivering it)."""
    for _ in range(600):
        if ended(server, call_id):
            return True
        await asyncio.sleep(0.1)
    return False


def gone(pid: int) -> bool:
    """The process exited (a zombie its new parent has not reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def spawn_bot(env: dict[str, str], *args: object) -> subprocess.Popen[str]:
    """``tests/delivery_process_bot.py`` with ``args``; its first stdout line names its child.

    Returns:
        The running bot.
    """
    return subprocess.Popen(
        [sys.executable, str(BOT), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def wait_gone(pid: int) -> bool:
    """Up to 150 s (bounded: a child's last pass honours its backoff) for ``pid`` to exit.

    Returns:
        True once it is gone.
    """
    for _ in range(1500):
        if gone(pid):
            return True
        time.sleep(0.1)
    return gone(pid)


async def play_call(
    dev_server: RunningDevServer, directory: Path, call_id: str, turns: int = 1, **kwargs: Any
) -> None:
    """A short call of ``turns`` turns by ``RoarkObserver(**kwargs)`` into ``directory``,
    through a pipeline."""
    roark = RoarkObserver(
        agent_id="child-bot",
        api_key=KEY,
        base_url=dev_server.base_url,
        pipecat_call_id=call_id,
        data_dir=directory,
        chunk_bytes=8000,
        **kwargs,
    )
    await run_pipeline(
        [ScriptedCall(short_script(turns)), roark.audio_processor],  # type: ignore[arg-type]
        observers=[roark],
    )


@pytest.mark.anyio
async def test_a_call_is_delivered_by_the_child_and_its_key_is_never_in_argv(
    data_dir: Path, dev_server: RunningDevServer, children: None
) -> None:
    roark = RoarkObserver(
        agent_id="child-bot",
        api_key=KEY,
        base_url=dev_server.base_url,
        pipecat_call_id="by-child",
        data_dir=data_dir,
        chunk_bytes=8000,
        delivery_process=True,
    )
    await run_pipeline([ScriptedCall(short_script(1)), roark.audio_processor], observers=[roark])  # type: ignore[arg-type]
    child = child_of(data_dir)
    assert child.pid is not None

    argv = Path(f"/proc/{child.pid}/cmdline").read_bytes().split(b"\0")
    assert b"--parent-pipe" in argv, argv
    assert not [a for a in argv if KEY.encode() in a], "the key is not in the child's argv"
    environ = Path(f"/proc/{child.pid}/environ").read_bytes().split(b"\0")
    assert f"ROARK_API_KEY={KEY}".encode() in environ, "the key went in its environment"
    assert os.getsid(child.pid) == child.pid, "a session of its own: Ctrl-C reaches the bot only"
    assert registry_key(data_dir) not in lifecycle.PROCESS.drainers, "none in the bot's loop"

    assert await arrived(dev_server, "by-child")
    assert os.sched_getscheduler(child.pid) == os.SCHED_BATCH, "it never preempts the bot"
    assert os.sched_getscheduler(0) == BOTS_POLICY, "the bot's own is left as it was"
    assert_arrived_whole(dev_server, data_dir, "by-child")
    assert set(delivery_states(data_dir).values()) == {"delivered"}

    lifecycle.PROCESS.delivery_processes.clear()
    child.close()  # what shut_down does last: EOF, one last pass, exit
    assert child.exited.wait(150)
    assert child.cpu_s is not None, "reaped by the bot, its CPU noted"


@pytest.mark.anyio
async def test_the_children_hold_no_secret_of_the_bots_but_the_one_they_need(
    data_dir: Path, dev_server: RunningDevServer, children: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bot's environment holds its other services' keys; its children only write our
    database or deliver to Roark, so they get none of them (and the writer no Roark key)."""
    others = {
        "OPENAI_API_KEY": "sk-proj-other-secret",
        "DEEPGRAM_API_KEY": "dg-other-secret",
        "DAILY_API_TOKEN": "daily-other-secret",
        "AWS_SECRET_ACCESS_KEY": "aws-other-secret",
        "DB_PASSWORD": "db-other-secret",
    }
    for name, value in others.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PIPECAT_ROARK_EXAMPLE_SETTING", "kept")
    roark = RoarkObserver(
        agent_id="child-bot",
        api_key=KEY,
        base_url=dev_server.base_url,
        pipecat_call_id="no-secrets",
        data_dir=data_dir,
        chunk_bytes=8000,
        delivery_process=True,
        writer_process=True,
    )
    await run_pipeline([ScriptedCall(short_script(1)), roark.audio_processor], observers=[roark])  # type: ignore[arg-type]
    writer = lifecycle.running_writer(data_dir)
    assert writer is not None
    writer_pid = getattr(writer, "child_pid", None)
    assert isinstance(writer_pid, int), "the writer child is up"
    delivery_pid = child_of(data_dir).pid
    assert delivery_pid is not None
    assert await arrived(dev_server, "no-secrets")

    def environ(pid: int) -> dict[str, str]:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode()
        return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)

    for pid, roark_key in ((writer_pid, None), (delivery_pid, KEY)):
        env = environ(pid)
        assert env.get("ROARK_API_KEY") == roark_key
        assert not set(others) & set(env), sorted(set(others) & set(env))
        assert not [v for v in env.values() if "other-secret" in v]
        assert env["PIPECAT_ROARK_EXAMPLE_SETTING"] == "kept"
        assert env["PATH"] == os.environ["PATH"]
    assert_arrived_whole(dev_server, data_dir, "no-secrets")


def test_a_bot_killed_after_its_commit_has_its_call_delivered_by_the_child(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    # Nothing can be delivered while the bot lives: every answer is a 503 until the bot
    # is dead, so the call reaches Roark only through the child's work after the kill.
    dev_server.configure(status_sequence=[503] * 10_000)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPECAT_ROARK_CRASH")}
    env.update(ROARK_API_KEY=KEY, ROARK_BASE_URL=dev_server.base_url)
    bot = spawn_bot(env, data_dir, "orphaned-child")
    try:
        assert bot.stdout is not None
        line = bot.stdout.readline()
        child = json.loads(line)["child"]
        assert isinstance(child, int) and not gone(child)
        # The child is up and following: it tried, and was refused, before the kill.
        assert dev_server.wait_until(
            lambda: any(r["status"] == 503 for r in dev_server.requests()), 60
        )
    finally:
        bot.send_signal(signal.SIGKILL)
        bot.wait(30)
        if bot.stdout is not None:
            bot.stdout.close()
    assert bot.returncode == -signal.SIGKILL
    assert not ended(dev_server, "orphaned-child")
    assert set(delivery_states(data_dir).values()) != {"delivered"}

    dev_server.configure(status_sequence=[])  # Roark is back; the bot is gone
    assert wait_gone(child), "the child exited on its own after its parent died"
    assert_arrived_whole(dev_server, data_dir, "orphaned-child")  # once each: 0 duplicated
    assert set(delivery_states(data_dir).values()) == {"delivered"}, "0 lost"


def test_the_bots_shutdown_lets_its_child_finish_and_exit_while_the_bot_lives(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    env = {**os.environ, "ROARK_API_KEY": KEY, "ROARK_BASE_URL": dev_server.base_url}
    bot = spawn_bot(env, data_dir, "shut-down", "shutdown")
    try:
        assert bot.stdout is not None
        child = json.loads(bot.stdout.readline())["child"]
        assert isinstance(child, int)
        assert wait_gone(child), "shut_down closed the child's pipe: it exited on its own"
        assert bot.poll() is None, "while the bot lives on"
    finally:
        bot.send_signal(signal.SIGKILL)
        bot.wait(30)
        if bot.stdout is not None:
            bot.stdout.close()
    assert_arrived_whole(dev_server, data_dir, "shut-down")


def test_a_fork_of_the_bot_does_not_keep_the_delivery_child_from_its_last_pass(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    """The bot forks (``os.fork``: another thread's ``multiprocessing``, a user's code),
    then shuts down. The fork held a copy of the pipe to the delivery child, which never
    saw its end: it went on following for as long as the fork lived."""
    env = {**os.environ, "ROARK_API_KEY": KEY, "ROARK_BASE_URL": dev_server.base_url}
    bot = spawn_bot(env, data_dir, "forked-bot", "fork-shutdown")
    try:
        assert bot.stdout is not None
        started = json.loads(bot.stdout.readline())
        child, fork = started["child"], started["fork"]
        assert isinstance(child, int) and isinstance(fork, int)
        exited = False
        for _ in range(600):  # bounded (60 s): its last pass is short with Roark up
            exited = gone(child)
            if exited:
                break
            time.sleep(0.1)
        assert exited, "the child made its last pass and exited"
        assert not gone(fork), "while the fork lives on"
    finally:
        bot.send_signal(signal.SIGKILL)
        bot.wait(30)
        if bot.stdout is not None:
            bot.stdout.close()
    assert_arrived_whole(dev_server, data_dir, "forked-bot")


@contextmanager
def parent_pipe_drain(
    directory: Path, server: RunningDevServer
) -> Iterator[subprocess.Popen[bytes]]:
    """``drain --follow --parent-pipe`` as the bot starts it, with this test as its parent,
    once it follows; killed (if need be) and its pipes closed at the end."""
    env = {**os.environ, "ROARK_API_KEY": KEY, "ROARK_BASE_URL": server.base_url}
    child = subprocess.Popen(
        [sys.executable, "-m", "pipecat_roark.cli", "drain", "--follow", "--parent-pipe"]
        + ["--dir", str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    try:
        assert b"following new calls" in child.stdout.readline()
        yield child
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
        child.stdout.close()
        child.stderr.close()


def test_the_child_exits_when_its_parents_pipe_closes(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    with parent_pipe_drain(data_dir, dev_server) as child:
        assert child.stdin is not None and child.stderr is not None
        child.stdin.write(b"\0")  # a wake: it goes on following
        child.stdin.flush()
        assert child.poll() is None
        child.stdin.close()  # the parent is gone
        code = child.wait(60)
        errors = child.stderr.read().decode()
    assert code == 0, errors


def ignored_signals(pid: int) -> int:
    """The mask of signals ``pid`` ignores (``SigIgn`` in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no SigIgn line for {pid}")


@pytest.mark.anyio
async def test_a_stop_signal_to_every_process_leaves_the_child_to_deliver_what_the_bot_ends(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    """A service manager stops a unit by signalling all of its processes at once
    (systemd's control-group kill). The child is the bot's: it ignores the signal, and
    delivers the call the bot ends in its own shutdown once the bot's pipe closes."""
    with parent_pipe_drain(data_dir, dev_server) as child:
        assert child.stdin is not None and child.stderr is not None
        stops = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGINT - 1))
        assert ignored_signals(child.pid) & stops == stops
        child.send_signal(signal.SIGTERM)
        child.send_signal(signal.SIGINT)
        await record(data_dir, "ended-in-shutdown", key=KEY)  # the bot ends it after the signal
        writer = lifecycle.running_writer(data_dir)
        assert writer is not None and await writer.flush(30), "the call is committed"
        child.stdin.close()  # then the bot exits
        code = await asyncio.to_thread(child.wait, 60)
        errors = child.stderr.read().decode()
    assert code == 0, errors
    assert_arrived_whole(dev_server, data_dir, "ended-in-shutdown")


@pytest.mark.anyio
async def test_a_child_that_dies_is_replaced_by_the_in_loop_drainer(
    data_dir: Path, dev_server: RunningDevServer, children: None, logs: LogCapture
) -> None:
    await play_call(dev_server, data_dir, "before-death", 2, delivery_process=True)
    child = child_of(data_dir)
    assert child.pid is not None
    os.kill(child.pid, signal.SIGKILL)
    assert child.exited.wait(30)
    assert child.failed
    assert len(logs.matching("delivering from this process's event loop instead")) == 1
    for _ in range(100):  # bounded: the reaper thread hands the start to this loop
        if registry_key(data_dir) in lifecycle.PROCESS.drainers:
            break
        await asyncio.sleep(0.01)
    assert registry_key(data_dir) in lifecycle.PROCESS.drainers, "the bot's own drainer took over"

    await play_call(dev_server, data_dir, "after-death", 2, delivery_process=True)
    assert await arrived(dev_server, "after-death"), "delivered from the bot's loop"
    assert_arrived_whole(dev_server, data_dir, "after-death")
    assert_arrived_whole(dev_server, data_dir, "before-death")
    await stop_background_drainers()


# ---- the switch in the environment ----


@pytest.mark.anyio
async def test_the_environment_turns_delivery_from_a_child_on_and_the_argument_wins(
    tmp_path: Path, dev_server: RunningDevServer, children: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIPECAT_ROARK_DELIVERY_PROCESS", " Yes ")
    by_child, by_loop = tmp_path / "by-child", tmp_path / "by-loop"

    await play_call(dev_server, by_child, "env-child")
    child = child_of(by_child)
    assert child.pid is not None and not gone(child.pid), "the variable started a child"
    assert registry_key(by_child) not in lifecycle.PROCESS.drainers, "none in the bot's loop"
    assert await arrived(dev_server, "env-child")

    await play_call(dev_server, by_loop, "env-overridden", delivery_process=False)
    assert registry_key(by_loop) not in lifecycle.PROCESS.delivery_processes, "no child"
    assert registry_key(by_loop) in lifecycle.PROCESS.drainers, "delivered from the loop"
    assert await arrived(dev_server, "env-overridden")

    assert_arrived_whole(dev_server, by_child, "env-child")
    assert_arrived_whole(dev_server, by_loop, "env-overridden")
    await stop_background_drainers()


@pytest.mark.anyio
async def test_an_unreadable_delivery_process_variable_warns_once_and_delivers_from_the_loop(
    data_dir: Path,
    dev_server: RunningDevServer,
    children: None,
    logs: LogCapture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PIPECAT_ROARK_DELIVERY_PROCESS", "child please")
    for call_id in ("first", "second"):
        await play_call(dev_server, data_dir, call_id)
        assert registry_key(data_dir) not in lifecycle.PROCESS.delivery_processes, "no child"
        assert registry_key(data_dir) in lifecycle.PROCESS.drainers, "the bot's own drainer"
        assert await arrived(dev_server, call_id)
        assert_arrived_whole(dev_server, data_dir, call_id)
    assert logs.matching("PIPECAT_ROARK_DELIVERY_PROCESS") == [
        "pipecat-roark: PIPECAT_ROARK_DELIVERY_PROCESS='child please' is not 1 or 0; "
        "delivering from this process"
    ]
    assert not logs.messages("ERROR")
    await stop_background_drainers()
