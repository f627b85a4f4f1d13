"""RoarkObserver: records one Pipecat call into the local WAL.

The observer never talks to the network and never awaits disk on the frame path:
``on_push_frame`` looks the frame's class up in a per-instance table (audio exits
first), turns the few frames that matter into small event structs and hands them to
the call's ``CallRecorder`` (recorder.py), which owns the call's state and is the only
code that talks to the process's writer thread. Pipecat drops whatever is still queued
for an observer at teardown, so being cheap here is what makes the end of the call
arrive at all.

The default ``audio_processor`` (recording.py) does the time-critical parts inline, in
the pipeline itself: it arms recording on the StartFrame, notes the recording's sample
0, and sees End/Cancel/Stop frames even when the observer lags or was never attached.

Each frame is observed once where Pipecat allows it (1.x: ``observe_every_push`` False),
which halves what Pipecat queues for us per frame. The one fact that needs a later push,
"this TTS text left the output transport", is then noted by the default audio processor
(it sits after ``transport.output()`` and is handed exactly what the transport released)
at the moment it is handed the frame, stamped with the pipeline clock; the observer puts
it back in push order by that stamp. Pipelines where that cannot work keep every push.
"""

from __future__ import annotations

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
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.processors.audio.audio_buffer_processor import AudioBufferProcessor
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_output import BaseOutputTransport

from . import config, lifecycle, metrics
from .capture import arguments_json, clean_text, resolve_call_id, result_text
from .events import (
    BotSpeech,
    BotText,
    Interruption,
    ToolCall,
    ToolResult,
    UserSpeech,
    UserText,
)
from .lifecycle import DEFAULT_EXIT_DRAIN_S
from .recorder import DEFAULT_IDLE_TIMEOUT_S, CallRecorder
from .recording import RoarkAudioBufferProcessor
from .store import now_us
from .writer import DEFAULT_MAX_SPOOL_BYTES, DEFAULT_MIN_FREE_BYTES, Writer

__all__ = ["DEFAULT_CHUNK_BYTES", "RoarkAudioBufferProcessor", "RoarkObserver"]

DEFAULT_CHUNK_BYTES = 256 * 1024
"""Bytes of one stereo recording chunk (AudioBufferProcessor counts one mono track)."""

_missing_key_warned = False


_monotonic = time.monotonic

Handler = Callable[[FramePushed, Any], None]

