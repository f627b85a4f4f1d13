"""Scripted Pipecat calls: real pipelines fed synthetic audio and text, no services.

Used by our tests, the offline demo, the benchmarks and the crash harness, and
usable by anyone who wants to check their wiring without STT/LLM/TTS keys. A script
is a list of steps; ``ScriptedCall`` pushes them from the head of a real pipeline the
way a transport and services would (speaking edges, 20 ms audio ticks, transcription,
TTS words, tool-call frames, interruptions), then asks the worker to end.
``PlayedOutput`` is a minimal real output transport, so which words were played is
decided by Pipecat's own media sender, as in a live call.
"""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    Frame,
    FunctionCallInProgressFrame,
    FunctionCallResultFrame,
    InputAudioRawFrame,
    InterruptionFrame,
    LLMTextFrame,
    OutputAudioRawFrame,
    StartFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSTextFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.task import PipelineParams
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import TransportParams

# Absolute on purpose: scripts/bench_worker.py loads this file outside the package.
from pipecat_roark import compat
from pipecat_roark.compat import CancelWorkerFrame, EndWorkerFrame, StopWorkerFrame, tts_text_frame

__all__ = [
    "Bot",
    "Interrupt",
    "Pause",
    "PlayedOutput",
    "Realtime",
    "ScriptedCall",
    "Tool",
    "User",
    "default_script",
    "run_pipeline",
    "tone",
]

SAMPLE_RATE = 16000
TICK_MS = 20


def tone(freq: float, ms: int, sample_rate: int = SAMPLE_RATE, start: int = 0) -> bytes:
    """Mono s16le sine samples: a stand-in for speech that is easy to recognise in a WAV.

    Returns:
        ``ms`` milliseconds of a ``freq`` Hz sine, from sample ``start`` of the wave (so
        consecutive pieces join without a click).
    """
    count = sample_rate * ms // 1000
    return b"".join(
        struct.pack("<h", int(8000 * math.sin(2 * math.pi * freq * (start + i) / sample_rate)))
        for i in range(count)
    )


@dataclass(frozen=True)
class User:
    """The caller speaks ``text`` for ``ms`` (a 450 Hz tone); the STT result follows the stop."""

    text: str | Sequence[str]
    ms: int = 400
    language: str | None = "en-US"


@dataclass(frozen=True)
class Bot:
    """The bot speaks ``words`` (TTS words interleaved with 650 Hz audio).

    ``interrupt_after`` cuts the turn after that many words with an InterruptionFrame
    (the rest are never generated). With a ``PlayedOutput`` in the pipeline, the words
    count as played as the transport releases them.
    """

    words: Sequence[str]
    ms_per_word: int = 100
    interrupt_after: int | None = None
    spaced: bool = False


@dataclass(frozen=True)
class Realtime:
    """A speech-to-speech service's spaced text deltas (``includes_inter_frame_spaces``)."""

    deltas: Sequence[str]


@dataclass(frozen=True)
class Tool:
    """The LLM calls a function and gets ``result``: an in-progress frame, then the result."""

    tool_call_id: str
    name: str
    arguments: Any
    result: Any


@dataclass(frozen=True)
class Pause:
    """A pause: ``ms`` milliseconds of silence from the caller."""

    ms: int


@dataclass(frozen=True)
class Interrupt:
    """The caller talks over the bot: an InterruptionFrame, then the bot stops speaking."""


Step = User | Bot | Realtime | Tool | Pause | Interrupt


def default_script() -> list[Step]:
    """Bot speaks first, the user asks, a tool runs, the bot answers and is interrupted.

    Returns:
        A fresh list of the steps, ending with the user's goodbye.
    """
    return [
        Bot(["Hi,", "how", "can", "I", "help?"]),
        Pause(100),
        User(["My order", "is late."]),
        Tool("call_1", "lookup_order", {"id": "42"}, {"status": "shipped"}),
        Bot(["It", "shipped", "yesterday", "and", "arrives", "tomorrow."], interrupt_after=3),
        User("Thanks, bye."),
        Bot(["Goodbye!"]),
    ]


@dataclass
class ScriptStats:
    """What the script pushed: the tests compare the recording against it."""

    user_audio: bytearray = field(default_factory=bytearray)
    bot_audio: bytearray = field(default_factory=bytearray)
    steps_done: int = 0


