"""RoarkObserver: records one Pipecat call into the local WAL.

The observer never talks to the network and never awaits disk on the frame path:
``on_push_frame`` looks the frame's class up in a per-instance table (audio exits
first), turns the few frames that matter into small event structs and hands them to
the process's writer thread. Pipecat drops whatever is still queued for an observer
at teardown, so being cheap here is what makes the end of the call arrive at all.

The default ``audio_processor`` does the time-critical parts inline, in the pipeline
itself: it arms recording on the StartFrame, notes the recording's sample 0, and sees
End/Cancel/Stop frames even when the observer lags or was never attached.

Each frame is observed once where Pipecat allows it (1.x: ``observe_every_push`` False),
which halves what Pipecat queues for us per frame. The one fact that needs a later push,
"this TTS text left the output transport", is then noted by the default audio processor
(it sits after ``transport.output()`` and is handed exactly what the transport released)
at the moment it is handed the frame, stamped with the pipeline clock; the observer puts
it back in push order by that stamp. Pipelines where that cannot work keep every push.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
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
    InputAudioRawFrame,
    InterimTranscriptionFrame,
    InterruptionFrame,
    LLMTextFrame,
    OutputAudioRawFrame,
    StartFrame,
    StopFrame,
    TranscriptionFrame,
    TTSTextFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.pipeline.base_pipeline import BasePipeline
from pipecat.pipeline.pipeline import Pipeline, PipelineSink, PipelineSource
from pipecat.processors.audio.audio_buffer_processor import AudioBufferProcessor
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_output import BaseOutputTransport

from . import compat, config, lifecycle, metrics
from .capture import (
    arguments_json,
    call_id_problem,
    claim_call_id,
    clean_text,
    release_call_id,
    resolve_call_id,
    result_text,
)
from .drain import ensure_background_drainer
from .errors import PipecatRoarkError
from .events import (
    BotSpeech,
    BotText,
    CallClosed,
    CallOpened,
    Event,
    Interruption,
    RecordingStarted,
    ToolCall,
    ToolResult,
    UserSpeech,
    UserText,
)
from .lifecycle import DEFAULT_EXIT_DRAIN_S
from .ops import ChunkOp, EventOp, FinalizeOp, OpenOp
from .writer import DEFAULT_MAX_SPOOL_BYTES, DEFAULT_MIN_FREE_BYTES, Writer, writer_for

__all__ = ["DEFAULT_CHUNK_BYTES", "RoarkAudioBufferProcessor", "RoarkObserver"]

DEFAULT_CHUNK_BYTES = 256 * 1024
"""Bytes of one stereo recording chunk (AudioBufferProcessor counts one mono track)."""

TAIL_WAIT_S = 2.0
"""How long the end of a call waits for the recording's last chunk handler."""

FLUSH_WAIT_S = 5.0
"""How long the end of a call waits for its records to be committed."""

NOT_ATTACHED_CHECK_S = 5.0
DEFAULT_IDLE_TIMEOUT_S = 600.0
"""No frame at all for this long means the session vanished (the pipeline produces audio
frames continuously while a call lives, even in silence)."""

_missing_key_warned = False


_monotonic = time.monotonic


def _now_us() -> int:
    return time.time_ns() // 1000


def _reason(frame: Frame, default: str) -> str:
    reason = getattr(frame, "reason", None)
    if reason is None or reason == "":
        return default
    return clean_text(reason)


Handler = Callable[[FramePushed, Any], None]

PLAYED_BACKLOG = 4096
"""TTS texts released by the output transport and not yet put in order by the observer."""

_CHAIN_LIMIT = 256


