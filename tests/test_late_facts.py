"""Facts that reach the observer after the call's end was noted.

Our audio processor hears the EndFrame inline, while Pipecat may still hold frames for
the observer (its own queue and task: a loaded loop makes it lag). A transcript piece
pushed before the end is the call's, even when it arrives late: it is kept, stored
before the end, and stamped no later than it. A frame pushed after the end is not the
call's. The end is stored once, last; and a call whose owner died after storing its end
is finalized there, with that reason.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from pipecat.frames.frames import EndFrame, Frame, TTSTextFrame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from helpers import stored_events
from pipecat_roark import RoarkObserver, call_ending, compat
from pipecat_roark.events import BotSpeech, BotText, CallClosed, CallOpened, ChunkRecorded, UserText
from pipecat_roark.ops import EventOp, OpenOp
from pipecat_roark.owner import Owner
from pipecat_roark.store import connect, now_us
from pipecat_roark.testing import Bot, PlayedOutput, ScriptedCall, run_pipeline
from pipecat_roark.timeline import assemble_call_ended, iso
from pipecat_roark.wire import encode
from pipecat_roark.writer import Writer
from test_capture_pipeline import AGENT, EXPECTED_DEFAULT_CALL, timeline_without_audio
from test_cli import cli_json
from test_played_words import WORD_BYTES
from test_timeline_pipeline import EXPECTED_TRANSCRIPT, untimed

HELD_TEXT = "Goodbye!"
"""The script's last bot text: the observer holds it until the end was noted."""
AFTER_END = "Too late."
"""A TTS text pushed after the end was noted: not the call's."""
WAIT_S = 10.0
"""Bound on every wait of this file (a failure, not a timing assertion)."""


class EndWitness(FrameProcessor):
    """Sits after ``roark.audio_processor``: an EndFrame reaching it was noted by the recorder.

    It then pushes one TTS text (after the end) and holds the EndFrame until the observer
    has handled that text: the observer's queue is in push order, so every frame pushed
    before the end has reached the observer by then, whatever the scheduling.
    """

    def __init__(self) -> None:
        super().__init__()
        self.end_noted = asyncio.Event()
        self.observer_caught_up = asyncio.Event()
        self.after_end = compat.tts_text_frame(AFTER_END)

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, EndFrame):
            self.end_noted.set()
            await self.push_frame(self.after_end, direction)
            await asyncio.wait_for(self.observer_caught_up.wait(), WAIT_S)
        await self.push_frame(frame, direction)


