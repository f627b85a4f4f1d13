"""The durable writer in a child process (``RoarkObserver(writer_process=True)``), for
real: Pipecat pipelines, ``python -m pipecat_roark.writer_child`` children, SIGKILL of
the bot and of the child (by our signal or at the child's own crash points), the dev
server on 127.0.0.1 in strict order mode, and ``pipecat-roark drain`` afterwards.

What a call delivers is compared with what the in-process writer delivers for the same
call (payloads without ids and times, chunk bytes), or with what the bot handed over."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devserver_fixture import RunningDevServer
from helpers import LogCapture, stored_events, without_times
from pipecat_roark import RoarkObserver, lifecycle
from pipecat_roark.background_drainer import stop_background_drainers
from pipecat_roark.drain import Drainer
from pipecat_roark.events import (
    BotSpeech,
    BotText,
    CallClosed,
    CallOpened,
    ChunkRecorded,
    Interruption,
    RecordingStarted,
    ToolCall,
    ToolResult,
    UserSpeech,
    UserText,
)
from pipecat_roark.ops import (
    BarrierOp,
    ChunkOp,
    ChunkWrittenOp,
    EventOp,
    FinalizeOp,
    OpenOp,
    SpooledChunkOp,
    StopOp,
)
from pipecat_roark.spool import SpooledChunk
from pipecat_roark.testing import ScriptedCall, default_script, run_pipeline
from pipecat_roark.writer import Writer
from pipecat_roark.writer_pipe import RemoteBarrier, decode_frame, encode_frame, write_all
from pipecat_roark.writer_process import AnyWriter, ProcessWriter
from test_drain import QUICK, assert_arrived_whole

pytestmark = pytest.mark.strict_order

BOTS_POLICY = os.sched_getscheduler(0)
"""This process's scheduling policy before any child started (theirs is their own)."""

KEY = "rk_live_writer_child"
BOT = Path(__file__).with_name("writer_process_bot.py")
CHUNK_BYTES = 8000
FLUSH_S = 30.0
FALLBACK = "from this process instead"
"""The end of the one error line a bot logs when its writer child fails."""
TIMES = {
    "eventTimestamp",
    "callStartedAt",
    "callEndedAt",
    "timestamp",
    "endTimestamp",
    "audioOffsetMs",
    "endAudioOffsetMs",
}
"""Payload fields that are wall-clock times, or offsets measured from them."""
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37


# ---- helpers ----


def without_ids_and_times(value: Any) -> Any:
    """A payload with its call id and every time left out: equal across two runs."""
    if isinstance(value, dict):
        return {
            k: without_ids_and_times(v)
            for k, v in value.items()
            if k not in TIMES and k != "pipecatCallId"
        }
    if isinstance(value, list):
        return [without_ids_and_times(v) for v in value]
    return value


def delivered_chunks(server: RunningDevServer, call_id: str) -> list[bytes]:
    """The call's recording at the server, cut back into its chunks, in index order."""
    call = server.call(call_id)
    recording = server.recording(call_id)[44:]
    chunks, offset = [], 0
    for index in range(len(call["chunks"])):
        size = call["chunks"][str(index)]["size"]
        chunks.append(recording[offset : offset + size])
        offset += size
    assert offset == len(recording)
    return chunks


def owners(directory: Path) -> list[tuple[str, int, str]]:
    with sqlite3.connect(directory / "wal.sqlite") as conn:
        rows = conn.execute("SELECT owner_host, owner_pid, owner_token FROM calls").fetchall()
    conn.close()
    return [(str(h), int(p), str(t)) for h, p, t in rows]


def timeline(directory: Path, call_id: str) -> list[tuple[str, dict[str, object]]]:
    """The call's stored events without times or audio events (those are checked apart)."""
    events = stored_events(directory, call_id)
    return without_times([e for e in events if not isinstance(e, ChunkRecorded | RecordingStarted)])


def chunk_indices(directory: Path, call_id: str) -> list[int]:
    return [e.index for e in stored_events(directory, call_id) if isinstance(e, ChunkRecorded)]


async def arrived(server: RunningDevServer, call_id: str) -> bool:
    """Whether the call ended at the server within 60 s, the loop free meanwhile (this
    process's own drainer delivers it)."""
    for _ in range(600):
        if any(c["pipecatCallId"] == call_id and c["ended"] for c in server.calls()):
            return True
        await asyncio.sleep(0.1)
    return False


