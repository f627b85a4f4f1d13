"""The writer's bulkheads: an exception on one call's op costs that op's record (or that
call's audio) and nothing else. Several real pipelines share one writer; a fault point
raises on one call; every other call is recorded, then delivered to the dev server,
complete and exactly once, and the writer thread still commits at the end."""

from __future__ import annotations

import asyncio
import errno
import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from devserver_fixture import RunningDevServer
from helpers import LogCapture, stored_events
from pipecat_roark import RoarkObserver, faultpoints
from pipecat_roark.drain import Drainer
from pipecat_roark.events import BotText, CallOpened, UserText
from pipecat_roark.lifecycle import writer_for
from pipecat_roark.ops import BarrierOp, OpenOp
from pipecat_roark.testing import ScriptedCall, run_pipeline
from pipecat_roark.timeline import assemble_call_ended, assemble_call_started
from pipecat_roark.wire import encode
from test_capture_pipeline import timeline_without_audio
from test_drain import KEY, QUICK, assert_arrived_whole, chunk_files, record, short_script

pytestmark = pytest.mark.anyio

VICTIM = "victim"
BYSTANDERS = ("bystander-1", "bystander-2")


class Meteor(BaseException):
    """Not an Exception: what a careless ``except Exception`` lets through."""


@pytest.fixture(autouse=True)
def disarmed() -> Iterator[None]:
    faultpoints.clear()
    yield
    faultpoints.clear()


_REFERENCE: dict[str, object] = {}


async def reference_timeline(tmp_path: Path) -> object:
    """What a clean recording of the script holds (events, no audio), computed once."""
    if "timeline" not in _REFERENCE:
        clean = tmp_path / "reference"
        await record(clean, "reference")
        _REFERENCE["timeline"] = timeline_without_audio(clean, "reference")
        _REFERENCE["chunks"] = len(chunk_files(clean, "reference"))
    return _REFERENCE["timeline"]


async def record_together(directory: Path) -> None:
    """The victim and the bystanders, concurrently, through one process's writer."""
    await asyncio.gather(*(record(directory, c) for c in (VICTIM, *BYSTANDERS)))
    assert await writer_for(directory).flush(30), "the writer thread still commits"


def call_row(directory: Path, call_id: str) -> tuple[str, str | None] | None:
    with sqlite3.connect(directory / "wal.sqlite") as conn:
        row = conn.execute(
            "SELECT state, end_reason FROM calls WHERE id = ?", (call_id,)
        ).fetchone()
    return None if row is None else (row[0], row[1])


def event_names(directory: Path, call_id: str) -> list[str]:
    return [type(e).__name__ for e in stored_events(directory, call_id)]


async def deliver(directory: Path, server: RunningDevServer, *call_ids: str) -> None:
    for call_id in call_ids:
        report = await Drainer(directory, KEY, server.base_url, QUICK).run_once(
            call_id=call_id, budget_s=60
        )
        assert report.complete, str(report)


def assert_arrived_as_recorded(server: RunningDevServer, directory: Path, call_id: str) -> None:
    """Both payloads as assembled from what is stored, each once (for calls without audio)."""
    call = server.call(call_id)
    events = stored_events(directory, call_id)
    assert call["callStarted"] == json.loads(encode(assemble_call_started(call_id, events)))
    assert call["callEnded"] == json.loads(encode(assemble_call_ended(call_id, events)))
    assert call["eventCounts"] == {"callStarted": 1, "callEnded": 1}


async def assert_bystanders_whole(
    directory: Path, tmp_path: Path, server: RunningDevServer
) -> None:
    expected = await reference_timeline(tmp_path)
    for call_id in BYSTANDERS:
        assert call_row(directory, call_id) == ("ended", "agent-ended")
        assert timeline_without_audio(directory, call_id) == expected
        assert len(chunk_files(directory, call_id)) == _REFERENCE["chunks"]
    await deliver(directory, server, *BYSTANDERS)
    for call_id in BYSTANDERS:
        assert_arrived_whole(server, directory, call_id)


def victim_lines(logs: LogCapture) -> list[str]:
    return [m for m in logs.messages("ERROR") if repr(VICTIM) in m]


@pytest.mark.parametrize(
    "exc",
    [RuntimeError("boom"), ValueError("bad value"), KeyError("gone"), OSError(errno.EIO, "EIO")],
    ids=["RuntimeError", "ValueError", "KeyError", "OSError-EIO-permanent"],
)
async def test_a_failing_event_op_drops_only_that_calls_events(
    data_dir: Path, tmp_path: Path, dev_server: RunningDevServer, logs: LogCapture, exc: Exception
) -> None:
    faultpoints.inject("writer:event", exc, call_id=VICTIM)
    await record_together(data_dir)

    await assert_bystanders_whole(data_dir, tmp_path, dev_server)
    # The victim keeps what does not go through an event op: its open, audio and end.
    assert call_row(data_dir, VICTIM) == ("ended", "agent-ended")
    assert set(event_names(data_dir, VICTIM)) == {"CallOpened", "ChunkRecorded"}
    assert len(chunk_files(data_dir, VICTIM)) == _REFERENCE["chunks"]
    [line] = victim_lines(logs)
    assert line == (
        f"pipecat-roark: dropped one event record for call 'victim' ({type(exc).__name__}: "
        f"{exc}); the rest of the call is kept (further such drops for this call are "
        "counted, not logged)"
    )
    await deliver(data_dir, dev_server, VICTIM)
    assert_arrived_whole(dev_server, data_dir, VICTIM)