def _neighbours(start: FrameProcessor, upstream: bool) -> tuple[bool, bool]:
    """Walk the pipeline from ``start`` one way: (an output transport met, all of it seen).

    Nested ``Pipeline``s are climbed out of through their source/sink up to the worker;
    any other container (a ParallelPipeline, a pipeline met as one step) hides processors
    we cannot see, and makes the answer unknown.
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


class RoarkAudioBufferProcessor(AudioBufferProcessor):
    """An AudioBufferProcessor that arms itself on the StartFrame and reports to its observer.

    Observer callbacks lag behind the pipeline, so recording is armed here, inline,
    before the first greeting audio can pass; and it is never re-armed (that would
    wipe the buffer).
    """

    def __init__(self, owner: RoarkObserver, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._roark = owner
        self._awaiting_sample_zero = True
        self._notes_played = False

    async def queue_frame(
        self,
        frame: Frame,
        direction: FrameDirection = FrameDirection.DOWNSTREAM,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        # Called by the output transport as it pushes: exactly the moment the text played.
        if self._notes_played and isinstance(frame, TTSTextFrame):
            self._roark._guard(self._roark._note_played, self, frame, direction)
        await super().queue_frame(frame, direction, *args, **kwargs)

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        if isinstance(frame, _RECORDED_AUDIO):  # nearly every frame: one check, then the buffer
            if not _whole_samples(frame):
                # Pipecat's buffer raises on a partial sample and the pipeline can stall on
                # it: pass such a frame on unrecorded instead.
                self._roark._guard(self._roark._partial_audio, frame)
                await FrameProcessor.process_frame(self, frame, direction)
                await self.push_frame(frame, direction)
                return
            if self._awaiting_sample_zero and self._recording and frame.audio:
                self._awaiting_sample_zero = False
                self._roark._guard(self._roark._recording_started)
            await super().process_frame(frame, direction)
            return
        roark = self._roark
        if isinstance(frame, StartFrame):
            roark._guard(roark._processor_saw_start)
        elif isinstance(frame, (EndFrame, CancelFrame, StopFrame)):
            roark._guard(roark._terminal_frame, frame)
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame) and not self._recording:
            await self.start_recording()

    async def setup(self, setup: Any) -> None:
        await super().setup(setup)
        # Linked and about to run, before any frame flows: the shape is known now.
        self._roark._guard(self._choose_observation)

    def _choose_observation(self) -> None:
        """First pushes only, unless the pipeline's shape needs the later ones (see module)."""
        after_output, seen_up = _neighbours(self, upstream=True)
        before_output, seen_down = _neighbours(self, upstream=False)
        if after_output and not before_output and seen_down:
            self._notes_played = True
            self._roark._every_push = False
        elif not after_output and not before_output and seen_up and seen_down:
            self._roark._every_push = False  # no output transport: no push but the first matters

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._roark._processor_cleanup()


