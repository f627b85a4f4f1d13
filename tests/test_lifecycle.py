"""Calls the pipeline never ends: a vanished session, SIGTERM, interpreter exit."""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from devserver_fixture import RunningDevServer
from helpers import LogCapture, stored_events, without_times
from pipecat_roark import RoarkObserver, compat, lifecycle
from pipecat_roark.background_drainer import stop_background_drainers
from pipecat_roark.lifecycle import DEFAULT_EXIT_DRAIN_S, writer_for
from pipecat_roark.store import connect
from pipecat_roark.testing import Bot, Pause, ScriptedCall, User, run_pipeline
from pipecat_roark.timeline import assemble_call_ended
from test_drain import (
    KEY,
    assert_arrived_whole,
    chunk_rows,
    delivery_states,
    short_script,
    stored_under,
)

BOT = Path(__file__).with_name("lifecycle_bot.py")
Popen = subprocess.Popen[str]


def call_row(directory: Path, call_id: str) -> tuple[str, str | None]:
    with sqlite3.connect(directory / "wal.sqlite") as conn:
        row = conn.execute(
            "SELECT state, end_reason FROM calls WHERE id = ?", (call_id,)
        ).fetchone()
    conn.close()
    return row  # type: ignore[no-any-return]


@pytest.mark.anyio
async def test_a_session_that_goes_silent_is_finalized_as_vanished(
    data_dir: Path, logs: LogCapture
) -> None:
    roark = RoarkObserver(agent_id="a", pipecat_call_id="quiet", deliver=False, idle_timeout_s=0.3)
    script = ScriptedCall([Bot(["Hello."]), User("Hi.")], end="hang")
    run = asyncio.ensure_future(run_pipeline([script, roark.audio_processor], observers=[roark]))
    try:
        for _ in range(200):  # bounded: the watchdog fires after 0.3 s without frames
            await asyncio.sleep(0.05)
            await writer_for(data_dir).flush(5)
            if call_row(data_dir, "quiet")[0] == "ended":
                break
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
    assert call_row(data_dir, "quiet") == ("ended", "session-vanished")
    names = [n for n, f in without_times(stored_events(data_dir, "quiet")) if n == "CallClosed"]
    assert names == ["CallClosed"], "the cancel after the watchdog does not end the call twice"
    ended = assemble_call_ended("quiet", stored_events(data_dir, "quiet"))
    assert ended.call_ended_reason == "session-vanished"
    assert [t.content for t in ended.transcript or []] == ["Hello.", "Hi."]
    [line] = logs.matching("the session vanished without an EndFrame")
    assert "reason session-vanished" in line and "aflush()" in line


@pytest.mark.anyio
async def test_a_live_call_is_not_taken_for_vanished(data_dir: Path) -> None:
    # A real-time call twice as long as the idle timeout, with a frame every 20 ms: only
    # an event loop frozen for the whole timeout (2 s, a hundred frames) could make it look
    # idle, where 0.3 s against this script needed just one slow moment of the machine.
    roark = RoarkObserver(agent_id="a", pipecat_call_id="live", deliver=False, idle_timeout_s=2.0)
    script = ScriptedCall(
        [Bot(["One."]), User("Two.", ms=1500), Pause(1500), Bot(["Three."] * 10)], pace=1.0
    )
    await run_pipeline([script, roark.audio_processor], observers=[roark])
    assert call_row(data_dir, "live") == ("ended", "agent-ended")


def bot_env(base_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROARK_", "PIPECAT_ROARK"))}
    if base_url is not None:
        env |= {"ROARK_API_KEY": KEY, "ROARK_BASE_URL": base_url}
    return env


def start_bot(directory: Path, mode: str, *extra: str, base_url: str | None = None) -> Popen:
    return subprocess.Popen(
        [sys.executable, str(BOT), str(directory), "call-t", mode, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=bot_env(base_url),
    )


def wait_for_line(proc: Popen, expected: str) -> list[str]:
    """Lines up to and including ``expected`` (bounded: the bot prints a handful)."""
    assert proc.stdout is not None
    seen: list[str] = []
    for _ in range(50):
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line.strip())
        if line.strip() == expected:
            return seen
    raise AssertionError(f"the bot never printed {expected!r}; it printed {seen}")


def run_bot_and_sigterm(
    directory: Path, mode: str, *extra: str, base_url: str | None = None
) -> subprocess.CompletedProcess[str]:
    proc = start_bot(directory, mode, *extra, base_url=base_url)
    try:
        seen = wait_for_line(proc, "ready")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, "\n".join(seen) + out, err)