@pytest.mark.parametrize(
    ("point", "times"),
    [("writer:event", 3), ("writer:chunk-file", 2), ("writer:open", 2), ("writer:chunk", 3)],
)
async def test_a_brief_os_error_is_retried_and_the_call_is_complete(
    data_dir: Path,
    tmp_path: Path,
    dev_server: RunningDevServer,
    logs: LogCapture,
    point: str,
    times: int,
) -> None:
    faultpoints.inject(
        point, OSError(errno.EMFILE, "Too many open files"), call_id=VICTIM, times=times
    )
    await record_together(data_dir)

    await assert_bystanders_whole(data_dir, tmp_path, dev_server)
    assert call_row(data_dir, VICTIM) == ("ended", "agent-ended")
    assert timeline_without_audio(data_dir, VICTIM) == await reference_timeline(tmp_path)
    assert len(chunk_files(data_dir, VICTIM)) == _REFERENCE["chunks"]
    assert victim_lines(logs) == []
    assert writer_for(data_dir).stats.retried_ops >= 1
    await deliver(data_dir, dev_server, VICTIM)
    assert_arrived_whole(dev_server, data_dir, VICTIM)


@pytest.mark.parametrize(
    ("point", "exc", "needle"),
    [
        (
            "writer:chunk-file",
            OSError(errno.EIO, "Input/output error"),
            "chunk 0 could not be recorded (OSError: [Errno 5] Input/output error)",
        ),
        ("writer:chunk", ValueError("no chunk"), "chunk 0 could not be recorded (ValueError"),
    ],
)
async def test_a_failing_chunk_stops_only_that_calls_audio(
    data_dir: Path,
    tmp_path: Path,
    dev_server: RunningDevServer,
    logs: LogCapture,
    point: str,
    exc: Exception,
    needle: str,
) -> None:
    faultpoints.inject(point, exc, call_id=VICTIM)
    await record_together(data_dir)

    await assert_bystanders_whole(data_dir, tmp_path, dev_server)
    assert call_row(data_dir, VICTIM) == ("ended", "agent-ended")
    assert timeline_without_audio(data_dir, VICTIM) == await reference_timeline(tmp_path)
    assert chunk_files(data_dir, VICTIM) == []
    assert not (data_dir / "chunks" / VICTIM).exists() or not any(
        (data_dir / "chunks" / VICTIM).iterdir()
    ), "no file of a chunk that has no row"
    [line] = victim_lines(logs)
    assert needle in line and "no more audio is recorded for call 'victim'" in line
    await deliver(data_dir, dev_server, VICTIM)
    assert_arrived_as_recorded(dev_server, data_dir, VICTIM)


async def test_a_call_that_cannot_be_opened_is_not_recorded_and_the_others_are(
    data_dir: Path, tmp_path: Path, dev_server: RunningDevServer, logs: LogCapture
) -> None:
    faultpoints.inject("writer:open", KeyError("calls"), call_id=VICTIM)
    await record_together(data_dir)

    await assert_bystanders_whole(data_dir, tmp_path, dev_server)
    assert call_row(data_dir, VICTIM) is None
    assert not (data_dir / "chunks" / VICTIM).exists()
    [line] = victim_lines(logs)
    assert line == (
        f"pipecat-roark: call 'victim' could not be opened in {data_dir} (KeyError: 'calls'); "
        "it is not recorded. Other calls are not affected"
    )


@pytest.mark.parametrize(
    "exc",
    [
        UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"),
        OSError(errno.EIO, "Input/output error"),
    ],
    ids=["UnicodeEncodeError", "OSError-EIO-permanent"],
)
async def test_an_end_that_cannot_be_recorded_leaves_only_that_call_open(
    data_dir: Path,
    tmp_path: Path,
    dev_server: RunningDevServer,
    logs: LogCapture,
    exc: Exception,
) -> None:
    faultpoints.inject("writer:finalize", exc, call_id=VICTIM)
    await record_together(data_dir)

    await assert_bystanders_whole(data_dir, tmp_path, dev_server)
    assert call_row(data_dir, VICTIM) == ("open", None)
    assert timeline_without_audio(data_dir, VICTIM) == await reference_timeline(tmp_path)
    [line] = victim_lines(logs)
    assert line.startswith(
        f"pipecat-roark: the end of call 'victim' could not be recorded ({type(exc).__name__}"
    )