class ScriptedCall(FrameProcessor):
    """Sits at the head of a pipeline and plays a script after the StartFrame.

    ``pace`` 1.0 is real time, 0 as fast as the pipeline takes it. ``end`` is how
    the call ends: "end" (EndWorkerFrame), "cancel", "stop", or "hang" (never:
    for crash tests that kill the process), with ``end_reason`` on End/Cancel.
    ``on_step`` is awaited after each step. ``speaking_edges`` False leaves the bot's
    speaking edges to a real output transport downstream (``PlayedOutput``), which
    reports them as it plays, as in a live call.
    """

    def __init__(
        self,
        script: Sequence[Step] | None = None,
        *,
        pace: float = 0.0,
        end: str = "end",
        on_step: Callable[[int], Awaitable[None]] | None = None,
        end_reason: str | None = None,
        speaking_edges: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.end_reason = end_reason
        self.speaking_edges = speaking_edges
        self.script = list(default_script() if script is None else script)
        self.pace = pace
        self.end = end
        self.on_step = on_step
        self.stats = ScriptStats()
        self._task: asyncio.Task[None] | None = None
        self._user_phase = 0
        self._bot_phase = 0

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Pass every frame on; the StartFrame also starts playing the script."""
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, StartFrame) and self._task is None:
            self._task = self.create_task(self._play())

    async def cleanup(self) -> None:
        """Stop a script still playing when the pipeline tears down."""
        await super().cleanup()
        if self._task is not None and not self._task.done():
            await self.cancel_task(self._task)

    async def _broadcast(self, frame_cls: type[Frame], **kwargs: Any) -> None:
        """Push both directions with sibling ids, as transports and LLM services do (1.x)."""
        broadcast = getattr(self, "broadcast_frame", None)
        if broadcast is None:  # pragma: no cover - Pipecat 0.0.x
            await self.push_frame(frame_cls(**kwargs))
        else:
            await broadcast(frame_cls, **kwargs)

    async def _tick(self) -> None:
        await asyncio.sleep(TICK_MS / 1000 * self.pace)

    async def _user_audio(self, ms: int, voiced: bool) -> None:
        for _ in range(max(1, ms // TICK_MS)):
            if voiced:
                chunk = tone(450, TICK_MS, start=self._user_phase)
            else:
                chunk = bytes(SAMPLE_RATE * TICK_MS // 1000 * 2)
            self._user_phase += SAMPLE_RATE * TICK_MS // 1000
            self.stats.user_audio.extend(chunk)
            await self.push_frame(
                InputAudioRawFrame(audio=chunk, sample_rate=SAMPLE_RATE, num_channels=1)
            )
            await self._tick()

    async def _bot_audio(self, ms: int) -> None:
        for _ in range(max(1, ms // TICK_MS)):
            chunk = tone(650, TICK_MS, start=self._bot_phase)
            self._bot_phase += SAMPLE_RATE * TICK_MS // 1000
            self.stats.bot_audio.extend(chunk)
            # As a TTS service makes it: the output transport reports the bot speaking
            # from TTS audio only (plain output audio could be anything).
            cls = OutputAudioRawFrame if self.speaking_edges else TTSAudioRawFrame
            await self.push_frame(cls(audio=chunk, sample_rate=SAMPLE_RATE, num_channels=1))
            await self._tick()

    async def _play(self) -> None:
        for number, step in enumerate(self.script, start=1):
            await self._play_step(step)
            self.stats.steps_done = number
            if self.on_step is not None:
                await self.on_step(number)
        if self.end == "end":
            await self.push_frame(EndWorkerFrame(reason=self.end_reason), FrameDirection.UPSTREAM)
        elif self.end == "cancel":
            await self.push_frame(
                CancelWorkerFrame(reason=self.end_reason), FrameDirection.UPSTREAM
            )
        elif self.end == "stop":
            await self.push_frame(StopWorkerFrame(), FrameDirection.UPSTREAM)

    async def _play_step(self, step: Step) -> None:
        if isinstance(step, Pause):
            await self._user_audio(step.ms, voiced=False)
        elif isinstance(step, Interrupt):
            await self._broadcast(InterruptionFrame)
            await self._bot_edge(BotStoppedSpeakingFrame)
        elif isinstance(step, User):
            await self._broadcast(UserStartedSpeakingFrame)
            await self._user_audio(step.ms, voiced=True)
            await self._broadcast(UserStoppedSpeakingFrame)
            parts = (
                [step.text] if isinstance(step, User) and isinstance(step.text, str) else step.text
            )
            for part in parts:
                await self.push_frame(
                    TranscriptionFrame(
                        text=part,
                        user_id="caller",
                        timestamp="",
                        language=step.language,  # type: ignore[arg-type]
                    )
                )
        elif isinstance(step, Bot):
            await self._play_bot(step)
        elif isinstance(step, Realtime):
            await self._bot_edge(BotStartedSpeakingFrame)
            for delta in step.deltas:
                frame = LLMTextFrame(text=delta)
                await self.push_frame(frame)
                tts = tts_text_frame(delta)
                tts.includes_inter_frame_spaces = True
                await self.push_frame(tts)
                await self._bot_audio(TICK_MS)
            await self._bot_edge(BotStoppedSpeakingFrame)
        elif isinstance(step, Tool):
            await self._broadcast(
                FunctionCallInProgressFrame,
                function_name=step.name,
                tool_call_id=step.tool_call_id,
                arguments=step.arguments,
            )
            await self._user_audio(TICK_MS * 2, voiced=False)
            await self._broadcast(
                FunctionCallResultFrame,
                function_name=step.name,
                tool_call_id=step.tool_call_id,
                arguments=step.arguments,
                result=step.result,
            )

    async def _play_bot(self, step: Bot) -> None:
        await self._bot_edge(BotStartedSpeakingFrame)
        for number, word in enumerate(step.words):
            if step.interrupt_after is not None and number == step.interrupt_after:
                # As the output transport does: interruption, then the bot stops speaking.
                await self._broadcast(InterruptionFrame)
                await self._bot_edge(BotStoppedSpeakingFrame)
                return
            tts = tts_text_frame(word)
            tts.includes_inter_frame_spaces = step.spaced
            await self.push_frame(tts)
            await self._bot_audio(step.ms_per_word)
        await self._bot_edge(BotStoppedSpeakingFrame)

    async def _bot_edge(self, frame_cls: type[Frame]) -> None:
        if self.speaking_edges:
            await self._broadcast(frame_cls)


async def run_pipeline(
    processors: Sequence[FrameProcessor],
    *,
    observers: Sequence[Any] = (),
    sample_rate: int = SAMPLE_RATE,
    legacy: bool = False,
    handle_sigint: bool = False,
) -> None:
    """Run processors in a real pipeline until it ends.

    ``legacy`` uses PipelineTask + PipelineRunner (deprecated in 1.3, the only names in
    0.0.x); otherwise PipelineWorker + WorkerRunner.
    """
    pipeline = Pipeline(list(processors))
    params = PipelineParams(audio_in_sample_rate=sample_rate, audio_out_sample_rate=sample_rate)
    common: dict[str, Any] = {
        "params": params,
        "observers": list(observers),
        "idle_timeout_secs": None,
        "enable_rtvi": False,
        "enable_turn_tracking": False,
    }
    if legacy and compat.HAS_WORKER:
        import warnings

        # The old names, on purpose: this path exists to prove they still record.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from pipecat.pipeline.runner import PipelineRunner
            from pipecat.pipeline.task import PipelineTask

            task = PipelineTask(pipeline, **common)
            runner = PipelineRunner(handle_sigint=handle_sigint)
        await runner.add_workers(task)
        await runner.run()
        return
    # Before Pipecat 1.3 these are PipelineTask and PipelineRunner themselves.
    worker = compat.PipelineWorker(pipeline, **common)
    await compat.run_worker(compat.WorkerRunner(handle_sigint=handle_sigint), worker)


class PlayedOutput(BaseOutputTransport):
    """A minimal output transport: it "plays" audio by keeping it.

    Pipecat's media sender queues TTS words behind the audio generated before them and
    releases each word only when that audio has been written, so the words this
    transport pushes on are the ones a caller would have heard (``spoken``).
    ``budget_bytes`` stalls playback once that much audio is written (``stalled`` is
    set) until an interruption arrives: a slow playback a test can interrupt mid-sentence
    at a known point, instead of racing the clock.
    """

    def __init__(self, *, budget_bytes: int | None = None, sample_rate: int = SAMPLE_RATE) -> None:
        super().__init__(
            TransportParams(audio_out_enabled=True, audio_out_sample_rate=sample_rate),
            name="PlayedOutput",
        )
        self.played = bytearray()
        self.spoken: list[str] = []
        self.stalled = asyncio.Event()
        self._budget = budget_bytes
        self._resume = asyncio.Event()

    async def start(self, frame: StartFrame) -> None:
        """Start as Pipecat's transports do, and be ready at once (nothing to connect)."""
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        """Keep the audio in ``played``, as if played; past ``budget_bytes``, stall first.

        Returns:
            True: the frame was written (Pipecat's contract for a transport).
        """
        if self._budget is not None and len(self.played) >= self._budget:
            self.stalled.set()
            await self._resume.wait()
        self.played.extend(frame.audio)
        return True

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Process as Pipecat's output transport does; an interruption ends a stall."""
        await super().process_frame(frame, direction)
        if isinstance(frame, InterruptionFrame):  # the queue is dropped: play on
            self._budget = None
            self._resume.set()

    async def push_frame(
        self, frame: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM
    ) -> None:
        """Push as Pipecat does, noting each TTS word released downstream in ``spoken``."""
        if isinstance(frame, TTSTextFrame) and direction == FrameDirection.DOWNSTREAM:
            self.spoken.append(frame.text)
        await super().push_frame(frame, direction)