@pytest.mark.anyio
async def test_shut_down_delivers_what_the_bots_own_drainer_could_not(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    dev_server.configure(status_sequence=[503] * 10_000)  # the bot's own drainer gets nowhere
    roark = RoarkObserver(
        agent_id="exit",
        api_key=KEY,
        base_url=dev_server.base_url,
        pipecat_call_id="left-over",
        chunk_bytes=8000,
        exit_drain_s=30,
    )
    script = ScriptedCall(short_script(1))
    await run_pipeline([script, roark.audio_processor], observers=[roark])  # type: ignore[arg-type]
    await stop_background_drainers(5)
    assert dev_server.calls() == []
    dev_server.configure(status_sequence=[])
    await asyncio.to_thread(lifecycle.shut_down)  # what atexit runs: the key comes from roark
    assert_arrived_whole(dev_server, data_dir, "left-over")


def test_sigterm_finalizes_open_calls_and_still_kills_the_process(tmp_path: Path) -> None:
    directory = tmp_path / "roark"
    result = run_bot_and_sigterm(directory, "default")
    assert result.returncode == -signal.SIGTERM, result.stderr[-2000:]
    assert call_row(directory, "call-t") == ("ended", "process-exit")
    ended = assemble_call_ended("call-t", stored_events(directory, "call-t"))
    assert ended.call_ended_reason == "process-exit"
    assert [t.content for t in ended.transcript or []][:2] == ["Hello there.", "Hi."]


def test_a_host_that_handles_sigterm_lets_its_calls_finish_and_deliver(
    tmp_path: Path, dev_server: RunningDevServer
) -> None:
    directory = tmp_path / "roark"
    result = run_bot_and_sigterm(directory, "host", "16000", base_url=dev_server.base_url)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "host handler" in result.stdout
    assert "call ended; host saw SIGTERM: True" in result.stdout, "SIGTERM came mid-call"

    # The call went on after SIGTERM: every turn, every chunk, its own end reason.
    assert call_row(directory, "call-t") == ("ended", "customer-ended-call")
    call = assert_arrived_whole(dev_server, directory, "call-t")
    ended = call["callEnded"]
    assert ended["callEndedReason"] == "customer-ended-call"
    assert [t["content"] for t in ended["transcript"]] == [
        "Hello there.",
        "Hi.",
        "Still here?",
        "Yes, one more thing.",
        "Sure, go ahead.",
        "Bye.",
        "Goodbye!",
    ]
    paths = [(r["method"], r["path"], r["idempotencyKey"]) for r in dev_server.requests()]
    ended_at = paths.index(("POST", "/v1/integrations/pipecat", "call-t:call-ended"))
    puts = [i for i, (m, p, _) in enumerate(paths) if m == "PUT" and stored_under("call-t", p)]
    # A PUT may be repeated (it is idempotent): count the distinct chunks.
    assert len({paths[i][1] for i in puts}) == len(chunk_rows(directory, "call-t"))
    assert max(puts) < ended_at, "call-ended after the last chunk"

    # A call that started after the SIGTERM is recorded and finalized at exit like any other.
    assert call_row(directory, "call-t-late") == ("ended", "process-exit")
    late = dev_server.call("call-t-late")
    assert late["eventCounts"] == {"callStarted": 1, "callEnded": 1}
    assert late["callEnded"]["callEndedReason"] == "process-exit"
    assert [t["content"] for t in late["callEnded"]["transcript"]][:2] == ["Hello there.", "Hi."]


def test_sigterm_while_another_data_dir_migrates_still_exits(tmp_path: Path) -> None:
    """The signal lands while the main thread holds the writers' lock (it is migrating a
    second data dir that another process keeps locked): the process must not hang."""
    directory, second = tmp_path / "roark", tmp_path / "second"
    conn = connect(second)
    conn.execute("DROP INDEX deliveries_state_id")
    conn.execute("PRAGMA user_version = 1")  # one migration to go
    conn.execute("BEGIN IMMEDIATE")  # and the migration must wait for this lock
    proc = start_bot(directory, "migrate", str(256 * 1024), str(second))
    try:
        wait_for_line(proc, "locked")
        proc.send_signal(signal.SIGTERM)
        try:
            # The exit-drain bound, plus room for a loaded machine to tear a process down.
            proc.wait(timeout=DEFAULT_EXIT_DRAIN_S + 10)
        except subprocess.TimeoutExpired:
            pytest.fail("the process hung after SIGTERM while the writers' lock was held")
    finally:
        proc.kill()
        _, err = proc.communicate()
        conn.execute("ROLLBACK")
        conn.close()
    # It dies of the signal; or, its main thread stuck in SQLite's busy wait, with 128 + 15.
    assert proc.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM), err[-3000:]
    assert call_row(directory, "call-t") == ("ended", "process-exit")