def observer(
    directory: Path, call_id: str, server: RunningDevServer, **options: Any
) -> RoarkObserver:
    return RoarkObserver(
        agent_id="writer-child-bot",
        api_key=KEY,
        base_url=server.base_url,
        pipecat_call_id=call_id,
        data_dir=directory,
        chunk_bytes=CHUNK_BYTES,
        **options,
    )


def writer_of(directory: Path) -> AnyWriter:
    writer = lifecycle.running_writer(directory)
    assert writer is not None
    return writer


async def play(
    roark: RoarkObserver,
    server: RunningDevServer,
    call_id: str,
    on_step: Callable[[int], Awaitable[None]] | None = None,
) -> list[bytes]:
    """The default scripted call through a real pipeline, delivered by this process.

    Returns:
        Every chunk the AudioBufferProcessor handed to the recorder, in order.
    """
    emitted: list[bytes] = []

    @roark.audio_processor.event_handler("on_audio_data")
    async def tap(processor: object, audio: bytes, sample_rate: int, num_channels: int) -> None:
        emitted.append(bytes(audio))

    call = ScriptedCall(default_script(), on_step=on_step)
    await run_pipeline([call, roark.audio_processor], observers=[roark])  # type: ignore[arg-type]
    assert await arrived(server, call_id), f"{call_id} was delivered"
    return emitted


async def in_process_baseline(
    directory: Path, server: RunningDevServer, call_id: str
) -> dict[str, Any]:
    """The same call recorded by the writer thread: what the writer child must match."""
    roark = observer(directory, call_id, server, writer_process=False)
    emitted = await play(roark, server, call_id)
    assert isinstance(writer_of(directory), Writer)
    assert delivered_chunks(server, call_id) == emitted
    return server.call(call_id)


def assert_same_call(server: RunningDevServer, call_id: str, baseline: dict[str, Any]) -> None:
    """Both payloads equal the baseline's, ids and times aside; nothing twice, nothing missing."""
    call = server.call(call_id)
    for payload in ("callStarted", "callEnded"):
        assert without_ids_and_times(call[payload]) == without_ids_and_times(baseline[payload])
    assert call["eventCounts"] == {"callStarted": 1, "callEnded": 1}


# ---- 1. the same call, recorded from the child ----


@pytest.mark.anyio
async def test_a_call_recorded_by_the_writer_child_arrives_as_the_in_process_writers_does(
    tmp_path: Path, data_dir: Path, dev_server: RunningDevServer, logs: LogCapture
) -> None:
    baseline = await in_process_baseline(tmp_path / "in-process", dev_server, "by-thread")

    roark = observer(data_dir, "by-child", dev_server, writer_process=True)
    writer = writer_of(data_dir)
    assert isinstance(writer, ProcessWriter)
    # Started before the call (its imports take a while): the call's audio then has no
    # stall in it, so its bytes can be compared with the baseline's.
    assert await writer.flush(FLUSH_S), "the writer child is up and answers"
    child = writer.child_pid
    assert child is not None and child != os.getpid()
    argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
    assert b"pipecat_roark.writer_child" in argv, argv
    assert os.getsid(child) == child, "a session of its own: Ctrl-C reaches the bot only"
    # Batch work: woken by the bot's writes, it never preempts the bot's loop (scheduling).
    assert os.sched_getscheduler(child) == os.SCHED_BATCH
    assert os.sched_getscheduler(0) == BOTS_POLICY, "the bot's own is left as it was"

    emitted = await play(roark, dev_server, "by-child")

    # Recorded by the child: no writer thread of this process holds the database.
    threads = {t.name for t in threading.enumerate()}
    assert f"pipecat-roark-writer:{data_dir}" not in threads, threads
    assert f"pipecat-roark-writer-sender:{data_dir}" in threads, threads
    assert writer.fell_back is None
    assert writer.child_pid == child and Path(f"/proc/{child}").exists(), "the same child"
    # ... under the bot's identity, the same the writer thread of this process uses.
    assert owners(data_dir) == owners(tmp_path / "in-process")
    ((_, pid, _),) = owners(data_dir)
    assert pid == os.getpid() != child

    assert_same_call(dev_server, "by-child", baseline)
    assert delivered_chunks(dev_server, "by-child") == emitted
    assert emitted == delivered_chunks(dev_server, "by-thread"), "the same chunk bytes"
    assert_arrived_whole(dev_server, data_dir, "by-child")
    assert not logs.messages("ERROR")
    await stop_background_drainers()


