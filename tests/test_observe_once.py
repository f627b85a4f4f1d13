"""Each frame is observed once (issue 12), and played words still come out right.

Pipecat 1.x hands an observer every hop of every frame unless it asks for first pushes
only; the default audio processor reports what the output transport released, so a
real ``BaseOutputTransport`` is in these pipelines where played words matter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pipecat.frames.frames import Frame, OutputAudioRawFrame, StartFrame
from pipecat.observers.base_observer import FramePushed
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import TransportParams

from helpers import LogCapture, stored_events, without_times
from pipecat_roark import RoarkObserver
from pipecat_roark.events import BotSpeech, BotText, UserSpeech
from pipecat_roark.facts import PLAYED_BACKLOG
from pipecat_roark.testing import Bot, Pause, ScriptedCall, User, run_pipeline

pytestmark = pytest.mark.anyio

HOPS = 5


class Hop(FrameProcessor):
    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)


class CountingObserver(RoarkObserver):
    """Ours, counting what Pipecat delivers to it (the recording is the real one)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.deliveries: list[tuple[int, bool]] = []

    async def on_push_frame(self, data: FramePushed) -> None:
        self.deliveries.append((data.frame.id, data.first_push))
        await super().on_push_frame(data)


class LoopbackOutput(BaseOutputTransport):
    """A real output transport whose peer takes every audio frame at once."""

    def __init__(self) -> None:
        super().__init__(
            TransportParams(audio_out_enabled=True, audio_out_sample_rate=16000),
            name="transport.output(loopback)",
        )

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        return True


def bot_texts(directory: Path, call_id: str) -> list[tuple[str, bool]]:
    return [(e.text, e.played) for e in stored_events(directory, call_id) if isinstance(e, BotText)]


async def test_each_frame_reaches_the_observer_once_through_five_hops(data_dir: Path) -> None:
    roark = CountingObserver(agent_id="bot", pipecat_call_id="once", deliver=False)
    script = [Bot(["One", "two."]), User("Hello.", ms=200), Pause(100)]
    await run_pipeline(
        [ScriptedCall(script), *(Hop() for _ in range(HOPS)), roark.audio_processor],
        observers=[roark],
    )
    # Decided when the audio processor is set up, before any frame flows: 6 deliveries
    # per frame (one per hop) become 1.
    assert roark.observe_every_push is False
    ids = [frame_id for frame_id, _ in roark.deliveries]
    assert len(ids) == len(set(ids)) > 30
    assert all(first for _, first in roark.deliveries)
    assert without_times(
        [e for e in stored_events(data_dir, "once") if isinstance(e, (BotText, UserSpeech))]
    ) == [
        ("BotText", {"text": "One", "spaced": False, "source": "tts", "played": False}),
        ("BotText", {"text": "two.", "spaced": False, "source": "tts", "played": False}),
        ("UserSpeech", {"started": True}),
        ("UserSpeech", {"started": False}),
    ]


async def test_words_the_output_transport_released_are_recorded_as_played_in_push_order(
    data_dir: Path,
) -> None:
    roark = CountingObserver(agent_id="bot", pipecat_call_id="played", deliver=False)
    script = [
        Bot(["Hello", "there."], ms_per_word=200),
        User("Hi.", ms=200),
        Bot(["Bye."], ms_per_word=200),
    ]
    await run_pipeline(
        [ScriptedCall(script, pace=1.0), Hop(), LoopbackOutput(), roark.audio_processor],
        observers=[roark],
    )
    assert roark.observe_every_push is False
    assert all(first for _, first in roark.deliveries)
    assert bot_texts(data_dir, "played") == [
        ("Hello", False),
        ("Hello", True),
        ("there.", False),
        ("there.", True),
        ("Bye.", False),
        ("Bye.", True),
    ]
    # Released long before the caller's onset, so recorded before it: the turn is intact.
    events = [
        e
        for e in stored_events(data_dir, "played")
        if isinstance(e, UserSpeech) and e.started or isinstance(e, BotText) and e.played
    ]
    assert [getattr(e, "text", "user-onset") for e in events] == [
        "Hello",
        "there.",
        "user-onset",
        "Bye.",
    ]


async def test_an_output_transport_after_the_audio_processor_keeps_every_push(
    data_dir: Path,
) -> None:
    roark = CountingObserver(agent_id="bot", pipecat_call_id="misplaced", deliver=False)
    script = [Bot(["Only", "words."], ms_per_word=200)]
    await run_pipeline(
        [ScriptedCall(script, pace=1.0), roark.audio_processor, LoopbackOutput()],
        observers=[roark],
    )
    assert roark.observe_every_push is True
    ids = [frame_id for frame_id, _ in roark.deliveries]
    assert len(ids) > len(set(ids))
    assert bot_texts(data_dir, "misplaced") == [
        ("Only", False),
        ("Only", True),
        ("words.", False),
        ("words.", True),
    ]
    assert any(isinstance(e, BotSpeech) for e in stored_events(data_dir, "misplaced"))


async def test_played_texts_an_absent_observer_cannot_order_are_bounded_and_said_once(
    data_dir: Path, logs: LogCapture
) -> None:
    # The observer is left out of the worker: nothing ever puts the noted texts in order.
    roark = RoarkObserver(agent_id="bot", pipecat_call_id="absent", deliver=False)
    words = [f"w{n}" for n in range(PLAYED_BACKLOG + 10)]
    await run_pipeline(
        [ScriptedCall([Bot(words, ms_per_word=20)]), LoopbackOutput(), roark.audio_processor]
    )
    [line] = logs.matching("played TTS texts behind the pipeline")
    assert f"the observer is {PLAYED_BACKLOG} played TTS texts behind" in line
    # The end of the call records what is still noted, in order: the newest PLAYED_BACKLOG.
    assert bot_texts(data_dir, "absent") == [(w, True) for w in words[-PLAYED_BACKLOG:]]