class LateObserver(RoarkObserver):
    """A RoarkObserver that is handed the script's last bot text only after the end was
    noted (and everything pushed after that text with it, in order)."""

    def __init__(self, witness: EndWitness, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.witness = witness
        self.held = 0

    async def on_push_frame(self, data: Any) -> None:
        frame = data.frame
        if isinstance(frame, TTSTextFrame) and frame.text == HELD_TEXT and not self.held:
            self.held += 1
            await asyncio.wait_for(self.witness.end_noted.wait(), WAIT_S)
        await super().on_push_frame(data)
        if frame is self.witness.after_end:
            self.witness.observer_caught_up.set()


@pytest.mark.anyio
@pytest.mark.parametrize("writer_process", [False, True], ids=["writer-thread", "writer-child"])
async def test_a_bot_text_pushed_before_the_end_but_observed_after_it_is_kept_before_the_end(
    data_dir: Path, writer_process: bool
) -> None:
    witness = EndWitness()
    roark = LateObserver(
        witness, **AGENT, pipecat_call_id="call-1", deliver=False, writer_process=writer_process
    )
    await run_pipeline([ScriptedCall(), roark.audio_processor, witness], observers=[roark])
    assert roark.held == 1 and witness.observer_caught_up.is_set()

    # The whole call, in push order, its end last and once; the text pushed after it absent.
    assert timeline_without_audio(data_dir, "call-1") == EXPECTED_DEFAULT_CALL
    events = stored_events(data_dir, "call-1")
    [closed] = [e for e in events if isinstance(e, CallClosed)]
    facts = [e for e in events if not isinstance(e, (ChunkRecorded, CallClosed))]
    assert max(e.at for e in facts) <= closed.at, "no fact after the end"
    goodbye = next(e for e in events if isinstance(e, BotText) and e.text == HELD_TEXT)
    assert goodbye.at == closed.at, "observed after the end: stamped at it, not later"

    ended = json.loads(encode(assemble_call_ended("call-1", events)))
    assert ended["callEndedReason"] == "agent-ended"
    assert ended["callEndedAt"] == ended["eventTimestamp"] == iso(closed.at)
    assert untimed(ended["transcript"]) == EXPECTED_TRANSCRIPT
    assert ended["transcript"][-1]["content"] == HELD_TEXT
    assert all(
        t["timestamp"] <= t["endTimestamp"] <= ended["callEndedAt"] for t in ended["transcript"]
    ), ended["transcript"]
    if not writer_process:  # `show` reads the same rows either way
        assert cli_json(data_dir, "show", "call-1")["payloads"]["callEnded"] == ended


@pytest.mark.anyio
async def test_a_call_whose_owner_died_after_storing_its_end_ends_there_once(
    tmp_path: Path,
) -> None:
    """The end is stored just before the call is made final, in a later commit when the
    recording's last chunk file is still being written (and older versions stored it as
    soon as it was heard). An owner killed in between leaves a stored end on an open call:
    the drainer ends the call there, with that reason, and adds no second end."""
    owner = Owner("same-host", 1, "v2:other-boot:1:5:5000:")  # judged by heartbeat alone
    opened = now_us()
    writer = Writer(tmp_path, owner=owner)
    try:
        writer.submit(OpenOp("c", CallOpened(at=opened, agent_id="a"), None))
        writer.submit(EventOp("c", UserText(at=opened + 10, text="Bye.")))
        writer.submit(EventOp("c", CallClosed(at=opened + 20, reason="agent-ended")))
        writer.submit(EventOp("c", BotText(at=opened + 30, text="Late.")))
        assert writer.flush_sync(WAIT_S)
    finally:
        writer.close()
    conn = connect(tmp_path)
    try:
        later = now_us() + 60_000_000
        assert call_ending.finalize_orphans(conn, now=later, grace_us=20_000_000) == ["c"]
        row = conn.execute("SELECT state, end_reason, ended_at FROM calls").fetchone()
        assert row == ("ended", "agent-ended", opened + 20)
        assert conn.execute("SELECT kind FROM deliveries ORDER BY id").fetchall() == [
            ("call-started",),
            ("call-ended",),
        ]
    finally:
        conn.close()
    events = stored_events(tmp_path, "c")
    assert [e for e in events if isinstance(e, CallClosed)] == [
        CallClosed(at=opened + 20, reason="agent-ended")
    ]
    ended = assemble_call_ended("c", events)
    assert (ended.call_ended_reason, ended.call_ended_at) == ("agent-ended", iso(opened + 20))


def test_a_call_stored_with_late_facts_after_its_end_has_no_turn_after_the_end() -> None:
    """Versions before this one stored a late fact after the end, stamped when observed.
    Assembly happens at delivery, so such a call still delivers its words, at the end."""
    events = [
        CallOpened(at=1_000, agent_id="a"),
        BotSpeech(at=2_000, started=True),
        BotText(at=2_100, text="Good"),
        CallClosed(at=3_000, reason="agent-ended"),
        BotText(at=3_500, text="bye!"),
        BotSpeech(at=3_600, started=False),
    ]
    ended = assemble_call_ended("c", events)
    assert ended.call_ended_at == iso(3_000)
    assert [(t.content, t.timestamp, t.end_timestamp) for t in ended.transcript or []] == [
        ("Good bye!", iso(2_000), iso(3_000))
    ]


class HeldPlayback(PlayedOutput):
    """A real output transport whose playback stalls after ``budget_bytes`` until
    ``resume`` is set: its last words are released only then."""

    def __init__(self, resume: asyncio.Event, budget_bytes: int) -> None:
        super().__init__()
        self.resume = resume
        self.budget_bytes = budget_bytes

    async def write_audio_frame(self, frame: Any) -> bool:
        if len(self.played) >= self.budget_bytes:
            await asyncio.wait_for(self.resume.wait(), WAIT_S)
        return await super().write_audio_frame(frame)


class SeesTheEnd(RoarkObserver):
    """Sets ``saw_end`` once it was handed the EndFrame (its first push, at the head)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.saw_end = asyncio.Event()

    async def on_push_frame(self, data: Any) -> None:
        await super().on_push_frame(data)
        if isinstance(data.frame, EndFrame):
            self.saw_end.set()


@pytest.mark.anyio
async def test_words_the_transport_plays_after_the_observer_saw_the_end_frame_are_the_calls(
    data_dir: Path,
) -> None:
    """The observer sees the EndFrame where it enters the pipeline, while the output
    transport still holds the last words' audio; the call ends after they played."""
    roark = SeesTheEnd(agent_id="played", pipecat_call_id="played-1", deliver=False)
    output = HeldPlayback(roark.saw_end, budget_bytes=WORD_BYTES)
    script = ScriptedCall([Bot(["Hello", "there."])], speaking_edges=False)
    await run_pipeline([script, output, roark.audio_processor], observers=[roark])

    assert roark.saw_end.is_set() and output.spoken == ["Hello", "there."]
    events = stored_events(data_dir, "played-1")
    facts = [e for e in events if not isinstance(e, ChunkRecorded)]
    assert [e.text for e in facts if isinstance(e, BotText) and e.played] == output.spoken
    assert [e for e in facts if isinstance(e, CallClosed)] == [facts[-1]], "one end, last"
    assert max(e.at for e in facts) == facts[-1].at
    ended = assemble_call_ended("played-1", events)
    assert ended.call_ended_reason == "agent-ended"
    assert [t.content for t in ended.transcript or []] == ["Hello there."]
