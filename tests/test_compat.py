"""Version edges: what differs between Pipecat 0.0.x and 1.x, pinned on the installed Pipecat.

The matrix (scripts/matrix) runs this file on the oldest supported Pipecat and on 1.0; the
main suite runs it on the locked latest. Each test states what that version does.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from pipecat.frames.frames import Frame
from pipecat.pipeline.task import PipelineParams

from devserver_fixture import RunningDevServer
from helpers import LogCapture, stored_events, without_times
from pipecat_roark import RoarkObserver, compat
from pipecat_roark.events import CallClosed, ChunkRecorded, RecordingStarted
from pipecat_roark.testing import Bot, ScriptedCall, User, run_pipeline
from pipecat_roark.timeline import assemble_call_ended
from pipecat_roark.wire import encode
from test_capture_pipeline import AGENT, EXPECTED_DEFAULT_CALL, timeline_without_audio
from test_cli import cli, cli_json
from test_drain import chunk_files, record

pytestmark = pytest.mark.anyio

V = compat.PIPECAT_VERSION


def test_the_compat_names_are_pipecats_own_classes_for_this_version() -> None:
    import pipecat.frames.frames as frames

    assert version("pipecat-ai").startswith(".".join(str(n) for n in V))
    if V >= (1, 3):
        from pipecat.pipeline.worker import PipelineWorker
        from pipecat.workers.runner import WorkerRunner

        assert (compat.PipelineWorker, compat.WorkerRunner) == (PipelineWorker, WorkerRunner)
        assert compat.HAS_WORKER
    else:
        from pipecat.pipeline.runner import PipelineRunner
        from pipecat.pipeline.task import PipelineTask

        assert (compat.PipelineWorker, compat.WorkerRunner) == (PipelineTask, PipelineRunner)
        assert not compat.HAS_WORKER
    prefix = "Worker" if V >= (1, 4) else "Task"
    assert compat.EndWorkerFrame is getattr(frames, f"End{prefix}Frame")
    assert compat.CancelWorkerFrame is getattr(frames, f"Cancel{prefix}Frame")
    assert compat.StopWorkerFrame is getattr(frames, f"Stop{prefix}Frame")
    frame = compat.tts_text_frame("Hello.")
    assert frame.text == "Hello."
    assert getattr(frame, "text_type" if V >= (1, 13) else "aggregated_by") == "sentence"


@pytest.mark.skipif(V >= (1, 0), reason="PipelineParams has no observers field from Pipecat 1.0")
async def test_on_pipecat_0_0_an_observer_in_pipeline_params_records_the_whole_call(
    data_dir: Path, logs: LogCapture
) -> None:
    """0.0.x still honours the deprecated PipelineParams(observers=[...]): no warning there."""
    from pipecat.pipeline.pipeline import Pipeline

    roark = RoarkObserver(**AGENT, pipecat_call_id="call-1", deliver=False)
    params = PipelineParams(
        audio_in_sample_rate=16000, audio_out_sample_rate=16000, observers=[roark]
    )
    worker = compat.PipelineWorker(
        Pipeline([ScriptedCall(), roark.audio_processor]),
        params=params,
        idle_timeout_secs=None,
        enable_rtvi=False,
        enable_turn_tracking=False,
    )
    await compat.run_worker(compat.WorkerRunner(handle_sigint=False), worker)

    assert logs.matching("RoarkObserver received no frames") == []
    assert timeline_without_audio(data_dir, "call-1") == EXPECTED_DEFAULT_CALL
    with sqlite3.connect(data_dir / "wal.sqlite") as conn:
        assert conn.execute("SELECT state, end_reason FROM calls").fetchall() == [
            ("ended", "agent-ended")
        ]


class OldInterruptions(ScriptedCall):
    """Broadcasts the deprecated StartInterruptionFrame (0.0.85-0.0.x; gone in 1.0) where the
    script interrupts, as bots written for older Pipecat still do."""

    async def _broadcast(self, frame_cls: type[Frame], **kwargs: Any) -> None:
        from pipecat.frames.frames import InterruptionFrame, StartInterruptionFrame

        if frame_cls is InterruptionFrame:
            frame_cls = StartInterruptionFrame
        await super()._broadcast(frame_cls, **kwargs)


@pytest.mark.skipif(V >= (1, 0), reason="StartInterruptionFrame was removed in Pipecat 1.0")
async def test_on_pipecat_0_0_a_start_interruption_frame_is_one_interruption(
    data_dir: Path,
) -> None:
    roark = RoarkObserver(**AGENT, pipecat_call_id="call-1", deliver=False)
    script = OldInterruptions([Bot(["One", "two", "three"], interrupt_after=1), User("Stop.")])
    await run_pipeline([script, roark.audio_processor], observers=[roark])
    names = [n for n, _ in timeline_without_audio(data_dir, "call-1")]
    assert names.count("Interruption") == 1
    assert names[names.index("BotText") + 1 : names.index("Interruption") + 1] == ["Interruption"]


class LaggingObserver(RoarkObserver):
    """A RoarkObserver whose hook is slow, so Pipecat still holds events for it at teardown
    (what a loaded event loop does to any observer). Counts what arrives after cleanup."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cleaning = False
        self.after_cleanup = 0

    async def on_push_frame(self, data: Any) -> None:
        if self.cleaning:
            self.after_cleanup += 1
        await asyncio.sleep(0.001)
        await super().on_push_frame(data)

    async def cleanup(self) -> None:
        self.cleaning = True
        await super().cleanup()


