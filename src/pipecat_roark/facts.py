"""Turning the frames an observer sees into the facts of a call.

``FrameFacts`` holds a per-observer table from frame class to handler, filled on first
sight of each class (audio exits first, and cheapest); each handler keeps the little
state it needs to record a fact once (edge-triggered speech, deduped interruptions and
tool calls, first pushes only) and hands the fact to the call's ``CallRecorder``.
``PlayedTexts`` puts the TTS texts the output transport released back in push order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from loguru import logger
from pipecat.frames.frames import (
    AudioRawFrame,
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    CancelFrame,
    EndFrame,
    Frame,
    FunctionCallInProgressFrame,
    FunctionCallResultFrame,
    InterimTranscriptionFrame,
    InterruptionFrame,
    LLMTextFrame,
    StartFrame,
    StopFrame,
    TranscriptionFrame,
    TTSTextFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.observers.base_observer import FramePushed
from pipecat.processors.audio.audio_buffer_processor import AudioBufferProcessor
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_output import BaseOutputTransport

from .capture import arguments_json, clean_text, result_text
from .events import BotSpeech, BotText, Interruption, ToolCall, ToolResult, UserSpeech, UserText
from .recorder import CallRecorder
from .store import now_us

__all__ = ["PLAYED_BACKLOG", "FrameFacts", "Handler", "PlayedTexts"]

Handler = Callable[[FramePushed, Any], None]

PLAYED_BACKLOG = 4096
"""TTS texts released by the output transport and not yet put in order by the observer."""


class PlayedTexts:
    """TTS texts the output transport released, recorded as played once and in push order.

    Our audio processor notes each one inline as the transport hands it over, stamped
    with the pipeline clock; the observer records those stamped before the push it is
    looking at, so a played text lands where its push was.

    Args:
        recorder: the call's recorder, whose pipeline clock stamps each note.
        record: records one played text as a fact, with the pipeline time it was noted.
    """

    def __init__(self, recorder: CallRecorder, record: Callable[[Frame, int], None]) -> None:
        self._recorder = recorder
        self._record = record
        self.pending: deque[tuple[int, Frame]] = deque(maxlen=PLAYED_BACKLOG)
        self._ids: deque[int] = deque(maxlen=256)
        self._backlog_warned = False

    def note_played(self, processor: FrameProcessor, frame: Frame, direction: Any) -> None:
        """Our audio processor is being handed ``frame`` by the output transport (inline)."""
        if direction != FrameDirection.DOWNSTREAM:
            return
        pending = self.pending
        if len(pending) == PLAYED_BACKLOG and not self._backlog_warned:
            self._backlog_warned = True
            logger.warning(
                f"{self._recorder}: call {self._recorder.call_id}: the observer is "
                f"{PLAYED_BACKLOG} played TTS texts behind the pipeline; the oldest are recorded "
                "as TTS text only, not as played. Check that RoarkObserver is in "
                "PipelineWorker(observers=[...])"
            )
        pending.append((processor.get_clock().get_time(), frame))

    def release(self, before: int | None) -> None:
        """Record the noted texts pushed before the push stamped ``before`` (None: all)."""
        pending = self.pending
        while pending and (before is None or pending[0][0] < before):
            noted, frame = pending.popleft()
            self.record(frame, noted)

    def record(self, frame: Frame, pushed: int) -> None:
        """Record ``frame`` as played, once (it may be seen both ways while the mode switched).

        ``pushed`` is when the output transport released it (pipeline clock).
        """
        if frame.id in self._ids:
            return
        self._ids.append(frame.id)
        self._record(frame, pushed)


class FrameFacts:
    """The per-frame dispatch table and its handlers: frames in, facts to the recorder.

    Args:
        recorder: the call's recorder, which receives every fact.
        processor: the call's audio processor.
        own: the processor is ours (it reports sample 0 inline), not one the user passed.
    """

    def __init__(
        self, recorder: CallRecorder, processor: AudioBufferProcessor, *, own: bool
    ) -> None:
        self._recorder = recorder
        self._processor = processor
        self.played = PlayedTexts(recorder, self._record_played)
        self._user_speaking = False
        self._bot_speaking = False
        self._tool_calls_seen: set[str] = set()
        self._tool_results_seen: set[str] = set()
        self._recent_ids: deque[int] = deque(maxlen=256)
        self._seen_ids: set[int] = set()
        self._seen_order: deque[int] = deque()
        self.dispatch: dict[type, Handler | None] = {}
        """Frame class to handler (None: ignored); read by the observer for every frame."""
        # With a processor of the user's, sample 0 is seen from here (ours reports it inline).
        self._rules: list[tuple[type | tuple[type, ...], Handler | None]] = [
            (AudioRawFrame, None if own else self._on_audio),
            (StartFrame, self._on_start),
            ((EndFrame, CancelFrame, StopFrame), self._on_terminal),
            (InterimTranscriptionFrame, None),
            (TranscriptionFrame, self._on_transcription),
            (TTSTextFrame, self._on_tts_text),
            (LLMTextFrame, self._on_llm_text),
            ((UserStartedSpeakingFrame, UserStoppedSpeakingFrame), self._on_user_speech),
            ((BotStartedSpeakingFrame, BotStoppedSpeakingFrame), self._on_bot_speech),
            (InterruptionFrame, self._on_interruption),
            (FunctionCallInProgressFrame, self._on_tool_call),
            (FunctionCallResultFrame, self._on_tool_result),
        ]

    def resolve(self, cls: type) -> Handler | None:
        """The handler of a frame class not seen before, remembered in ``dispatch``.

        Returns:
            The handler of the first rule the class matches, or None: frames of the
            class are ignored.
        """
        self._recorder.attached = True
        handler: Handler | None = None
        for types, candidate in self._rules:
            if issubclass(cls, types):
                handler = candidate
                break
        self.dispatch[cls] = handler
        return handler

    def _first(self, data: FramePushed, frame: Frame) -> bool:
        first = getattr(data, "first_push", None)
        if first is not None:
            return bool(first)
        # Pipecat 0.0.x has no first_push: remember recent ids ourselves (bounded).
        frame_id = frame.id
        if frame_id in self._seen_ids:
            return False
        self._seen_ids.add(frame_id)
        self._seen_order.append(frame_id)
        if len(self._seen_order) > 4096:
            self._seen_ids.discard(self._seen_order.popleft())
        return True

    def _on_audio(self, data: FramePushed, frame: Frame) -> None:
        processor = self._processor
        if (
            data.destination is processor
            and getattr(processor, "_recording", True)
            and getattr(frame, "audio", b"")
        ):
            self._recording_started()

    def _recording_started(self) -> None:
        """Sample 0 seen passing into a processor of the user's: stop watching audio."""
        if not self._recorder.recording_started():
            return
        for cls, handler in list(self.dispatch.items()):
            if handler == self._on_audio:
                self.dispatch[cls] = None
        self._rules[0] = (AudioRawFrame, None)

    def _on_start(self, data: FramePushed, frame: Frame) -> None:
        self._recorder.open(now_us())

    def _on_terminal(self, data: FramePushed, frame: Frame) -> None:
        self._recorder.observed_terminal_frame(frame)

    def _on_transcription(self, data: FramePushed, frame: Frame) -> None:
        if not self._first(data, frame):
            return
        text = clean_text(getattr(frame, "text", ""))
        if not text.strip():
            return
        self._recorder.saw_text = True
        language = getattr(frame, "language", None)
        self._recorder.emit(
            UserText(
                at=now_us(),
                text=text,
                user_id=clean_text(getattr(frame, "user_id", "")) or None,
                language=None
                if language is None
                else clean_text(getattr(language, "value", language)),
            ),
            data.timestamp,
        )

    def _on_tts_text(self, data: FramePushed, frame: Frame) -> None:
        played = isinstance(data.source, BaseOutputTransport) and (
            data.direction == FrameDirection.DOWNSTREAM
        )
        if played:
            self.played.record(frame, data.timestamp)
        elif self._first(data, frame):
            self._bot_text(frame, data.timestamp, played=False)

    def _bot_text(self, frame: Frame, pushed: int, *, played: bool) -> None:
        text = clean_text(getattr(frame, "text", ""))
        if not text:
            return
        self._recorder.saw_text = True
        self._recorder.emit(
            BotText(
                at=now_us(),
                text=text,
                spaced=bool(getattr(frame, "includes_inter_frame_spaces", False)),
                source="tts",
                played=played,
            ),
            pushed,
        )

    def _on_llm_text(self, data: FramePushed, frame: Frame) -> None:
        if not self._first(data, frame):
            return
        text = clean_text(getattr(frame, "text", ""))
        if text:
            self._recorder.emit(
                BotText(
                    at=now_us(),
                    text=text,
                    spaced=bool(getattr(frame, "includes_inter_frame_spaces", True)),
                    source="llm",
                ),
                data.timestamp,
            )

    def _on_user_speech(self, data: FramePushed, frame: Frame) -> None:
        # Edge-triggered: broadcast copies and repeats from several processors collapse.
        started = isinstance(frame, UserStartedSpeakingFrame)
        if started == self._user_speaking:
            return
        self._user_speaking = started
        self._recorder.emit(UserSpeech(at=now_us(), started=started), data.timestamp)

    def _on_bot_speech(self, data: FramePushed, frame: Frame) -> None:
        started = isinstance(frame, BotStartedSpeakingFrame)
        if started == self._bot_speaking:
            return
        self._bot_speaking = started
        self._recorder.emit(BotSpeech(at=now_us(), started=started), data.timestamp)

    def _on_interruption(self, data: FramePushed, frame: Frame) -> None:
        if not self._first(data, frame):
            return
        sibling = getattr(frame, "broadcast_sibling_id", None)
        if sibling is not None and sibling in self._recent_ids:
            return
        self._recent_ids.append(frame.id)
        self._bot_speaking = False  # the bot's turn is cut; its next start is a new turn
        self._recorder.emit(Interruption(at=now_us()), data.timestamp)

    def _on_tool_call(self, data: FramePushed, frame: Frame) -> None:
        tool_call_id = clean_text(getattr(frame, "tool_call_id", ""))
        if tool_call_id in self._tool_calls_seen:
            return
        self._tool_calls_seen.add(tool_call_id)
        self._recorder.emit(
            ToolCall(
                at=now_us(),
                tool_call_id=tool_call_id,
                name=clean_text(getattr(frame, "function_name", "")),
                arguments=arguments_json(getattr(frame, "arguments", None)),
            ),
            data.timestamp,
        )

    def _on_tool_result(self, data: FramePushed, frame: Frame) -> None:
        tool_call_id = clean_text(getattr(frame, "tool_call_id", ""))
        if tool_call_id in self._tool_results_seen:
            return
        self._tool_results_seen.add(tool_call_id)
        result = getattr(frame, "result", None)
        if result is None and getattr(frame, "error", None):
            result = frame.error  # type: ignore[attr-defined]
        self._recorder.emit(
            ToolResult(
                at=now_us(),
                tool_call_id=tool_call_id,
                name=clean_text(getattr(frame, "function_name", "")),
                content=result_text(result),
            ),
            data.timestamp,
        )

    def _record_played(self, frame: Frame, pushed: int) -> None:
        self._bot_text(frame, pushed, played=True)