def test_a_runner_that_handles_sigterm_ends_the_call_with_its_own_reason(
    tmp_path: Path, dev_server: RunningDevServer
) -> None:
    directory = tmp_path / "roark"
    result = run_bot_and_sigterm(directory, "runner", "16000", base_url=dev_server.base_url)
    assert result.returncode == 3, result.stderr[-3000:]
    # The runner's own reason where its cancel() takes one (later 1.x); older runners cancel
    # without a reason, and a CancelFrame without one ends the call as agent-ended.
    gives_reason = "reason" in inspect.signature(compat.WorkerRunner.cancel).parameters
    reason = "interrupt signal" if gives_reason else "agent-ended"
    assert call_row(directory, "call-t") == ("ended", reason)
    call = assert_arrived_whole(dev_server, directory, "call-t")
    assert call["callEnded"]["callEndedReason"] == reason


def test_uvicorn_finishes_the_call_in_flight_and_it_is_delivered_before_it_dies(
    tmp_path: Path, dev_server: RunningDevServer
) -> None:
    """Real uvicorn: after its graceful shutdown it restores SIG_DFL and re-raises SIGTERM,
    so no atexit hook runs. The call must have been delivered before that."""
    # Pipecat's runner extra brings uvicorn; the matrix's bare 0.0.x environment has none.
    pytest.importorskip("uvicorn")
    directory = tmp_path / "roark"
    dev_server.configure(latency_ms=300)  # Roark answers slower than uvicorn shuts down
    proc = start_bot(directory, "uvicorn", "16000", base_url=dev_server.base_url)
    try:
        assert proc.stdout is not None
        listening = proc.stdout.readline().split()
        assert listening[:1] == ["listening"], listening
        port = int(listening[1])
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(httpx.get, f"http://127.0.0.1:{port}/call", timeout=120)
            wait_for_line(proc, "ready")
            proc.send_signal(signal.SIGTERM)
            response = answer.result(timeout=120)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert (response.status_code, response.text) == (200, "call ended")
    assert proc.returncode == -signal.SIGTERM, err[-3000:]
    assert call_row(directory, "call-t") == ("ended", "customer-ended-call")
    call = assert_arrived_whole(dev_server, directory, "call-t")
    assert call["callEnded"]["callEndedReason"] == "customer-ended-call"
    assert len(call["callEnded"]["transcript"]) == 7
    assert set(delivery_states(directory).values()) == {"delivered"}, "confirmed before death"


FORKS = """
import os, signal, sys, time
from pipecat_roark import lifecycle
lifecycle.install_exit_hooks()  # nobody handles SIGTERM: ours, with its shutdown thread
ready_r, ready_w = os.pipe()
child = os.fork()
if child == 0:
    os.write(ready_w, b"!")  # after the fork is done: a signal sent earlier can be lost
    time.sleep(120)
    os._exit(0)
os.read(ready_r, 1)
os.kill(child, signal.SIGTERM)
for _ in range(3000):  # bounded: 30 s
    done, status = os.waitpid(child, os.WNOHANG)
    if done:
        break
    time.sleep(0.01)
else:
    os.kill(child, signal.SIGKILL)
    sys.exit("the forked child survived SIGTERM")
print("child died of", os.WTERMSIG(status) if os.WIFSIGNALED(status) else None, flush=True)
"""


def test_a_forked_child_dies_of_sigterm_and_never_wakes_its_parents_shutdown() -> None:
    done = subprocess.run(
        [sys.executable, "-c", FORKS],
        capture_output=True,
        text=True,
        env=bot_env(),
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == f"child died of {int(signal.SIGTERM)}\n"
    assert "SIGTERM and no host handles it" not in done.stderr