# ---- 2. the bot killed mid-call ----


@pytest.fixture
def reaper() -> Iterator[None]:
    """This test process adopts the orphans of its children (Linux's child subreaper),
    so it can read the exit status of a writer child whose bot it killed."""
    libc = ctypes.CDLL(None, use_errno=True)
    was = ctypes.c_int(0)
    assert libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(was), 0, 0, 0) == 0
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0, ctypes.get_errno()
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, was.value, 0, 0, 0)


def exit_status(pid: int) -> int | None:
    """Reap ``pid`` (an orphan adopted by this process) within 150 s.

    Returns:
        Its exit status, or None if it is still running (it is then killed and reaped).
    """
    for _ in range(1500):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def pipe_bytes(fd: int) -> int:
    """Bytes waiting in a pipe (FIONREAD), read without taking them."""
    buffer = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buffer)
    return int.from_bytes(buffer, sys.byteorder)


def bot_env(directory: Path, server: RunningDevServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROARK_", "PIPECAT_ROARK"))}
    return env | {
        "PIPECAT_ROARK_DIR": str(directory),
        "ROARK_API_KEY": KEY,
        "ROARK_BASE_URL": server.base_url,
    }


def tell(bot: subprocess.Popen[str], command: str) -> None:
    assert bot.stdin is not None
    bot.stdin.write(command + "\n")
    bot.stdin.flush()


def report(bot: subprocess.Popen[str]) -> dict[str, Any]:
    assert bot.stdout is not None
    line = bot.stdout.readline()
    assert line, f"the bot is gone ({bot.poll()})"
    parsed: dict[str, Any] = json.loads(line)
    return parsed


def kill_and_reap(bot: subprocess.Popen[str]) -> None:
    """SIGKILL the bot (a no-op if it is gone), reap it and close our ends of its pipes."""
    bot.kill()
    bot.wait(30)
    for stream in (bot.stdin, bot.stdout):
        if stream is not None:
            stream.close()


def hand_the_rest_to_a_stopped_child(
    bot: subprocess.Popen[str], child: int, flushed: list[str]
) -> list[str]:
    """Stop the child (SIGSTOP), then let the bot hand it the rest of the call unflushed:
    the records wait in its pipe (widened first, so whole frames fit).

    Returns:
        Every chunk the bot handed over, the flushed ones first.
    """
    os.kill(child, signal.SIGSTOP)
    handed = flushed
    pipe = os.open(f"/proc/{child}/fd/0", os.O_RDONLY | os.O_NONBLOCK)  # its stdin
    try:
        fcntl.fcntl(pipe, fcntl.F_SETPIPE_SZ, 1 << 20)
        tell(bot, "noflush")
        for step in range(4, 13):
            line = report(bot)
            assert (line["step"], line["flushed"]) == (step, False)
            handed = line["chunks"]
        waiting = (len(handed) - len(flushed)) * CHUNK_BYTES
        assert waiting >= 2 * CHUNK_BYTES
        for _ in range(300):  # bounded: the bot's sender thread fills the pipe
            if pipe_bytes(pipe) >= waiting:
                break
            time.sleep(0.1)
        assert pipe_bytes(pipe) >= waiting, "the bot sent its chunks to the child"
    finally:
        os.close(pipe)
    return handed


@pytest.mark.parametrize("child_state", ["running", "stopped"])
def test_a_bot_killed_mid_call_leaves_what_it_sent_to_the_child_which_exits_0(
    data_dir: Path, dev_server: RunningDevServer, reaper: None, child_state: str
) -> None:
    """``stopped``: the child is stopped (SIGSTOP) while the bot hands it the rest of the
    call, so the records are still in the pipe when the bot dies: the child reads and
    commits them after the bot is gone (a writer thread would have lost them)."""
    env = bot_env(data_dir, dev_server)
    bot = subprocess.Popen(
        [sys.executable, str(BOT), str(data_dir), "killed-bot"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    child: int | None = None
    try:
        hello = report(bot)
        child, flushed = int(hello["child"]), []
        assert hello["bot"] == bot.pid != child
        for step in (1, 2, 3):
            line = report(bot)
            assert (line["step"], line["flushed"]) == (step, True)
            flushed = line["chunks"]
            if step < 3:
                tell(bot, "go")
        assert len(flushed) >= 2, "some chunks were committed before the kill"
        handed = flushed
        if child_state == "stopped":
            handed = hand_the_rest_to_a_stopped_child(bot, child, flushed)
    finally:
        kill_and_reap(bot)
        if child is not None and child_state == "stopped":
            os.kill(child, signal.SIGCONT)
    assert bot.returncode == -signal.SIGKILL
    assert child is not None
    assert exit_status(child) == 0, "the child committed what it had and exited on its own"

    drain = subprocess.run(
        [sys.executable, "-m", "pipecat_roark.cli", "drain", "--timeout", "60"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    assert drain.returncode == 0, drain.stderr[-2000:]
    call = assert_arrived_whole(dev_server, data_dir, "killed-bot")
    assert call["callEnded"]["callEndedReason"] == "observer-lost"
    chunks = call["chunks"]
    delivered = [chunks[str(i)]["sha256"] for i in range(len(chunks))]
    assert delivered[: len(flushed)] == flushed, "every chunk the bot saw committed"
    assert delivered == handed[: len(delivered)], "only what the bot handed over, once, in order"
    if child_state == "stopped":
        assert len(delivered) > len(flushed), "the child committed what the bot only sent"


# ---- 3. the child killed while the bot lives ----

LAST_STEP = len(default_script())
MOMENTS = {
    # The child's first commit (the call's open): nothing committed, nothing acknowledged.
    "before-any-acknowledgement": ("before-commit:1", None),
    # Before the commit of its second chunk file: the events of the frames behind that
    # chunk are committed (they do not wait for audio), but no frame from the one holding
    # the chunk on is acknowledged. The bot must leave those events out of its replay.
    "committed-not-acknowledged": ("chunk-file-durable:2", None),
    # Our SIGKILL while the call streams: whatever was in flight.
    "mid-stream": (None, 3),
    # Everything up to the last step acknowledged; the tail chunk and the end follow.
    "after-the-last-chunk-before-the-end": (None, LAST_STEP),
}


@pytest.mark.anyio
@pytest.mark.parametrize("moment", list(MOMENTS))
async def test_a_child_killed_mid_call_is_replaced_and_the_call_has_everything_once(
    tmp_path: Path,
    data_dir: Path,
    dev_server: RunningDevServer,
    logs: LogCapture,
    monkeypatch: pytest.MonkeyPatch,
    moment: str,
) -> None:
    baseline = await in_process_baseline(tmp_path / "in-process", dev_server, "no-kill")
    crash_at, kill_after = MOMENTS[moment]
    if crash_at is not None:  # read by the child at its start; this process parsed it long ago
        monkeypatch.setenv("PIPECAT_ROARK_CRASH_AT", crash_at)
    roark = observer(data_dir, "child-killed", dev_server, writer_process=True)
    writer = writer_of(data_dir)
    assert isinstance(writer, ProcessWriter)
    assert await writer.flush(FLUSH_S), "the writer child is up (a flush commits nothing)"
    child = writer.child_pid
    assert child is not None

    async def kill_child(step: int) -> None:
        if step != kill_after:
            return
        if step == LAST_STEP:
            assert await writer.flush(FLUSH_S)
        os.kill(child, signal.SIGKILL)
        if step == LAST_STEP:
            for _ in range(300):  # bounded: the end must go to the bot's own writer
                if writer.fell_back is not None:
                    break
                await asyncio.sleep(0.05)

    emitted = await play(roark, dev_server, "child-killed", on_step=kill_child)

    why = writer.fell_back
    assert why is not None, "the child died during the call"
    assert f"{child} exited with status -9" in why, why
    errors = logs.messages("ERROR")
    assert len(errors) == 1 and FALLBACK in errors[0], errors
    assert not Path(f"/proc/{child}").exists(), "reaped"

    assert_same_call(dev_server, "child-killed", baseline)
    assert timeline(data_dir, "child-killed") == timeline(tmp_path / "in-process", "no-kill")
    assert chunk_indices(data_dir, "child-killed") == list(range(len(emitted))), "each once"
    assert delivered_chunks(dev_server, "child-killed") == emitted
    assert_arrived_whole(dev_server, data_dir, "child-killed")
    await stop_background_drainers()


@pytest.mark.anyio
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
async def test_a_stop_signal_to_every_process_leaves_the_child_to_the_bot(
    tmp_path: Path,
    data_dir: Path,
    dev_server: RunningDevServer,
    logs: LogCapture,
    stop: signal.Signals,
) -> None:
    """A service manager stops a unit by signalling all of its processes (systemd's
    control-group kill): the child is the bot's to stop, so it goes on recording the call
    and exits once the bot closes its writer; no fallback, no error line."""
    baseline = await in_process_baseline(tmp_path / "in-process", dev_server, "no-signal")
    roark = observer(data_dir, "signalled", dev_server, writer_process=True)
    writer = writer_of(data_dir)
    assert isinstance(writer, ProcessWriter)
    assert await writer.flush(FLUSH_S), "the writer child is up (a flush commits nothing)"
    child = writer.child_pid
    assert child is not None

    async def signal_child(step: int) -> None:
        if step == 2:
            os.kill(child, stop)

    emitted = await play(roark, dev_server, "signalled", on_step=signal_child)

    assert writer.fell_back is None, writer.fell_back
    assert writer.child_pid == child, "the same child recorded the whole call"
    assert logs.messages("ERROR") == []
    assert_same_call(dev_server, "signalled", baseline)
    assert timeline(data_dir, "signalled") == timeline(tmp_path / "in-process", "no-signal")
    assert delivered_chunks(dev_server, "signalled") == emitted
    await stop_background_drainers()
    assert writer.close(FLUSH_S)
    assert not Path(f"/proc/{child}").exists(), "it exited once the bot closed, and was reaped"


@pytest.mark.anyio
async def test_a_child_stopped_for_the_whole_call_is_killed_and_the_bot_records_it_all(
    tmp_path: Path,
    data_dir: Path,
    dev_server: RunningDevServer,
    logs: LogCapture,
) -> None:
    """The child is stopped (SIGSTOP) for the whole call, so everything waits in the pipe.
    The bot once waited for it without a limit at close; now a child that owes answers
    and says nothing for ``STALL_S`` is killed, and the bot records what it was sent."""
    baseline = await in_process_baseline(tmp_path / "in-process", dev_server, "no-kill")
    roark = observer(data_dir, "killed-at-close", dev_server, writer_process=True, deliver=False)
    writer = writer_of(data_dir)
    assert isinstance(writer, ProcessWriter)
    assert await writer.flush(FLUSH_S)
    child = writer.child_pid
    assert child is not None
    emitted: list[bytes] = []

    @roark.audio_processor.event_handler("on_audio_data")
    async def tap(processor: object, audio: bytes, sample_rate: int, num_channels: int) -> None:
        emitted.append(bytes(audio))

    os.kill(child, signal.SIGSTOP)
    pipe = os.open(f"/proc/{child}/fd/0", os.O_RDONLY | os.O_NONBLOCK)  # the child's stdin
    try:
        fcntl.fcntl(pipe, fcntl.F_SETPIPE_SZ, 1 << 20)  # the bot's sender never blocks
        call = ScriptedCall(default_script())
        await run_pipeline([call, roark.audio_processor], observers=[roark])  # type: ignore[arg-type]
    finally:
        os.close(pipe)
    assert await asyncio.to_thread(writer.close, FLUSH_S)
    with contextlib.suppress(ProcessLookupError):
        os.kill(child, 0)
        raise AssertionError("the stopped child is still there")

    assert writer.fell_back is not None and str(child) in writer.fell_back
    errors = logs.messages("ERROR")
    assert len(errors) == 1 and FALLBACK in errors[0], errors
    assert timeline(data_dir, "killed-at-close") == timeline(tmp_path / "in-process", "no-kill")
    assert chunk_indices(data_dir, "killed-at-close") == list(range(len(emitted)))
    report = await Drainer(data_dir, KEY, dev_server.base_url, QUICK).run_once()
    assert report.delivered == len(emitted) + 2
    assert_same_call(dev_server, "killed-at-close", baseline)
    assert delivered_chunks(dev_server, "killed-at-close") == emitted
    assert_arrived_whole(dev_server, data_dir, "killed-at-close")
    await stop_background_drainers()


# ---- 4. the child cannot start, or dies at once ----


@pytest.mark.anyio
@pytest.mark.parametrize("failure", ["no-interpreter", "broken-install"])
async def test_a_child_that_cannot_start_or_dies_at_once_leaves_the_call_to_the_bot(
    tmp_path: Path,
    data_dir: Path,
    dev_server: RunningDevServer,
    logs: LogCapture,
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
) -> None:
    """``no-interpreter``: the bot's interpreter is gone from disk (a venv replaced under a
    running bot), so the child cannot be spawned. ``broken-install``: the child's
    ``import pipecat_roark`` fails (a broken package earlier on its PYTHONPATH), so it
    exits at once, before it reads a record."""
    if failure == "no-interpreter":
        monkeypatch.setattr(sys, "executable", str(tmp_path / "gone" / "python"))
        expected = "did not start"
    else:
        shadow = tmp_path / "shadow" / "pipecat_roark"
        shadow.mkdir(parents=True)
        (shadow / "__init__.py").write_text("raise ImportError('a broken install')\n")
        monkeypatch.setenv("PYTHONPATH", str(shadow.parent))
        expected = "exited with status 1"
    roark = observer(data_dir, "bot-records", dev_server, writer_process=True)
    writer = writer_of(data_dir)
    assert isinstance(writer, ProcessWriter)

    emitted = await play(roark, dev_server, "bot-records")

    why = writer.fell_back
    assert why is not None
    assert expected in why, why
    errors = logs.messages("ERROR")
    assert len(errors) == 1 and why in errors[0] and FALLBACK in errors[0], errors
    assert delivered_chunks(dev_server, "bot-records") == emitted
    assert chunk_indices(data_dir, "bot-records") == list(range(len(emitted)))
    assert_arrived_whole(dev_server, data_dir, "bot-records")
    await stop_background_drainers()


# ---- 5. a value of the environment variable that means nothing ----


@pytest.mark.anyio
async def test_an_unreadable_writer_process_variable_warns_once_and_records_in_process(
    data_dir: Path, dev_server: RunningDevServer, logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIPECAT_ROARK_WRITER_PROCESS", "garbage")
    for call_id in ("first", "second"):
        roark = observer(data_dir, call_id, dev_server)
        assert isinstance(writer_of(data_dir), Writer), "recorded by this process's thread"
        emitted = await play(roark, dev_server, call_id)
        assert delivered_chunks(dev_server, call_id) == emitted
        assert_arrived_whole(dev_server, data_dir, call_id)
    warnings = logs.matching("PIPECAT_ROARK_WRITER_PROCESS")
    assert warnings == [
        "pipecat-roark: PIPECAT_ROARK_WRITER_PROCESS='garbage' is not 1 or 0; "
        "recording in this process"
    ], warnings
    assert not logs.messages("ERROR")
    await stop_background_drainers()


# ---- 6. the pipe ----


def every_op() -> list[Any]:
    """One of each op that can cross the pipe, each event kind, a 256 KiB chunk."""
    at = 1_764_000_000_000_000
    events = [
        CallOpened(at=at, agent_id="a", agent_name="Agent", agent_prompt="Be kind. ✓"),
        UserSpeech(at=at + 1, started=True),
        BotSpeech(at=at + 2, started=False),
        Interruption(at=at + 3),
        UserText(at=at + 4, text="héllo", user_id="caller", language="en-US"),
        BotText(at=at + 5, text="Hi", spaced=True, source="llm", played=True),
        ToolCall(at=at + 6, tool_call_id="t1", name="lookup", arguments='{"n":1}'),
        ToolResult(at=at + 7, tool_call_id="t1", name="lookup", content='{"ok":true}'),
        RecordingStarted(at=at + 8),
        ChunkRecorded(at=at + 9, index=0, size=4, sample_rate=16000, num_channels=2),
        CallClosed(at=at + 10, reason="agent-ended"),
    ]
    audio = bytes(range(256)) * 1024  # 256 KiB
    return [
        OpenOp("call-1", events[0], "fp-1"),  # type: ignore[arg-type]
        *[EventOp("call-1", event) for event in events[1:]],
        ChunkOp("call-1", 0, audio, 16000, 2, at),
        SpooledChunkOp("call-1", 1, SpooledChunk("c/1.pcm", 4, "ab" * 32), 16000, 2, at),
        RemoteBarrier(7, "call-1"),
        RemoteBarrier(8, None),
        FinalizeOp("call-1", at + 11, "agent-ended"),
        ChunkWrittenOp(),
        StopOp(),
    ]


def test_every_op_crosses_a_real_pipe_intact_even_frames_larger_than_its_buffer() -> None:
    read_fd, write_fd = os.pipe()
    capacity = fcntl.fcntl(read_fd, fcntl.F_GETPIPE_SZ)
    ops = every_op()
    chunk = next(op for op in ops if isinstance(op, ChunkOp))
    chunks = [chunk._replace(idx=i, data=bytes([i]) + chunk.data[1:]) for i in range(8)]
    frames = [(1, ops[:3]), (2, ops), (3, []), (4, chunks)]  # the last: 2 MiB
    encoded = [encode_frame(seq, frame_ops) for seq, frame_ops in frames]
    assert len(encoded[1]) > capacity and len(encoded[3]) > 8 * capacity
    failures: list[BaseException] = []

    def send() -> None:  # the bot's sender thread, blocking on the full pipe
        try:
            for data in encoded:
                write_all(write_fd, data)
        except BaseException as exc:
            failures.append(exc)
        finally:
            os.close(write_fd)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        received = [decode_frame(read_fd) for _ in frames]
        assert decode_frame(read_fd) is None, "a clean end between frames"
    finally:
        sender.join(30)
        os.close(read_fd)
    assert not failures
    assert received == frames


@pytest.mark.parametrize("cut", ["in-its-length", "in-its-body", "its-last-byte"])
def test_a_frame_cut_short_by_a_dead_bot_is_an_eof_error(cut: str) -> None:
    read_fd, write_fd = os.pipe()
    try:
        whole = encode_frame(1, every_op()[:2])
        kept = {"in-its-length": 2, "in-its-body": 9, "its-last-byte": len(whole) - 1}[cut]
        os.write(write_fd, encode_frame(0, []) + whole[:kept])
        os.close(write_fd)
        write_fd = -1
        assert decode_frame(read_fd) == (0, [])
        with pytest.raises(EOFError):
            decode_frame(read_fd)
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)


def test_an_op_that_cannot_cross_is_a_flush_callback() -> None:
    """Why ``RemoteBarrier`` exists: a flush's callback does not pickle."""
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        encode_frame(1, [BarrierOp(lambda: None)])


# ---- 7. the event loop writes, and never waits for the child ----


@pytest.mark.anyio
async def test_a_full_pipe_never_blocks_the_loop_and_its_records_arrive_in_order(
    data_dir: Path, logs: LogCapture
) -> None:
    """The child is stopped while the loop submits more audio than the pipe holds: the
    loop writes what fits and goes on (the rest waits in the bot for the sender's
    blocking write); once the child runs again, every record is committed, in order."""
    writer = lifecycle.writer_for(data_dir, process=True, max_spool_bytes=1 << 30, min_free_bytes=0)
    assert isinstance(writer, ProcessWriter)
    assert await writer.flush(FLUSH_S)  # the child is up: the loop writes from now on
    child = writer.child_pid
    assert child is not None
    resumed_by_watchdog = threading.Event()

    def watchdog() -> None:  # a loop blocked on the pipe would never get past its sleeps
        if not loop_went_on.wait(60):
            resumed_by_watchdog.set()
            os.kill(child, signal.SIGCONT)

    loop_went_on = threading.Event()
    opened = CallOpened(at=1, agent_id="bot")
    chunks = [bytes([n]) * (256 * 1024) for n in range(8)]  # 2 MiB: twice the pipe
    os.kill(child, signal.SIGSTOP)
    threading.Thread(target=watchdog, daemon=True).start()
    try:
        writer.submit(OpenOp("full-pipe", opened, None))
        for n, chunk in enumerate(chunks):
            writer.submit(EventOp("full-pipe", UserText(at=10 + n, text=f"turn {n}")))
            writer.submit(ChunkOp("full-pipe", n, chunk, 16000, 2, 20 + n))
            for _ in range(3):
                await asyncio.sleep(0.01)  # the loop's turns, each writing what fits
        writer.submit(FinalizeOp("full-pipe", 99, "done"))
        await asyncio.sleep(0.05)
        loop_went_on.set()
        assert not resumed_by_watchdog.is_set(), "the loop waited for the stopped child"
        stdin = os.open(f"/proc/{child}/fd/0", os.O_RDONLY | os.O_NONBLOCK)
        try:
            assert pipe_bytes(stdin) >= 1 << 19, "the pipe filled up while the child slept"
        finally:
            os.close(stdin)
    finally:
        os.kill(child, signal.SIGCONT)
    assert await writer.flush(FLUSH_S)

    assert chunk_indices(data_dir, "full-pipe") == list(range(len(chunks)))
    with sqlite3.connect(data_dir / "wal.sqlite") as conn:
        paths = [p for (p,) in conn.execute("SELECT path FROM chunks ORDER BY idx")]
    assert [(data_dir / p).read_bytes() for p in paths] == chunks
    texts = [e.text for e in stored_events(data_dir, "full-pipe") if isinstance(e, UserText)]
    assert texts == [f"turn {n}" for n in range(len(chunks))]
    assert logs.messages("ERROR") == []
    assert writer.fell_back is None


def test_a_loop_that_ended_with_its_write_still_due_does_not_hold_up_the_next_one(
    data_dir: Path,
) -> None:
    """One process, two event loops in turn (a bot that runs asyncio.run twice): the first
    ends right after a record, before its gathered write ran; the second loop's records
    and flush still go through."""
    writer = lifecycle.writer_for(data_dir, process=True, max_spool_bytes=1 << 30, min_free_bytes=0)
    assert isinstance(writer, ProcessWriter)

    async def first() -> None:
        assert await writer.flush(FLUSH_S)  # the child is up: the loop writes
        writer.submit(OpenOp("two-loops", CallOpened(at=1, agent_id="bot"), None))
        # the loop ends here: its write, due in 2 ms, never runs

    async def second() -> bool:
        writer.submit(EventOp("two-loops", UserText(at=2, text="still here")))
        writer.submit(FinalizeOp("two-loops", 3, "done"))
        return await writer.flush(FLUSH_S)

    asyncio.run(first())
    assert asyncio.run(second())
    events = stored_events(data_dir, "two-loops")
    assert [type(e).__name__ for e in events] == ["CallOpened", "UserText"]
    assert writer.fell_back is None


@pytest.mark.anyio
async def test_a_call_the_child_committed_whole_but_never_acknowledged_is_not_given_again(
    tmp_path: Path, logs: LogCapture
) -> None:
    """The child commits a whole call (open to end) and dies before it says so (it says
    what is committed only every ACK_S): the bot's own writer must not be given that
    call's open again, which it would refuse as a reused id, with an error line about a
    call that is whole."""
    for attempt in range(10):  # bounded: each attempt kills the child inside the window
        directory = tmp_path / f"attempt-{attempt}"
        writer = lifecycle.writer_for(
            directory, process=True, max_spool_bytes=1 << 30, min_free_bytes=0
        )
        assert isinstance(writer, ProcessWriter)
        assert await writer.flush(FLUSH_S)
        await asyncio.sleep(0.2)  # the child's next word on commits is said at once
        writer.submit(OpenOp("whole", CallOpened(at=1, agent_id="bot"), None))
        writer.submit(EventOp("whole", UserText(at=2, text="hello")))
        writer.submit(FinalizeOp("whole", 3, "done"))
        assert await writer.flush(FLUSH_S)  # released: committed, by the child's word
        unacknowledged = len(writer._unacked)  # the frames the bot still keeps
        assert writer.child_pid is not None
        os.kill(writer.child_pid, signal.SIGKILL)
        assert await asyncio.to_thread(writer.close, FLUSH_S)
        lifecycle.close_all_writers()
        if unacknowledged and writer.fell_back is not None:
            break
    else:
        pytest.fail("the child said it committed the call before every kill")
    assert [m for m in logs.messages("ERROR") if "already recorded" in m] == []
    events = stored_events(directory, "whole")
    assert [type(e).__name__ for e in events] == ["CallOpened", "UserText"]
    with sqlite3.connect(directory / "wal.sqlite") as conn:
        assert conn.execute("SELECT state FROM calls WHERE id = 'whole'").fetchall() == [("ended",)]
