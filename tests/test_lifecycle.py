"""Calls the pipeline never ends: a vanished session, SIGTERM, interpreter exit."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import LogCapture, stored_events, without_times
from pipecat_roark import RoarkObserver
from pipecat_roark.testing import Bot, Pause, ScriptedCall, User, run_pipeline
from pipecat_roark.timeline import assemble_call_ended
from pipecat_roark.writer import writer_for

BOT = Path(__file__).with_name("lifecycle_bot.py")


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


def run_bot_and_sigterm(directory: Path, mode: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ROARK_API_KEY", "ROARK_BASE_URL")}
    proc = subprocess.Popen(
        [sys.executable, str(BOT), str(directory), "call-t", mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", f"bot did not get ready: {line!r}"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, line + out, err)


def test_sigterm_finalizes_open_calls_and_still_kills_the_process(tmp_path: Path) -> None:
    directory = tmp_path / "roark"
    result = run_bot_and_sigterm(directory, "default")
    assert result.returncode == -signal.SIGTERM, result.stderr[-2000:]
    assert call_row(directory, "call-t") == ("ended", "process-exit")
    ended = assemble_call_ended("call-t", stored_events(directory, "call-t"))
    assert ended.call_ended_reason == "process-exit"
    assert [t.content for t in ended.transcript or []][:2] == ["Hello there.", "Hi."]


def test_sigterm_runs_the_hosts_own_handler_after_finalizing(tmp_path: Path) -> None:
    directory = tmp_path / "roark"
    result = run_bot_and_sigterm(directory, "host")
    assert "host handler" in result.stdout
    assert result.returncode == 3, result.stderr[-2000:]
    assert call_row(directory, "call-t") == ("ended", "process-exit")