PLAYED_BACKLOG = 4096
"""TTS texts released by the output transport and not yet put in order by the observer."""


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
        call_id = resolve_call_id(pipecat_call_id, runner_args)
        self._api_key = config.resolve_api_key(api_key)
        self._directory = config.resolve_dir(data_dir)
        self._recorder = recorder = CallRecorder(
            name=str(self),
            call_id=call_id,
            agent_id=clean_text(agent_id),
            agent_name=None if agent_name is None else clean_text(agent_name),
            agent_prompt=None if agent_prompt is None else clean_text(agent_prompt),
            key_fp=config.key_fingerprint(self._api_key),
            api_key=self._api_key,
            directory=self._directory,
            base_url=base_url,
            deliver=deliver,
            max_spool_bytes=max_spool_bytes,
            min_free_bytes=min_free_bytes,
            idle_timeout_s=idle_timeout_s,
            exit_drain_s=exit_drain_s,
            keep_delivered_audio=keep_delivered_audio,
            before_end=self._release_all_played,
        )
        self._warn_if_no_key()
        self._serve_metrics(metrics_port)

        own_processor = audio_buffer_processor is None
        if audio_buffer_processor is None:
            num_channels = 2
            self._audio_processor: AudioBufferProcessor = RoarkAudioBufferProcessor(
                recorder,
                note_played=self._note_played,
                first_pushes_only=self._observe_first_pushes_only,
                num_channels=num_channels,
                buffer_size=max(2, chunk_bytes // num_channels),
            )
        else:
            self._audio_processor = audio_buffer_processor
        recorder.use_processor(self._audio_processor, own=own_processor)

        # Frame state, touched only from the event loop.
        self._every_push = True  # until our audio processor has seen the pipeline's shape
        self._played_pending: deque[tuple[int, Frame]] = deque(maxlen=PLAYED_BACKLOG)
        lifecycle.register(
            self,
            api_key=self._api_key if deliver else None,
            base_url=base_url,
            directory=self._directory,
            exit_drain_s=exit_drain_s,
            keep_delivered_audio=keep_delivered_audio,
        )
        lifecycle.install_exit_hooks()
        self._user_speaking = False
        self._bot_speaking = False
        self._tool_calls_seen: set[str] = set()
        self._tool_results_seen: set[str] = set()
        self._recent_ids: deque[int] = deque(maxlen=256)
        self._played_ids: deque[int] = deque(maxlen=256)
        self._seen_ids: set[int] = set()
        self._seen_order: deque[int] = deque()
        self._played_backlog_warned = False
        self._dispatch: dict[type, Handler | None] = {}
        # With a processor of the user's, sample 0 is seen from here (ours reports it inline).
        self._rules: list[tuple[type | tuple[type, ...], Handler | None]] = [
            (AudioRawFrame, None if own_processor else self._on_audio),
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
        return self._recorder.call_id

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
            await self._recorder.end_now(reason)
        except Exception as exc:
            self._recorder.hook_failed("aflush", exc)

    # ---- BaseObserver hooks (each wrapped: an exception would silence us for good) ----

    async def on_push_frame(self, data: FramePushed) -> None:
        self._recorder.last_frame = _monotonic()
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
            self._recorder.hook_failed("on_push_frame", exc)

    async def on_pipeline_started(self) -> None:
        try:
            self._recorder.attached = True
            self._recorder.open(now_us())
        except Exception as exc:
            self._recorder.hook_failed("on_pipeline_started", exc)

    async def cleanup(self) -> None:
        try:
            await super().cleanup()
        except Exception as exc:
            self._recorder.hook_failed("cleanup", exc)
        try:
            await self._recorder.finish_in_teardown()
        except Exception as exc:
            self._recorder.hook_failed("cleanup", exc)

    # ---- frame handlers (event loop; must stay cheap) ----

    def _resolve(self, cls: type) -> Handler | None:
        self._recorder.attached = True
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

    def _on_audio(self, data: FramePushed, frame: Frame) -> None:
        processor = self._audio_processor
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
        for cls, handler in list(self._dispatch.items()):
            if handler == self._on_audio:
                self._dispatch[cls] = None
        self._rules[0] = (AudioRawFrame, None)

    def _on_start(self, data: FramePushed, frame: Frame) -> None:
        self._recorder.open(now_us())

    def _on_terminal(self, data: FramePushed, frame: Frame) -> None:
        self._recorder.terminal_frame(frame)

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
                f"{self}: call {self._recorder.call_id}: the observer is {PLAYED_BACKLOG} played TTS "
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
        self._recorder.saw_text = True
        self._recorder.emit(
            BotText(
                at=now_us(),
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
            self._recorder.emit(
                BotText(
                    at=now_us(),
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
        self._recorder.emit(UserSpeech(at=now_us(), started=started))

    def _on_bot_speech(self, data: FramePushed, frame: Frame) -> None:
        started = isinstance(frame, BotStartedSpeakingFrame)
        if started == self._bot_speaking:
            return
        self._bot_speaking = started
        self._recorder.emit(BotSpeech(at=now_us(), started=started))

    def _on_interruption(self, data: FramePushed, frame: Frame) -> None:
        if not self._first(data, frame):
            return
        sibling = getattr(frame, "broadcast_sibling_id", None)
        if sibling is not None and sibling in self._recent_ids:
            return
        self._recent_ids.append(frame.id)
        self._bot_speaking = False  # the bot's turn is cut; its next start is a new turn
        self._recorder.emit(Interruption(at=now_us()))

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
        self._recorder.emit(
            ToolResult(
                at=now_us(),
                tool_call_id=tool_call_id,
                name=clean_text(getattr(frame, "function_name", "")),
                content=result_text(result),
            )
        )

    def end_abruptly(self, reason: str) -> Writer | None:
        """Process exit: finalize now without awaiting (the event loop may be gone or
        blocked); returns the writer to flush if the call was open (see ``CallRecorder``)."""
        return self._recorder.end_abruptly(reason)

    def _observe_first_pushes_only(self) -> None:
        """Our audio processor saw the pipeline's shape: later pushes carry nothing we need."""
        self._every_push = False

    def _release_all_played(self) -> None:
        self._release_played(None)

    # ---- process wiring ----

    def _serve_metrics(self, port: int | None) -> None:
        """The opt-in Prometheus endpoint; a port that cannot be bound costs metrics, not the call."""
        port = metrics.resolve_port(port)
        if port is None or self._recorder.writer is None:
            return
        addr = metrics.resolve_addr()
        try:
            metrics.serve(port, addr, self._directory)
        except OSError as exc:
            logger.error(
                f"{self}: cannot serve metrics on {addr}:{port} ({exc.strerror or exc}); "
                "calls are recorded as usual. Choose another metrics_port"
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
