"""RoarkAudioBufferProcessor: the default recorder of both sides, inside the pipeline itself.

Observer callbacks lag behind the pipeline, so the time-critical parts are done here,
inline: recording is armed on the StartFrame (before the first greeting audio can pass)
and never re-armed (that would wipe the buffer); the recording's sample 0 and the
End/Cancel/Stop frames are reported to the call's ``CallRecorder`` as they pass, even
when the observer lags or was never attached.

At setup it also looks at the pipeline's shape, to tell the observer whether it may
observe each frame's first push only; when it sits right after the output transport, it
is handed exactly what the transport released, and notes each TTS text as played then.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loguru import logger
from pipecat.frames.frames import (
    AudioRawFrame,
    CancelFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    OutputAudioRawFrame,
    StartFrame,
    StopFrame,
    TTSTextFrame,
)
from pipecat.pipeline.base_pipeline import BasePipeline
from pipecat.pipeline.pipeline import Pipeline, PipelineSink, PipelineSource
from pipecat.processors.audio.audio_buffer_processor import AudioBufferProcessor
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_output import BaseOutputTransport

from .recorder import CallRecorder

__all__ = ["RoarkAudioBufferProcessor"]

_CHAIN_LIMIT = 256


def _neighbours(start: FrameProcessor, upstream: bool) -> tuple[bool, bool]:
    """Walk the pipeline from ``start`` one way, looking for an output transport.

    Nested ``Pipeline``s are climbed out of through their source/sink up to the worker;
    any other container (a ParallelPipeline, a pipeline met as one step) hides processors
    we cannot see, and makes the answer unknown.

    Returns:
        Whether an output transport was met that way, and whether the whole way was seen
        (False: what lies beyond is unknown).
    """
    node: Any = start
    for _ in range(_CHAIN_LIMIT):
        node = getattr(node, "previous" if upstream else "next", None)
        if node is None:
            return False, True
        if isinstance(node, BaseOutputTransport):
            return True, True
        if isinstance(node, PipelineSource if upstream else PipelineSink):
            handler = getattr(
                node, "_upstream_push_frame" if upstream else "_downstream_push_frame", None
            )
            parent = getattr(handler, "__self__", None)
            if not isinstance(parent, FrameProcessor):
                return False, True  # the worker's own edge: the whole pipeline was walked
            if type(parent) is not Pipeline:
                return False, False
            node = parent
        elif isinstance(node, BasePipeline):
            return False, False
    return False, False


_RECORDED_AUDIO = (InputAudioRawFrame, OutputAudioRawFrame)


def _whole_samples(frame: AudioRawFrame) -> bool:
    audio = frame.audio
    channels = frame.num_channels if isinstance(frame.num_channels, int) else 0
    return (
        isinstance(audio, (bytes, bytearray)) and channels > 0 and len(audio) % (2 * channels) == 0
    )


NotePlayed = Callable[[FrameProcessor, Frame, Any], None]
"""The observer's note that the output transport is handing ``frame`` to ``processor``."""


class RoarkAudioBufferProcessor(AudioBufferProcessor):
    """An AudioBufferProcessor that arms itself on the StartFrame and reports to its call.

    Made by ``RoarkObserver`` (``roark.audio_processor``); it tells the call's recorder
    what passes, and the observer how to observe (``first_pushes_only``) and which TTS
    texts played (``note_played``).

    Args:
        recorder: the call's recorder, told what passes.
        note_played: called inline as the output transport hands over a TTS text.
        first_pushes_only: tells the observer to watch only each frame's first push.
        **kwargs: AudioBufferProcessor's own arguments.
    """

    def __init__(
        self,
        recorder: CallRecorder,
        *,
        note_played: NotePlayed,
        first_pushes_only: Callable[[], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._recorder = recorder
        self._note_played = note_played
        self._first_pushes_only = first_pushes_only
        self._awaiting_sample_zero = True
        self._notes_played = False
        self._partial_audio_warned = False

    async def queue_frame(
        self,
        frame: Frame,
        direction: FrameDirection = FrameDirection.DOWNSTREAM,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        """Note a TTS text as played when the output transport hands it on, then queue it."""
        # Called by the output transport as it pushes: exactly the moment the text played.
        if self._notes_played and isinstance(frame, TTSTextFrame):
            self._recorder.hooks.guard(self._note_played, self, frame, direction)
        await super().queue_frame(frame, direction, *args, **kwargs)

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Buffer whole-sample audio and report sample 0, the StartFrame and the call's end.

        A frame of partial samples is passed on unrecorded (Pipecat's buffer would raise
        on it), and recording starts with the StartFrame.
        """
        if isinstance(frame, _RECORDED_AUDIO):  # nearly every frame: one check, then the buffer
            if not _whole_samples(frame):
                # Pipecat's buffer raises on a partial sample and the pipeline can stall on
                # it: pass such a frame on unrecorded instead.
                self._recorder.hooks.guard(self._partial_audio, frame)
                await FrameProcessor.process_frame(self, frame, direction)
                await self.push_frame(frame, direction)
                return
            if self._awaiting_sample_zero and self._recording and frame.audio:
                self._awaiting_sample_zero = False
                self._recorder.hooks.guard(self._recorder.recording_started)
            await super().process_frame(frame, direction)
            return
        recorder = self._recorder
        if isinstance(frame, StartFrame):
            recorder.hooks.guard(recorder.processor_saw_start)
        elif isinstance(frame, (EndFrame, CancelFrame, StopFrame)):
            recorder.hooks.guard(recorder.terminal_frame, frame)
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame) and not self._recording:
            await self.start_recording()

    async def setup(self, setup: Any) -> None:
        """Set up as Pipecat does, then choose how the observer watches this pipeline."""
        await super().setup(setup)
        # Linked and about to run, before any frame flows: the shape is known now.
        self._recorder.hooks.guard(self._choose_observation)

    def _choose_observation(self) -> None:
        """First pushes only, unless the pipeline's shape needs the later ones (see module)."""
        after_output, seen_up = _neighbours(self, upstream=True)
        before_output, seen_down = _neighbours(self, upstream=False)
        if after_output and not before_output and seen_down:
            self._notes_played = True
            self._first_pushes_only()
        elif not after_output and not before_output and seen_up and seen_down:
            self._first_pushes_only()  # no output transport: no push but the first matters

    async def cleanup(self) -> None:
        """Clean up as Pipecat does, then tell the recorder the pipeline is tearing down.

        If the observer was never attached, the call is finished from here.
        """
        await super().cleanup()
        await self._recorder.processor_cleanup()

    def _partial_audio(self, frame: AudioRawFrame) -> None:
        if self._partial_audio_warned:
            return
        self._partial_audio_warned = True
        size = len(frame.audio) if isinstance(frame.audio, (bytes, bytearray)) else "?"
        logger.warning(
            f"{self._recorder}: call {self._recorder.call_id}: an audio frame of {size} bytes "
            f"is not whole 16-bit samples for {frame.num_channels!r} channel(s); such frames "
            "are not recorded (check the transport or resampler that produced it)"
        )