async def test_events_delivered_after_cleanup_do_not_reopen_or_extend_a_finished_call(
    data_dir: Path,
) -> None:
    """Pipecat < 1.0 calls an observer's cleanup while its queue is still being delivered;
    1.0+ stops delivery first. Either way the end is recorded once, from the inline EndFrame,
    and nothing is written for the call after it was finalized. However far the observer
    lags (the EndFrame is heard inline before it), what it is handed before the teardown
    is stored before the end and stamped no later than it (test_late_facts.py pins the
    interleaving itself)."""
    roark = LaggingObserver(**AGENT, pipecat_call_id="call-1", deliver=False)
    await run_pipeline([ScriptedCall(), roark.audio_processor], observers=[roark])
    if V < (1, 0):
        assert roark.after_cleanup > 0, "0.0.x delivers events during and after cleanup"
    else:
        assert roark.after_cleanup == 0, "1.0+ stops delivery before cleanup"
    with sqlite3.connect(data_dir / "wal.sqlite") as conn:
        assert conn.execute("SELECT state, end_reason FROM calls").fetchall() == [
            ("ended", "agent-ended")
        ]
        chunks = conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
        assert conn.execute("SELECT kind FROM deliveries WHERE kind = 'call-ended'").fetchall() == [
            ("call-ended",)
        ]
    events = stored_events(data_dir, "call-1")
    timeline = without_times(
        [e for e in events if not isinstance(e, (ChunkRecorded, RecordingStarted))]
    )
    assert timeline[0][0] == "CallOpened"
    assert [n for n, _ in timeline].count("CallClosed") == 1
    assert timeline[-1] == ("CallClosed", {"reason": "agent-ended"})
    assert sum(isinstance(e, ChunkRecorded) for e in events) == chunks >= 1
    assert timeline == EXPECTED_DEFAULT_CALL[: len(timeline) - 1] + [timeline[-1]]
    [closed] = [e for e in events if isinstance(e, CallClosed)]
    assert max(e.at for e in events if not isinstance(e, ChunkRecorded)) == closed.at


async def test_a_supplied_audio_processor_that_never_recorded_is_reported(
    data_dir: Path, logs: LogCapture
) -> None:
    """Pipecat < 1.5 ignores auto_start_recording: such a processor records nothing, silently
    on Pipecat's side. We say so, once, with what to do."""
    from pipecat.processors.audio.audio_buffer_processor import AudioBufferProcessor

    processor = AudioBufferProcessor(num_channels=2, buffer_size=8000)
    roark = RoarkObserver(
        **AGENT, pipecat_call_id="call-1", deliver=False, audio_buffer_processor=processor
    )
    await run_pipeline([ScriptedCall(), processor], observers=[roark])
    [warning] = logs.matching("has no recording")
    assert "call call-1" in warning and "await processor.start_recording()" in warning
    with sqlite3.connect(data_dir / "wal.sqlite") as conn:
        assert conn.execute("SELECT count(*) FROM chunks").fetchone() == (0,)
        assert conn.execute("SELECT state, end_reason FROM calls").fetchall() == [
            ("ended", "agent-ended")
        ]


async def test_the_cli_shows_and_drains_a_call_recorded_on_this_pipecat(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    """What a user of this Pipecat does after a call: look at it, then deliver it."""
    await record(data_dir, "call-1")
    events = stored_events(data_dir, "call-1")
    ended = json.loads(encode(assemble_call_ended("call-1", events)))
    assert ended["callEndedReason"] == "agent-ended"
    assert [t["content"] for t in ended["transcript"]] == ["Hello 0.", "Question 0?", "Answer 0"]

    durable = chunk_files(data_dir, "call-1")
    assert len(durable) >= 2

    shown = cli_json(data_dir, "show", "call-1")
    assert shown["payloads"]["callEnded"] == ended
    done = cli(data_dir, "drain", base_url=dev_server.base_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith(f"{len(durable) + 2} delivered")

    call = dev_server.call("call-1")
    assert call["callEnded"] == ended
    assert call["eventCounts"] == {"callStarted": 1, "callEnded": 1}
    assert dev_server.recording("call-1")[44:] == b"".join(durable), "byte-identical audio"