async def test_a_one_off_failure_of_a_batch_is_retried_op_by_op_and_loses_nothing(
    data_dir: Path, tmp_path: Path, dev_server: RunningDevServer, logs: LogCapture
) -> None:
    faultpoints.inject("writer:finalize", RuntimeError("once"), call_id=VICTIM, times=1)
    await record_together(data_dir)

    await assert_bystanders_whole(data_dir, tmp_path, dev_server)
    assert call_row(data_dir, VICTIM) == ("ended", "agent-ended")
    assert victim_lines(logs) == []
    await deliver(data_dir, dev_server, VICTIM)
    assert_arrived_whole(dev_server, data_dir, VICTIM)


async def test_a_dead_writer_thread_is_restarted_by_the_next_record_with_its_queue(
    data_dir: Path, tmp_path: Path, dev_server: RunningDevServer, logs: LogCapture
) -> None:
    writer = writer_for(data_dir)
    fired: list[bool] = []

    def bomb() -> None:  # outside every op's guard: only the supervisor can help
        if not fired:
            fired.append(True)
            raise Meteor("out of the blue")

    writer.add_commit_listener(bomb)
    await record_together(data_dir)

    assert fired == [True]
    assert writer.stats.restarts == 1
    [died] = logs.matching("it restarts on the next record")
    assert "died (Meteor: out of the blue)" in died
    [restarted] = logs.matching("restarted it")
    assert "had died (Meteor: out of the blue)" in restarted
    assert "Everything queued is kept" in restarted
    await assert_bystanders_whole(data_dir, tmp_path, dev_server)
    assert timeline_without_audio(data_dir, VICTIM) == await reference_timeline(tmp_path)
    await deliver(data_dir, dev_server, VICTIM)
    assert_arrived_whole(dev_server, data_dir, VICTIM)


async def test_a_deleted_database_is_noticed_and_the_open_call_recorded_again(
    data_dir: Path, dev_server: RunningDevServer, logs: LogCapture
) -> None:
    deleted: list[bool] = []

    async def delete_midway(step: int) -> None:
        if step == 2:
            assert await writer_for(data_dir).flush(10)
            (data_dir / "wal.sqlite").unlink()
            deleted.append(True)

    roark = RoarkObserver(
        agent_id="drain-bot",
        api_key=KEY,
        pipecat_call_id="survivor",
        data_dir=data_dir,
        deliver=False,
        chunk_bytes=8000,
    )
    script = ScriptedCall(short_script(0), on_step=delete_midway)
    await run_pipeline([script, roark.audio_processor], observers=[roark])
    await record(data_dir, "later")
    assert deleted == [True]

    [line] = logs.matching("while this process was recording into it")
    assert line.startswith(f"pipecat-roark: {data_dir.resolve() / 'wal.sqlite'} was deleted")
    assert "whatever was committed to the old file is gone with it" in line
    assert "1 call(s) still open here are recorded in it again" in line
    assert line.endswith("(their earlier events are lost, their audio is kept): ['survivor']")
    assert call_row(data_dir, "survivor") == ("ended", "agent-ended")
    assert call_row(data_dir, "later") == ("ended", "agent-ended")
    events = stored_events(data_dir, "survivor")
    names = [type(e).__name__ for e in events]
    assert names[0] == "CallOpened" and names.count("CallClosed") == 1
    texts = [e.text for e in events if isinstance(e, (BotText, UserText))]
    assert texts == ["Answer", "0"], "what came after the deletion, and nothing twice"
    assert_chunks_gapless(data_dir, "survivor")

    await deliver(data_dir, dev_server, "survivor", "later")
    assert_arrived_whole(dev_server, data_dir, "survivor")
    assert_arrived_whole(dev_server, data_dir, "later")


def assert_chunks_gapless(directory: Path, call_id: str) -> None:
    with sqlite3.connect(directory / "wal.sqlite") as conn:
        indexes = [
            i
            for (i,) in conn.execute(
                "SELECT idx FROM chunks WHERE call_id = ? ORDER BY idx", (call_id,)
            )
        ]
    assert indexes == list(range(len(indexes))) and len(indexes) >= 2


async def test_a_flush_waiting_on_a_thread_that_died_restarts_it(
    data_dir: Path, logs: LogCapture
) -> None:
    writer = writer_for(data_dir)
    gate = threading.Event()
    writer.submit(BarrierOp(lambda: gate.wait(30)))  # holds the thread until the gate opens
    fired: list[bool] = []

    def bomb() -> None:
        if not fired:
            fired.append(True)
            raise Meteor("with the flush in its batch")

    writer.add_commit_listener(bomb)
    writer.submit(OpenOp("lonely", CallOpened(at=1, agent_id="a"), None))
    flushed = asyncio.ensure_future(writer.flush(30))
    await asyncio.sleep(0)  # the flush's barrier is queued behind the open: one batch
    gate.set()

    assert await flushed, "no later record came: the waiting flush restarted the thread"
    assert fired == [True] and writer.stats.restarts == 1
    assert call_row(data_dir, "lonely") == ("open", None)
    [line] = logs.matching("restarted it")
    assert "had died (Meteor: with the flush in its batch)" in line
