"""RoarkObserver in real Pipecat pipelines: what a scripted call leaves in the WAL."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from pathlib import Path

import pytest
from pipecat.pipeline.task import PipelineParams

from helpers import LogCapture, stored_events, without_times
from pipecat_roark import RoarkObserver, compat
from pipecat_roark.events import ChunkRecorded, RecordingStarted
from pipecat_roark.lifecycle import writer_for
from pipecat_roark.testing import Bot, Pause, Realtime, ScriptedCall, Tool, User, run_pipeline

pytestmark = pytest.mark.anyio

AGENT = {"agent_id": "support-bot", "agent_name": "Support Bot", "agent_prompt": "You are kind."}

EXPECTED_DEFAULT_CALL = [
    (
        "CallOpened",
        {"agent_id": "support-bot", "agent_name": "Support Bot", "agent_prompt": "You are kind."},
    ),
    ("BotSpeech", {"started": True}),
    *[
        ("BotText", {"text": w, "spaced": False, "source": "tts", "played": False})
        for w in ["Hi,", "how", "can", "I", "help?"]
    ],
    ("BotSpeech", {"started": False}),
    ("UserSpeech", {"started": True}),
    ("UserSpeech", {"started": False}),
    ("UserText", {"text": "My order", "user_id": "caller", "language": "en-US"}),
    ("UserText", {"text": "is late.", "user_id": "caller", "language": "en-US"}),
    ("ToolCall", {"tool_call_id": "call_1", "name": "lookup_order", "arguments": '{"id":"42"}'}),
    (
        "ToolResult",
        {"tool_call_id": "call_1", "name": "lookup_order", "content": '{"status":"shipped"}'},
    ),
    ("BotSpeech", {"started": True}),
    *[
        ("BotText", {"text": w, "spaced": False, "source": "tts", "played": False})
        for w in ["It", "shipped", "yesterday"]
    ],
    ("Interruption", {}),
    ("UserSpeech", {"started": True}),
    ("UserSpeech", {"started": False}),
    ("UserText", {"text": "Thanks, bye.", "user_id": "caller", "language": "en-US"}),
    ("BotSpeech", {"started": True}),
    ("BotText", {"text": "Goodbye!", "spaced": False, "source": "tts", "played": False}),
    ("BotSpeech", {"started": False}),
    ("CallClosed", {"reason": "agent-ended"}),
]


def timeline_without_audio(directory: Path, call_id: str) -> list[tuple[str, dict[str, object]]]:
    events = stored_events(directory, call_id)
    return without_times(
        [e for e in events if not isinstance(e, (ChunkRecorded, RecordingStarted))]
    )


def deliveries(directory: Path, call_id: str) -> list[tuple[str, str]]:
    with sqlite3.connect(directory / "wal.sqlite") as conn:
        return conn.execute(
            "SELECT idempotency_key, state FROM deliveries WHERE call_id = ? ORDER BY id",
            (call_id,),
        ).fetchall()


@pytest.mark.parametrize("legacy", [False, True], ids=["PipelineWorker", "PipelineTask"])
async def test_a_scripted_call_is_recorded_frame_by_frame_in_order(
    data_dir: Path, legacy: bool
) -> None:
    roark = RoarkObserver(**AGENT, pipecat_call_id="call-1", deliver=False)
    await run_pipeline([ScriptedCall(), roark.audio_processor], observers=[roark], legacy=legacy)

    assert timeline_without_audio(data_dir, "call-1") == EXPECTED_DEFAULT_CALL
    events = stored_events(data_dir, "call-1")
    assert sum(isinstance(e, RecordingStarted) for e in events) == 1
    with sqlite3.connect(data_dir / "wal.sqlite") as conn:
        assert conn.execute("SELECT state, end_reason, agent_id FROM calls").fetchall() == [
            ("ended", "agent-ended", "support-bot")
        ]


async def test_chunk_files_concatenated_equal_the_bytes_the_audio_processor_emitted(
    data_dir: Path,
) -> None:
    roark = RoarkObserver(**AGENT, pipecat_call_id="call-1", deliver=False, chunk_bytes=16000)
    emitted: list[bytes] = []

    @roark.audio_processor.event_handler("on_audio_data")
    async def tap(processor: object, audio: bytes, sample_rate: int, num_channels: int) -> None:
        emitted.append(audio)

    script = ScriptedCall()
    await run_pipeline([script, roark.audio_processor], observers=[roark])

    with sqlite3.connect(data_dir / "wal.sqlite") as conn:
        rows = conn.execute(
            "SELECT idx, path, size, sha256, sample_rate, num_channels FROM chunks ORDER BY idx"
        ).fetchall()
    assert len(emitted) >= 3, "the script is long enough for several chunks and a tail"
    assert [r[0] for r in rows] == list(range(len(emitted)))
    files = [(data_dir / r[1]).read_bytes() for r in rows]
    assert files == emitted
    assert [r[2] for r in rows] == [len(b) for b in emitted]
    assert [r[3] for r in rows] == [hashlib.sha256(b).hexdigest() for b in emitted]
    assert {(r[4], r[5]) for r in rows} == {(16000, 2)}
    # The recording holds every sample the script played, user left and bot right.
    stereo = b"".join(emitted)
    left = b"".join(stereo[i : i + 2] for i in range(0, len(stereo), 4))
    right = b"".join(stereo[i + 2 : i + 4] for i in range(0, len(stereo), 4))
    assert left.replace(b"\x00\x00", b"") == bytes(script.stats.user_audio).replace(
        b"\x00\x00", b""
    )
    assert right.replace(b"\x00\x00", b"") == bytes(script.stats.bot_audio).replace(
        b"\x00\x00", b""
    )

    chunk_events = [e for e in stored_events(data_dir, "call-1") if isinstance(e, ChunkRecorded)]
    assert [(e.index, e.size, e.sample_rate, e.num_channels) for e in chunk_events] == [
        (r[0], r[2], 16000, 2) for r in rows
    ]
    keys = [k for k, _ in deliveries(data_dir, "call-1")]
    assert keys == (
        ["call-1:call-started"]
        + [f"call-1:chunk:{i}" for i in range(len(rows))]
        + ["call-1:call-ended"]
    )
    assert {state for _, state in deliveries(data_dir, "call-1")} == {"pending"}


async def test_files_and_folders_are_private(data_dir: Path) -> None:
    roark = RoarkObserver(**AGENT, pipecat_call_id="call-1", deliver=False, chunk_bytes=16000)
    await run_pipeline([ScriptedCall(), roark.audio_processor], observers=[roark])
    modes = {
        p.relative_to(data_dir).as_posix(): p.stat().st_mode & 0o777 for p in data_dir.rglob("*")
    }
    modes["."] = data_dir.stat().st_mode & 0o777
    assert {m for p, m in modes.items() if (data_dir / p).is_dir()} == {0o700}
    assert {m for p, m in modes.items() if (data_dir / p).is_file()} == {0o600}
    assert any(p.endswith(".pcm") for p in modes)


@pytest.mark.parametrize(
    ("end", "end_reason", "expected"),
    [
        ("end", None, "agent-ended"),
        ("end", "customer-hung-up", "customer-hung-up"),
        ("cancel", None, "agent-ended"),
        ("cancel", "too-long", "too-long"),
        ("stop", None, "unknown"),
    ],
)
async def test_end_reason_follows_the_frame_that_ended_the_call(
    data_dir: Path, end: str, end_reason: str | None, expected: str
) -> None:
    roark = RoarkObserver(**AGENT, pipecat_call_id="call-1", deliver=False)
    script = ScriptedCall([Bot(["Hello."]), User("Hi.")], end=end, end_reason=end_reason)
    await run_pipeline([script, roark.audio_processor], observers=[roark])
    with sqlite3.connect(data_dir / "wal.sqlite") as conn:
        assert conn.execute("SELECT state, end_reason FROM calls").fetchall() == [
            ("ended", expected)
        ]
    assert [k for k, _ in deliveries(data_dir, "call-1")][-1] == "call-1:call-ended"


async def test_aflush_ends_the_call_with_its_reason_and_is_idempotent(data_dir: Path) -> None:
    roark = RoarkObserver(**AGENT, pipecat_call_id="call-1", deliver=False)

    async def hang_up(step: int) -> None:
        if step == 2:
            await asyncio.gather(roark.aflush(), roark.aflush(reason="ignored-second-reason"))

    script = ScriptedCall([Bot(["Hello."]), User("Hi."), Bot(["Bye."])], on_step=hang_up)
    await run_pipeline([script, roark.audio_processor], observers=[roark])
    await roark.aflush(reason="third-call")
    with sqlite3.connect(data_dir / "wal.sqlite") as conn:
        assert conn.execute("SELECT state, end_reason FROM calls").fetchall() == [
            ("ended", "client-disconnected")
        ]
        assert conn.execute(
            "SELECT count(*) FROM deliveries WHERE kind = 'call-ended'"
        ).fetchone() == (1,)
    texts = [
        f.get("text") for name, f in timeline_without_audio(data_dir, "call-1") if name == "BotText"
    ]
    assert texts == ["Hello."], "nothing after the end is recorded"


async def test_realtime_spaced_deltas_are_stored_with_their_spacing_flag(data_dir: Path) -> None:
    roark = RoarkObserver(**AGENT, pipecat_call_id="call-1", deliver=False)
    script = ScriptedCall([User("Hello?"), Realtime(["Hel", "lo", " there", "!"])])
    await run_pipeline([script, roark.audio_processor], observers=[roark])
    bot = [f for name, f in timeline_without_audio(data_dir, "call-1") if name == "BotText"]
    assert [(f["text"], f["source"], f["spaced"]) for f in bot] == [
        ("Hel", "llm", True),
        ("Hel", "tts", True),
        ("lo", "llm", True),
        ("lo", "tts", True),
        (" there", "llm", True),
        (" there", "tts", True),
        ("!", "llm", True),
        ("!", "tts", True),
    ]


async def test_broadcast_tool_calls_and_speaking_frames_are_recorded_once_across_hops(
    data_dir: Path,
) -> None:
    from pipecat.processors.frame_processor import FrameProcessor

    class PassThrough(FrameProcessor):
        async def process_frame(self, frame, direction):  # type: ignore[no-untyped-def]
            await super().process_frame(frame, direction)
            await self.push_frame(frame, direction)

    roark = RoarkObserver(**AGENT, pipecat_call_id="call-1", deliver=False)
    script = ScriptedCall(
        [Tool("t1", "f", {"a": 1}, [1, 2]), Tool("t2", "g", "raw-args", None), Bot(["ok"])]
    )
    hops = [PassThrough() for _ in range(4)]
    await run_pipeline([script, *hops, roark.audio_processor], observers=[roark])
    names = [
        (n, f.get("tool_call_id"), f.get("arguments"), f.get("content"))
        for n, f in timeline_without_audio(data_dir, "call-1")
        if n.startswith("Tool")
    ]
    assert names == [
        ("ToolCall", "t1", '{"a":1}', None),
        ("ToolResult", "t1", None, "[1,2]"),
        ("ToolCall", "t2", "raw-args", None),
        ("ToolResult", "t2", None, ""),
    ]
    speech = [
        (n, f["started"]) for n, f in timeline_without_audio(data_dir, "call-1") if n == "BotSpeech"
    ]
    assert speech == [("BotSpeech", True), ("BotSpeech", False)]


async def test_concurrent_calls_in_one_process_share_one_writer_and_stay_apart(
    data_dir: Path,
) -> None:
    observers = [
        RoarkObserver(**AGENT, pipecat_call_id=f"call-{i}", deliver=False) for i in range(12)
    ]
    assert len({id(writer_for(o.data_dir)) for o in observers}) == 1
    await asyncio.gather(
        *(run_pipeline([ScriptedCall(), o.audio_processor], observers=[o]) for o in observers)
    )
    for i in range(12):
        assert timeline_without_audio(data_dir, f"call-{i}") == EXPECTED_DEFAULT_CALL


@pytest.mark.skipif(
    compat.PIPECAT_VERSION < (1, 0),
    reason="Pipecat 0.0.x honours PipelineParams(observers=...): tests/test_compat.py",
)
async def test_an_observer_left_in_pipeline_params_is_reported_and_audio_still_recorded(
    data_dir: Path, logs: LogCapture
) -> None:
    """PipelineParams(observers=[...]) is silently ignored by Pipecat 1.x: we say so."""
    from pipecat.pipeline.pipeline import Pipeline

    from pipecat_roark.compat import PipelineWorker, WorkerRunner, run_worker

    roark = RoarkObserver(**AGENT, pipecat_call_id="call-1", deliver=False, chunk_bytes=16000)
    emitted: list[bytes] = []

    @roark.audio_processor.event_handler("on_audio_data")
    async def tap(processor: object, audio: bytes, sample_rate: int, num_channels: int) -> None:
        emitted.append(audio)

    params = PipelineParams(
        audio_in_sample_rate=16000, audio_out_sample_rate=16000, observers=[roark]
    )  # type: ignore[call-arg]
    worker = PipelineWorker(
        Pipeline([ScriptedCall(), roark.audio_processor]),
        params=params,
        idle_timeout_secs=None,
        enable_rtvi=False,
        enable_turn_tracking=False,
    )
    await run_worker(WorkerRunner(handle_sigint=False), worker)

    warnings = logs.matching("RoarkObserver received no frames")
    assert len(warnings) == 1
    assert "PipelineWorker(pipeline, observers=[roark])" in warnings[0]
    assert "PipelineParams(observers=...) is silently ignored" in warnings[0]
    with sqlite3.connect(data_dir / "wal.sqlite") as conn:
        assert conn.execute("SELECT state, end_reason FROM calls").fetchall() == [
            ("ended", "agent-ended")
        ]
        sizes = [r[0] for r in conn.execute("SELECT size FROM chunks ORDER BY idx")]
    assert len(emitted) >= 3, "the script is long enough for several chunks"
    assert sizes == [len(chunk) for chunk in emitted], "every chunk the processor made"


async def test_cancelling_the_host_task_during_the_end_still_records_the_end(
    data_dir: Path,
) -> None:
    """The host cancels while the end is being committed (the DB is held locked): no loss."""
    roark = RoarkObserver(**AGENT, pipecat_call_id="call-1", deliver=False)
    await writer_for(data_dir).flush(5)
    blocker = sqlite3.connect(data_dir / "wal.sqlite", isolation_level=None)

    async def on_step(step: int) -> None:
        if step == 2:
            assert await writer_for(data_dir).flush(5)
            blocker.execute("BEGIN EXCLUSIVE")  # from here on the writer has to wait

    script = ScriptedCall([Bot(["Hello."]), User("Hi.")], on_step=on_step)
    task = asyncio.ensure_future(run_pipeline([script, roark.audio_processor], observers=[roark]))
    for _ in range(3000):  # bounded: until the observer is inside its end
        if roark._recorder.finish_task is not None or task.done():
            break
        await asyncio.sleep(0.01)
    assert roark._recorder.finish_task is not None and not roark._recorder.finish_task.done()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    blocker.execute("ROLLBACK")
    blocker.close()
    await roark._recorder.finish_task
    assert await writer_for(data_dir).flush(10)
    with sqlite3.connect(data_dir / "wal.sqlite") as conn:
        assert conn.execute("SELECT state, end_reason FROM calls").fetchall() == [
            ("ended", "agent-ended")
        ]
        assert conn.execute(
            "SELECT count(*) FROM deliveries WHERE kind = 'call-ended'"
        ).fetchone() == (1,)
    names = [n for n, _ in timeline_without_audio(data_dir, "call-1")]
    assert names[-3:] == ["UserSpeech", "UserText", "CallClosed"]


async def test_a_call_with_no_text_warns_about_the_empty_transcript(
    data_dir: Path, logs: LogCapture
) -> None:
    roark = RoarkObserver(**AGENT, pipecat_call_id="call-1", deliver=False)
    await run_pipeline([ScriptedCall([Pause(100)]), roark.audio_processor], observers=[roark])
    assert len(logs.matching("call-ended with empty transcript")) == 1


async def test_a_user_supplied_audio_processor_is_recorded_from_without_rearming(
    data_dir: Path,
) -> None:
    from pipecat.processors.audio.audio_buffer_processor import AudioBufferProcessor

    # auto_start_recording is Pipecat 1.5+ (older versions ignore it: the user arms it).
    auto = compat.PIPECAT_VERSION >= (1, 5)
    processor = AudioBufferProcessor(num_channels=2, buffer_size=8000, auto_start_recording=auto)
    if not auto:
        await processor.start_recording()
    roark = RoarkObserver(
        **AGENT, pipecat_call_id="call-1", deliver=False, audio_buffer_processor=processor
    )
    assert roark.audio_processor is processor
    emitted: list[bytes] = []

    @processor.event_handler("on_audio_data")
    async def tap(p: object, audio: bytes, sample_rate: int, num_channels: int) -> None:
        emitted.append(audio)

    await run_pipeline([ScriptedCall(), processor], observers=[roark])
    with sqlite3.connect(data_dir / "wal.sqlite") as conn:
        paths = [p for (p,) in conn.execute("SELECT path FROM chunks ORDER BY idx")]
    assert len(emitted) >= 4
    assert [(data_dir / p).read_bytes() for p in paths] == emitted
    assert sum(isinstance(e, RecordingStarted) for e in stored_events(data_dir, "call-1")) == 1