class RoarkObserver(BaseObserver):
    """Records a Pipecat call (lifecycle, transcript, tool calls, stereo audio) durably.

    Create one per call and pass it to ``PipelineWorker(pipeline, observers=[roark])``
    (or ``PipelineTask(..., observers=[roark])``), and put ``roark.audio_processor``
    in the pipeline after ``transport.output()``. Nothing here raises into the
    pipeline: every failure is logged once and the call goes on.

    Args:
        api_key: Roark API key; falls back to ``ROARK_API_KEY``. Without one the call
            is still recorded, and a later ``pipecat-roark drain`` with a key delivers it.
        agent_id: Your stable identifier for the agent (Roark registers it on first sight).
        agent_name: Human-readable agent name.
        agent_prompt: The system prompt, stored by Roark as the agent's prompt revision.
        audio_buffer_processor: Your own AudioBufferProcessor to take the recording
            from (you arm it). By default the observer makes a stereo one that arms itself.
        pipecat_call_id: The call's id; by default derived from ``runner_args``, else a UUID.
        runner_args: Pipecat runner arguments (SmallWebRTC ``pc_id``, Pipecat Cloud ``session_id``).
        data_dir: Where the WAL lives; falls back to ``PIPECAT_ROARK_DIR``, then the user state dir.
        base_url: Roark base URL; falls back to ``ROARK_BASE_URL``, then https://api.roark.ai.
        deliver: Start this process's background drainer (default True).
        chunk_bytes: Size of one stereo recording chunk of the default audio processor.
        max_spool_bytes: Cap on undelivered audio on disk; past it new audio is not
            recorded (events still are), with a loud warning.
        min_free_bytes: Free disk space to leave alone; below it new audio is not
            recorded either, so the events of every call still fit.
        idle_timeout_s: Finalize the call with reason ``session-vanished`` when the
            pipeline has produced no frame for this long (None: never).
        exit_drain_s: At interpreter exit, and on a SIGTERM nobody else handles, open calls
            are finalized with reason ``process-exit`` and delivery is tried for at most
            this long (0: not at all). Where the host handles SIGTERM (uvicorn,
            ``handle_sigterm=True``), calls go on until their pipeline ends, and a call
            ending during that shutdown waits at most this long for its own delivery.
        keep_delivered_audio: Keep chunk files after Roark has the whole call (this
            process's drainer deletes them by default; rows stay for retention).
        metrics_port: Serve Prometheus metrics on this port (``/metrics``, once per
            process); falls back to ``PIPECAT_ROARK_METRICS_PORT``; None: no endpoint.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        agent_id: str,
        agent_name: str | None = None,
        agent_prompt: str | None = None,
        audio_buffer_processor: AudioBufferProcessor | None = None,
        pipecat_call_id: str | None = None,
        runner_args: Any = None,
        data_dir: str | Path | None = None,
        base_url: str | None = None,
        deliver: bool = True,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_spool_bytes: int = DEFAULT_MAX_SPOOL_BYTES,
        min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
        idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S,
        exit_drain_s: float = DEFAULT_EXIT_DRAIN_S,
        keep_delivered_audio: bool = False,
        metrics_port: int | None = None,
    ) -> None:
        super().__init__()
        self._call_id = resolve_call_id(pipecat_call_id, runner_args)
        self._agent_id = clean_text(agent_id)
        self._agent_name = None if agent_name is None else clean_text(agent_name)
        self._agent_prompt = None if agent_prompt is None else clean_text(agent_prompt)
        self._api_key = config.resolve_api_key(api_key)
        self._key_fp = config.key_fingerprint(self._api_key)
        self._directory = config.resolve_dir(data_dir)
        self._base_url = base_url
        self._deliver = deliver
        self._writer: Writer | None = None
        refused = call_id_problem(self._call_id)
        try:
            if refused is None:
                self._writer = writer_for(
                    self._directory, max_spool_bytes=max_spool_bytes, min_free_bytes=min_free_bytes
                )
        except PipecatRoarkError as exc:
            refused = str(exc)
        if refused is not None:
            logger.error(f"{self}: call {self._call_id!a} will not be recorded: {refused}")
        self._warn_if_no_key()
        self._keep_delivered_audio = keep_delivered_audio
        self._serve_metrics(metrics_port)

        if audio_buffer_processor is None:
            num_channels = 2
            self._audio_processor: AudioBufferProcessor = RoarkAudioBufferProcessor(
                self, num_channels=num_channels, buffer_size=max(2, chunk_bytes // num_channels)
            )
            self._own_processor = True
        else:
            self._audio_processor = audio_buffer_processor
            self._own_processor = False
        self._audio_processor.add_event_handler("on_audio_data", self._on_audio_data)

        # Call state, touched only from the event loop.
        self._every_push = True  # until our audio processor has seen the pipeline's shape
        self._played_pending: deque[tuple[int, Frame]] = deque(maxlen=PLAYED_BACKLOG)
        self._opened = False
        self._attached = False
        self._closed: tuple[int, str] | None = None
        self._finalized = False
        self._finish_task: asyncio.Task[None] | None = None
        self._idle_timeout_s = idle_timeout_s
        self._exit_drain_s = exit_drain_s
        self._last_frame = time.monotonic()
        self._watchdog: asyncio.TimerHandle | None = None
        self._vanished: asyncio.Task[None] | None = None
        lifecycle.register(
            self,
            api_key=self._api_key if deliver else None,
            base_url=base_url,
            directory=self._directory,
            exit_drain_s=exit_drain_s,
            keep_delivered_audio=keep_delivered_audio,
        )
        lifecycle.install_exit_hooks()
        self._next_chunk = 0
        # With a processor of the user's, sample 0 is seen from here (ours reports it inline).
        self._sample_zero_pending = not self._own_processor
        self._sample_zero_recorded = False
        self._user_speaking = False
        self._bot_speaking = False
        self._saw_text = False
        self._tool_calls_seen: set[str] = set()
        self._tool_results_seen: set[str] = set()
        self._recent_ids: deque[int] = deque(maxlen=256)
        self._played_ids: deque[int] = deque(maxlen=256)
        self._seen_ids: set[int] = set()
        self._seen_order: deque[int] = deque()
        self._hook_errors: set[str] = set()
        self._not_attached_warned = False
        self._partial_audio_warned = False
        self._played_backlog_warned = False
        self._dispatch: dict[type, Handler | None] = {}
        self._rules: list[tuple[type | tuple[type, ...], Handler | None]] = [
            (AudioRawFrame, self._on_audio if self._sample_zero_pending else None),
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

    # ---- public API ----

    @property
    def pipecat_call_id(self) -> str:
        return self._call_id

    @property
    def audio_processor(self) -> AudioBufferProcessor:
        """Put this in the pipeline after ``transport.output()`` to record both sides."""
        return self._audio_processor

    @property
    def data_dir(self) -> Path:
        return self._directory

    @property
    def observe_every_push(self) -> bool:
        """Read by Pipecat 1.x at each push: False delivers each frame's first push only."""
        return self._every_push

    async def aflush(self, reason: str = "client-disconnected") -> None:
        """End the call now (e.g. on client disconnect) and make it durable. Idempotent.

        Flushes the recording's tail, records the end with ``reason`` (unless the call
        already ended) and waits, bounded, until the WAL holds it. Never raises.
        """
        try:
            self._close(_now_us(), clean_text(reason))
            processor = self._audio_processor
            if getattr(processor, "_recording", False):
                await processor.stop_recording()
            await self._finish("unknown")
        except Exception as exc:
            self._hook_failed("aflush", exc)

    # ---- BaseObserver hooks (each wrapped: an exception would silence us for good) ----

    async def on_push_frame(self, data: FramePushed) -> None:
        self._last_frame = _monotonic()
        try:
            if self._played_pending:
                self._release_played(data.timestamp)
            frame = data.frame
            cls = frame.__class__
            handler = self._dispatch.get(cls, _UNSEEN)
            if handler is None:
                return
            if handler is _UNSEEN:
                handler = self._resolve(cls)
                if handler is None:
                    return
            handler(data, frame)
        except Exception as exc:
            self._hook_failed("on_push_frame", exc)

    async def on_pipeline_started(self) -> None:
        try:
            self._attached = True
            self._open(_now_us())
        except Exception as exc:
            self._hook_failed("on_pipeline_started", exc)

    async def cleanup(self) -> None:
        try:
            await super().cleanup()
        except Exception as exc:
            self._hook_failed("cleanup", exc)
        try:
            await self._finish_in_teardown()
        except Exception as exc:
            self._hook_failed("cleanup", exc)

    # ---- frame handlers (event loop; must stay cheap) ----

    def _resolve(self, cls: type) -> Handler | None:
        self._attached = True
        handler: Handler | None = None
        for types, candidate in self._rules:
            if issubclass(cls, types):
                handler = candidate
                break
        self._dispatch[cls] = handler
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

    def _emit(self, event: Event) -> None:
        if self._writer is not None and self._opened and not self._finalized:
            self._writer.submit(EventOp(self._call_id, event))

    def _on_audio(self, data: FramePushed, frame: Frame) -> None:
        processor = self._audio_processor
        if (
            data.destination is processor
            and getattr(processor, "_recording", True)
            and getattr(frame, "audio", b"")
        ):
            self._recording_started()

    def _on_start(self, data: FramePushed, frame: Frame) -> None:
        self._open(_now_us())

    def _on_terminal(self, data: FramePushed, frame: Frame) -> None:
        self._terminal_frame(frame)

    def _on_transcription(self, data: FramePushed, frame: Frame) -> None:
        if not self._first(data, frame):
            return
        text = clean_text(getattr(frame, "text", ""))
        if not text.strip():
            return
        self._saw_text = True
        language = getattr(frame, "language", None)
        self._emit(
            UserText(
                at=_now_us(),
                text=text,
                user_id=clean_text(getattr(frame, "user_id", "")) or None,
                language=None
                if language is None
                else clean_text(getattr(language, "value", language)),
            )
        )

    def _on_tts_text(self, data: FramePushed, frame: Frame) -> None:
        played = isinstance(data.source, BaseOutputTransport) and (
            data.direction == FrameDirection.DOWNSTREAM
        )
        if played:
            self._played(frame)
        elif self._first(data, frame):
            self._bot_text(frame, played=False)

    def _note_played(self, processor: FrameProcessor, frame: Frame, direction: Any) -> None:
        """Our audio processor is being handed ``frame`` by the output transport (inline)."""
        if direction != FrameDirection.DOWNSTREAM:
            return
        pending = self._played_pending
        if len(pending) == PLAYED_BACKLOG and not self._played_backlog_warned:
            self._played_backlog_warned = True
            logger.warning(
                f"{self}: call {self._call_id}: the observer is {PLAYED_BACKLOG} played TTS "
                "texts behind the pipeline; the oldest are recorded as TTS text only, not as "
                "played. Check that RoarkObserver is in PipelineWorker(observers=[...])"
            )
        pending.append((processor.get_clock().get_time(), frame))

    def _release_played(self, before: int | None) -> None:
        """Record the noted texts pushed before the push stamped ``before`` (None: all)."""
        pending = self._played_pending
        while pending and (before is None or pending[0][0] < before):
            self._played(pending.popleft()[1])

    def _played(self, frame: Frame) -> None:
        if frame.id in self._played_ids:  # seen both ways while the mode switched
            return
        self._played_ids.append(frame.id)
        self._bot_text(frame, played=True)

    def _bot_text(self, frame: Frame, *, played: bool) -> None:
        text = clean_text(getattr(frame, "text", ""))
        if not text:
            return
        self._saw_text = True
        self._emit(
            BotText(
                at=_now_us(),
                text=text,
                spaced=bool(getattr(frame, "includes_inter_frame_spaces", False)),
                source="tts",
                played=played,
            )
        )

    def _on_llm_text(self, data: FramePushed, frame: Frame) -> None:
        if not self._first(data, frame):
            return
        text = clean_text(getattr(frame, "text", ""))
        if text:
            self._emit(
                BotText(
                    at=_now_us(),
                    text=text,
                    spaced=bool(getattr(frame, "includes_inter_frame_spaces", True)),
                    source="llm",
                )
            )

    def _on_user_speech(self, data: FramePushed, frame: Frame) -> None:
        # Edge-triggered: broadcast copies and repeats from several processors collapse.
        started = isinstance(frame, UserStartedSpeakingFrame)
        if started == self._user_speaking:
            return
        self._user_speaking = started
        self._emit(UserSpeech(at=_now_us(), started=started))

    def _on_bot_speech(self, data: FramePushed, frame: Frame) -> None:
        started = isinstance(frame, BotStartedSpeakingFrame)
        if started == self._bot_speaking:
            return
        self._bot_speaking = started
        self._emit(BotSpeech(at=_now_us(), started=started))

    def _on_interruption(self, data: FramePushed, frame: Frame) -> None:
        if not self._first(data, frame):
            return
        sibling = getattr(frame, "broadcast_sibling_id", None)
        if sibling is not None and sibling in self._recent_ids:
            return
        self._recent_ids.append(frame.id)
        self._bot_speaking = False  # the bot's turn is cut; its next start is a new turn
        self._emit(Interruption(at=_now_us()))

    def _on_tool_call(self, data: FramePushed, frame: Frame) -> None:
        tool_call_id = clean_text(getattr(frame, "tool_call_id", ""))
        if tool_call_id in self._tool_calls_seen:
            return
        self._tool_calls_seen.add(tool_call_id)
        self._emit(
            ToolCall(
                at=_now_us(),
                tool_call_id=tool_call_id,
                name=clean_text(getattr(frame, "function_name", "")),
                arguments=arguments_json(getattr(frame, "arguments", None)),
            )
        )

    def _on_tool_result(self, data: FramePushed, frame: Frame) -> None:
        tool_call_id = clean_text(getattr(frame, "tool_call_id", ""))
        if tool_call_id in self._tool_results_seen:
            return
        self._tool_results_seen.add(tool_call_id)
        result = getattr(frame, "result", None)
        if result is None and getattr(frame, "error", None):
            result = frame.error  # type: ignore[attr-defined]
        self._emit(
            ToolResult(
                at=_now_us(),
                tool_call_id=tool_call_id,
                name=clean_text(getattr(frame, "function_name", "")),
                content=result_text(result),
            )
        )

    # ---- call lifecycle ----

    def _open(self, at: int) -> None:
        if self._opened or self._writer is None:
            return
        if not claim_call_id(self._call_id, self):
            self._writer = None
            logger.error(
                f"{self}: call {self._call_id!a} will not be recorded: another call in this "
                "process is recording under the same id. Give each call its own pipecat_call_id"
            )
            return
        self._opened = True
        opened = CallOpened(
            at=at,
            agent_id=self._agent_id,
            agent_name=self._agent_name,
            agent_prompt=self._agent_prompt,
        )
        self._writer.submit(OpenOp(self._call_id, opened, self._key_fp))
        self._last_frame = time.monotonic()
        self._arm_watchdog()
        self._start_delivery()

    def _recording_started(self) -> None:
        if self._sample_zero_recorded:
            return
        self._sample_zero_recorded = True
        self._sample_zero_pending = False
        self._open(_now_us())
        self._emit(RecordingStarted(at=_now_us()))
        for cls, handler in list(self._dispatch.items()):
            if handler == self._on_audio:
                self._dispatch[cls] = None
        self._rules[0] = (AudioRawFrame, None)

    def end_abruptly(self, reason: str) -> Writer | None:
        """Process exit: finalize now without awaiting (the event loop may be gone or
        blocked); returns the writer to flush if the call was open.

        The recording's tail still buffered in the AudioBufferProcessor (up to one chunk)
        cannot be flushed here and is lost; everything already recorded is kept.
        """
        if not self._opened or self._finalized or self._writer is None:
            return None
        self._close(_now_us(), reason)
        self._finalize()
        return self._writer

    def _arm_watchdog(self) -> None:
        if self._idle_timeout_s is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        remaining = self._idle_timeout_s - (time.monotonic() - self._last_frame)
        delay = max(0.05, min(remaining, self._idle_timeout_s / 4, 30.0))
        self._watchdog = loop.call_later(delay, self._guard, self._watchdog_tick)

    def _watchdog_tick(self) -> None:
        self._watchdog = None
        if self._finalized or self._finish_task is not None or self._idle_timeout_s is None:
            return
        idle = time.monotonic() - self._last_frame
        if idle < self._idle_timeout_s:
            self._arm_watchdog()
            return
        logger.warning(
            f"{self}: no frame for {idle:.0f} s: the session vanished without an EndFrame; "
            f"finalizing call {self._call_id} (reason session-vanished). Call "
            "`await roark.aflush()` when your client disconnects to end calls sooner"
        )
        self._vanished = asyncio.ensure_future(self.aflush(reason="session-vanished"))

    def _processor_saw_start(self) -> None:
        self._open(_now_us())
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.call_later(NOT_ATTACHED_CHECK_S, self._guard, self._check_attached)

    def _terminal_frame(self, frame: Frame) -> None:
        reason = "unknown" if isinstance(frame, StopFrame) else _reason(frame, "agent-ended")
        self._open(_now_us())
        self._close(_now_us(), reason)

    def _close(self, at: int, reason: str) -> None:
        if self._closed is not None:
            return
        self._closed = (at, reason)
        if self._opened and self._writer is not None and not self._finalized:
            self._writer.submit(EventOp(self._call_id, CallClosed(at=at, reason=reason)))

    async def _on_audio_data(
        self, processor: Any, audio: bytes, sample_rate: int, num_channels: int
    ) -> None:
        # Runs as a Pipecat background task; it must enqueue before its first await so
        # chunks keep the order the processor emitted them in.
        try:
            if not audio or self._writer is None or self._finalized:
                return
            self._open(_now_us())
            if not self._opened or self._writer is None:  # refused
                return
            index = self._next_chunk
            self._next_chunk += 1
            self._writer.submit(
                ChunkOp(
                    self._call_id,
                    index,
                    bytes(audio),
                    int(sample_rate),
                    int(num_channels),
                    _now_us(),
                )
            )
        except Exception as exc:
            self._hook_failed("on_audio_data", exc)

    async def _finish(self, default_reason: str) -> None:
        """Close, wait for the tail chunk, finalize, make durable. Safe to call repeatedly."""
        if self._finish_task is None:
            self._finish_task = asyncio.ensure_future(self._finish_once(default_reason))
        # Shielded: a host cancelling its task mid-end must not cancel the finalization.
        await asyncio.shield(self._finish_task)

    async def _finish_in_teardown(self) -> None:
        """Finish from Pipecat's teardown (our observer's or our processor's cleanup).

        Before Pipecat 1.3, a host that cancels ``runner.run()`` while the teardown awaits
        hangs it for good: ``PipelineTask.run`` queues a CancelFrame for the push task the
        cancellation just ended, then waits for an event it has already cleared. Our end
        awaits (the tail chunk, the commit: bounded), so there the cancellation is taken
        here, the end completes and the teardown goes on; ``PipelineRunner.run`` of those
        versions swallows the cancellation anyway. From 1.3 on it propagates as usual.
        """
        while True:
            try:
                await self._finish("unknown")
                return
            except asyncio.CancelledError:
                task = asyncio.current_task()
                finishing = self._finish_task
                if compat.HAS_WORKER or task is None or finishing is None or finishing.done():
                    raise
                task.uncancel()  # bounded: the end itself is (tail and commit waits)
                logger.debug(
                    f"{self}: the host cancelled during the end of call {self._call_id}; "
                    "finishing it first (Pipecat < 1.3 would hang on a cancelled teardown)"
                )

    async def _finish_once(self, default_reason: str) -> None:
        if not self._opened:
            return
        self._release_played(None)
        self._close(_now_us(), default_reason)
        try:
            await self._wait_for_tail()
        finally:
            self._finalize()
        if self._writer is not None and not await self._writer.flush(FLUSH_WAIT_S):
            logger.warning(
                f"{self}: call {self._call_id} was not committed within {FLUSH_WAIT_S:.0f} s; "
                "it is still queued and will be written when the disk allows"
            )
        elif lifecycle.host_is_shutting_down() and self._deliver and self._api_key:
            await lifecycle.deliver_before_exit(
                self._directory,
                self._api_key,
                self._base_url,
                self._call_id,
                self._exit_drain_s,
                keep_delivered_audio=self._keep_delivered_audio,
            )

    async def _wait_for_tail(self) -> None:
        """Wait (bounded) for the recording's last chunk: Pipecat hands it to a background task."""
        processor = self._audio_processor
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TAIL_WAIT_S
        stopped_it = False
        while loop.time() < deadline:
            pending = [
                task
                for name, task in list(getattr(processor, "_event_tasks", ()))
                if name == "on_audio_data" and not task.done()
            ]
            if pending:
                await asyncio.wait(pending, timeout=max(0.0, deadline - loop.time()))
                continue
            if not getattr(processor, "_recording", False):
                return
            if not stopped_it and loop.time() > deadline - TAIL_WAIT_S / 2:
                # The processor will not stop by itself (e.g. StopFrame): flush its tail.
                stopped_it = True
                await processor.stop_recording()
                continue
            await asyncio.sleep(0.01)

    def _finalize(self) -> None:
        if self._finalized or not self._opened or self._writer is None:
            return
        self._finalized = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        at, reason = self._closed or (_now_us(), "unknown")
        self._writer.submit(FinalizeOp(self._call_id, at, reason))
        release_call_id(self._call_id, self)
        if not self._own_processor and not self._sample_zero_recorded:
            logger.warning(
                f"{self}: call {self._call_id} has no recording: the AudioBufferProcessor you "
                "passed never recorded. Start it with `await processor.start_recording()` "
                "(Pipecat 1.5+: AudioBufferProcessor(auto_start_recording=True); older "
                "versions ignore that argument)"
            )
        if not self._saw_text:
            logger.warning(
                f"{self}: call-ended with empty transcript for call {self._call_id}: no "
                "TranscriptionFrame or TTSTextFrame was seen. Check that STT/TTS services "
                "are in the pipeline and the observer is attached"
            )

    async def _processor_cleanup(self) -> None:
        """The pipeline is tearing down. If we were never attached, finish the call from here."""
        self._check_attached()
        if not self._attached and self._opened:
            await self._finish_in_teardown()

    def _check_attached(self) -> None:
        if self._attached or self._not_attached_warned:
            return
        self._not_attached_warned = True
        logger.warning(
            f"{self}: the audio processor started but RoarkObserver received no frames: it is "
            "not attached. Pass it as PipelineWorker(pipeline, observers=[roark]) (or "
            "PipelineTask(pipeline, observers=[roark])); PipelineParams(observers=...) is "
            "silently ignored by Pipecat 1.x. Only audio is recorded for this call"
        )

    # ---- delivery ----

    def _start_delivery(self) -> None:
        """Deliver while the call runs: this process's background drainer (started once)."""
        if self._deliver and self._api_key and self._writer is not None:
            ensure_background_drainer(
                self._directory,
                self._api_key,
                self._base_url,
                keep_delivered_audio=self._keep_delivered_audio,
            )

    def _serve_metrics(self, port: int | None) -> None:
        """The opt-in Prometheus endpoint; a port that cannot be bound costs metrics, not the call."""
        port = metrics.resolve_port(port)
        if port is None or self._writer is None:
            return
        addr = metrics.resolve_addr()
        try:
            metrics.serve(port, addr, self._directory)
        except OSError as exc:
            logger.error(
                f"{self}: cannot serve metrics on {addr}:{port} ({exc.strerror or exc}); "
                "calls are recorded as usual. Choose another metrics_port"
            )

    # ---- failure handling ----

    def _partial_audio(self, frame: AudioRawFrame) -> None:
        if self._partial_audio_warned:
            return
        self._partial_audio_warned = True
        size = len(frame.audio) if isinstance(frame.audio, (bytes, bytearray)) else "?"
        logger.warning(
            f"{self}: call {self._call_id}: an audio frame of {size} bytes is not whole "
            f"16-bit samples for {frame.num_channels!r} channel(s); such frames are not "
            "recorded (check the transport or resampler that produced it)"
        )

    def _guard(self, function: Callable[..., None], *args: Any) -> None:
        try:
            function(*args)
        except Exception as exc:
            self._hook_failed(getattr(function, "__name__", "callback"), exc)

    def _hook_failed(self, where: str, exc: BaseException) -> None:
        key = f"{where}:{type(exc).__name__}"
        if key in self._hook_errors:
            return
        self._hook_errors.add(key)
        logger.opt(exception=exc).error(
            f"{self}: {where} failed ({type(exc).__name__}: {exc}); that frame was skipped and "
            f"call {self._call_id} goes on. Please report this with the traceback"
        )

    def _warn_if_no_key(self) -> None:
        global _missing_key_warned
        if self._api_key is None and not _missing_key_warned:
            _missing_key_warned = True
            logger.warning(
                f"pipecat-roark: no Roark API key (api_key= or {config.ENV_API_KEY}); calls are "
                f"recorded in {self._directory} and will be delivered by "
                "`ROARK_API_KEY=... pipecat-roark drain`"
            )


_UNSEEN: Any = object()
