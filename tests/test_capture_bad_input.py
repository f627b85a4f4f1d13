"""Bad input never raises into the pipeline, says what to do in one line, and loses nothing else."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pipecat.frames.frames import (
    Frame,
    FunctionCallInProgressFrame,
    FunctionCallResultFrame,
    StartFrame,
    TranscriptionFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from helpers import LogCapture, skip_outside_ci, stored_events, without_times
from pipecat_roark import RoarkObserver
from pipecat_roark.capture import MAX_TEXT_CHARS
from pipecat_roark.lifecycle import close_all_writers, writer_for
from pipecat_roark.ops import BarrierOp
from pipecat_roark.store import SCHEMA_VERSION
from pipecat_roark.testing import Bot, Pause, ScriptedCall, User, run_pipeline
from test_capture_pipeline import AGENT, EXPECTED_DEFAULT_CALL, timeline_without_audio

pytestmark = pytest.mark.anyio


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_an_unusable_directory_is_reported_once_and_the_call_goes_on(
    tmp_path: Path, logs: LogCapture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    roark = RoarkObserver(**AGENT, data_dir=blocker / "roark", deliver=False)
    script = ScriptedCall()
    await run_pipeline([script, roark.audio_processor], observers=[roark])
    assert script.stats.steps_done == len(script.script)
    errors = logs.matching("will not be recorded")
    assert len(errors) == 1
    assert "cannot create data directory" in errors[0] and "PIPECAT_ROARK_DIR" in errors[0]


async def test_a_database_from_a_newer_version_is_left_untouched(
    data_dir: Path, logs: LogCapture
) -> None:
    writer_for(data_dir)
    close_all_writers()
    with sqlite3.connect(data_dir / "wal.sqlite") as conn:
        conn.execute("PRAGMA user_version = 99")
    before = sha(data_dir / "wal.sqlite")
    roark = RoarkObserver(**AGENT, deliver=False)
    await run_pipeline([ScriptedCall(), roark.audio_processor], observers=[roark])
    assert sha(data_dir / "wal.sqlite") == before
    [line] = logs.matching("will not be recorded")
    assert (
        f"schema version 99, newer than this pipecat-roark understands ({SCHEMA_VERSION})" in line
    )
    assert "upgrade pipecat-roark" in line


async def test_a_foreign_sqlite_file_is_left_untouched(data_dir: Path, logs: LogCapture) -> None:
    data_dir.mkdir(parents=True)
    with sqlite3.connect(data_dir / "wal.sqlite") as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER)")
        conn.execute("INSERT INTO invoices VALUES (7)")
    before = sha(data_dir / "wal.sqlite")
    roark = RoarkObserver(**AGENT, deliver=False)
    await run_pipeline([ScriptedCall(), roark.audio_processor], observers=[roark])
    assert sha(data_dir / "wal.sqlite") == before
    [line] = logs.matching("will not be recorded")
    assert "did not create" in line and "nothing was changed" in line


async def test_a_corrupt_database_is_quarantined_not_deleted_and_recording_goes_on(
    data_dir: Path, logs: LogCapture
) -> None:
    data_dir.mkdir(parents=True)
    garbage = b"this is not a database at all " * 200
    (data_dir / "wal.sqlite").write_bytes(garbage)
    roark = RoarkObserver(**AGENT, pipecat_call_id="call-1", deliver=False)
    await run_pipeline([ScriptedCall(), roark.audio_processor], observers=[roark])
    [moved] = list(data_dir.glob("wal.sqlite.corrupt-*"))
    assert moved.read_bytes() == garbage
    assert timeline_without_audio(data_dir, "call-1") == EXPECTED_DEFAULT_CALL
    [line] = logs.matching("moved to")
    assert "not deleted" in line and "fresh database" in line


async def test_a_locked_database_delays_commits_but_loses_nothing(data_dir: Path) -> None:
    writer_for(data_dir)
    blocker = sqlite3.connect(data_dir / "wal.sqlite", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    roark = RoarkObserver(**AGENT, pipecat_call_id="call-1", deliver=False)

    async def release(step: int) -> None:
        if step == 3 and blocker.in_transaction:
            blocker.execute("ROLLBACK")

    await run_pipeline([ScriptedCall(on_step=release), roark.audio_processor], observers=[roark])
    blocker.close()
    assert await writer_for(data_dir).flush(10)
    assert timeline_without_audio(data_dir, "call-1") == EXPECTED_DEFAULT_CALL


@contextmanager
def tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A real filesystem of its own at ``mount`` (skips where mounting is not allowed)."""
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        skip_outside_ci(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield mount
    finally:
        close_all_writers(timeout=2)
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem, so writes fail with a real ENOSPC."""
    with tmpfs(tmp_path / "tiny", "1m") as mount:
        yield mount


async def test_a_full_disk_stops_audio_without_gaps_and_keeps_the_call(
    tiny_disk: Path, logs: LogCapture
) -> None:
    directory = tiny_disk / "roark"
    roark = RoarkObserver(
        **AGENT,
        data_dir=directory,
        pipecat_call_id="call-1",
        deliver=False,
        chunk_bytes=64 * 1024,
        min_free_bytes=0,  # only the database's own reserve keeps audio off the last bytes
    )
    script = ScriptedCall([User("Hello?"), Pause(40_000), Bot(["Still", "here."])])
    await run_pipeline([script, roark.audio_processor], observers=[roark])
    assert script.stats.steps_done == 3

    with sqlite3.connect(directory / "wal.sqlite") as conn:
        indexes = [i for (i,) in conn.execute("SELECT idx FROM chunks ORDER BY idx")]
        state = conn.execute("SELECT state, end_reason FROM calls").fetchall()
    assert indexes == list(range(len(indexes))) and indexes, "audio up to the full disk, no gaps"
    assert len(indexes) < 40, "the disk really filled up"
    assert state == [("ended", "agent-ended")]
    names = [n for n, _ in without_times(stored_events(directory, "call-1"))]
    assert names[-1] in ("CallClosed", "ChunkRecorded") and "CallClosed" in names
    assert [
        f["text"] for n, f in without_times(stored_events(directory, "call-1")) if n == "BotText"
    ] == [
        "Still",
        "here.",
    ]
    [line] = logs.matching("no more audio is recorded for call 'call-1' (events still are)")
    assert "Free space or run `pipecat-roark drain` and `pipecat-roark prune`" in line
    assert not list(directory.rglob("*.tmp")), "no half-written chunk is left behind"


async def test_a_whole_recording_taken_in_one_batch_keeps_what_fits_of_it_on_a_full_disk(
    tiny_disk: Path, logs: LogCapture
) -> None:
    """What a loaded process does by chance, made the rule: the writer thread is held
    until the pause has played, so it takes most of the recording in one batch and admits
    those chunks before any file is written. Before, each was admitted on the same free
    space, the spool threads filled the disk, and the call could keep no audio (the
    flake of the test above; here 1 run in about 30, the spool threads' race deciding);
    now only what fits above the database's reserve is admitted. The exact interleavings
    are forced one by one in ``test_full_disk_audio``."""
    directory = tiny_disk / "roark"
    writer = writer_for(directory, min_free_bytes=0)
    gate = threading.Event()
    writer.submit(BarrierOp(lambda: gate.wait(30), "held"))
    roark = RoarkObserver(
        **AGENT,
        data_dir=directory,
        pipecat_call_id="call-1",
        deliver=False,
        chunk_bytes=64 * 1024,
        min_free_bytes=0,
    )

    async def release(step: int) -> None:
        if step == 2:  # the pause has played: its chunks are queued, none taken yet
            gate.set()

    script = ScriptedCall([User("Hello?"), Pause(40_000), Bot(["Still", "here."])], on_step=release)
    try:
        await run_pipeline([script, roark.audio_processor], observers=[roark])
    finally:
        gate.set()
    assert await writer.flush(10)
    with sqlite3.connect(directory / "wal.sqlite") as conn:
        indexes = [i for (i,) in conn.execute("SELECT idx FROM chunks ORDER BY idx")]
        state = conn.execute("SELECT state, end_reason FROM calls").fetchall()
    assert indexes == list(range(len(indexes))) and indexes, "audio up to the full disk, no gaps"
    assert state == [("ended", "agent-ended")]
    files = sorted(p.name for p in (directory / "chunks" / "call-1").iterdir())
    assert files == [f"{idx:06d}.pcm" for idx in indexes], "no stray or .tmp file"
    assert len(logs.matching("no more audio is recorded for call 'call-1' (events still are)")) == 1


async def test_the_free_space_floor_keeps_audio_off_a_nearly_full_disk(
    tiny_disk: Path, logs: LogCapture
) -> None:
    directory = tiny_disk / "roark"
    roark = RoarkObserver(**AGENT, data_dir=directory, pipecat_call_id="call-1", deliver=False)
    await run_pipeline([ScriptedCall(), roark.audio_processor], observers=[roark])

    with sqlite3.connect(directory / "wal.sqlite") as conn:
        assert conn.execute("SELECT count(*) FROM chunks").fetchone() == (0,)
    assert timeline_without_audio(directory, "call-1") == EXPECTED_DEFAULT_CALL
    [line] = logs.matching("free disk space is below 67108864 bytes")
    assert "no more audio is recorded for call 'call-1' (events still are)" in line


class EvilTranscription(TranscriptionFrame):
    """A frame whose text blows up when read: a buggy third-party service."""

    @property  # type: ignore[override]
    def text(self) -> str:
        raise RuntimeError("boom")

    @text.setter
    def text(self, value: str) -> None:
        pass

    def __str__(self) -> str:  # Pipecat formats every pushed frame; only we read .text
        return "EvilTranscription"


class GarbageSource(FrameProcessor):
    def __init__(self, frames: list[Frame]) -> None:
        super().__init__()
        self._frames = frames

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, StartFrame):
            self.create_task(self._play())

    async def _play(self) -> None:
        for frame in self._frames:
            await self.push_frame(frame)
        from pipecat_roark.compat import EndWorkerFrame  # EndTaskFrame before Pipecat 1.4

        await self.push_frame(EndWorkerFrame(), FrameDirection.UPSTREAM)


def garbage_frames() -> list[Frame]:
    no_language = TranscriptionFrame(text="no language attr", user_id="u", timestamp="")
    del no_language.language
    weird: list[Any] = [
        TranscriptionFrame(text=12345, user_id=None, timestamp=""),  # type: ignore[arg-type]
        TranscriptionFrame(text="\ud800abc", user_id="u", timestamp=""),
        TranscriptionFrame(text="x" * (MAX_TEXT_CHARS + 50), user_id="u", timestamp=""),
        EvilTranscription(text="", user_id="u", timestamp=""),
        no_language,
        FunctionCallInProgressFrame(
            function_name="f", tool_call_id="t1", arguments={"when": object()}
        ),
        FunctionCallResultFrame(function_name="f", tool_call_id="t1", arguments={}, result={1, 2}),
        FunctionCallInProgressFrame(function_name=None, tool_call_id=7, arguments=None),  # type: ignore[arg-type]
        TranscriptionFrame(text="still listening", user_id="u", timestamp=""),
    ]
    return weird


async def test_garbage_frames_are_stored_cleanly_and_never_raise(
    data_dir: Path, logs: LogCapture
) -> None:
    bad = RoarkObserver(**AGENT, pipecat_call_id="bad", deliver=False)
    good = RoarkObserver(**AGENT, pipecat_call_id="good", deliver=False)
    await asyncio.gather(
        run_pipeline([GarbageSource(garbage_frames()), bad.audio_processor], observers=[bad]),
        run_pipeline([ScriptedCall(), good.audio_processor], observers=[good]),
    )
    events = without_times(stored_events(data_dir, "bad"))
    texts = [f["text"] for n, f in events if n == "UserText"]
    assert texts[0] == "12345"
    assert texts[1] == "?abc"
    assert len(texts[2]) == MAX_TEXT_CHARS and texts[2].endswith("…")
    assert texts[3:] == ["no language attr", "still listening"]
    tools = [(n, f) for n, f in events if n.startswith("Tool")]
    assert tools[0][0] == "ToolCall" and tools[0][1]["arguments"].startswith(
        '{"when":"<object object at'
    )
    assert tools[1] == ("ToolResult", {"tool_call_id": "t1", "name": "f", "content": "{1, 2}"})
    assert tools[2] == ("ToolCall", {"tool_call_id": "7", "name": "", "arguments": "{}"})
    [failure] = logs.matching("on_push_frame failed")
    assert "RuntimeError: boom" in failure and "goes on" in failure
    # The other call in the same process is untouched.
    assert timeline_without_audio(data_dir, "good") == EXPECTED_DEFAULT_CALL


@pytest.fixture
def read_only_disk(tmp_path: Path) -> Iterator[Path]:
    """A real filesystem the test remounts read-only (root cannot write there either)."""
    with tmpfs(tmp_path / "ro", "4m") as mount:
        yield mount


async def test_a_read_only_directory_is_reported_and_what_is_there_stays_readable(
    read_only_disk: Path, logs: LogCapture
) -> None:
    from test_cli import cli

    directory = read_only_disk / "roark"
    earlier = RoarkObserver(**AGENT, data_dir=directory, pipecat_call_id="earlier", deliver=False)
    await run_pipeline([ScriptedCall(), earlier.audio_processor], observers=[earlier])
    close_all_writers()
    subprocess.run(["mount", "-o", "remount,ro", str(read_only_disk)], check=True)

    later = RoarkObserver(**AGENT, data_dir=directory, pipecat_call_id="later", deliver=False)
    script = ScriptedCall()
    await run_pipeline([script, later.audio_processor], observers=[later])
    assert script.stats.steps_done == len(script.script), "the call went on"
    [line] = logs.matching("will not be recorded")
    assert "is not writable" in line and "PIPECAT_ROARK_DIR" in line

    listed = cli(directory, "calls", "--json")  # inspection works on a read-only copy
    assert listed.returncode == 0, listed.stderr
    assert '"id": "earlier"' in listed.stdout
    drained = cli(directory, "drain")
    assert drained.returncode == 2
    assert "is not writable" in drained.stderr and "Traceback" not in drained.stderr
