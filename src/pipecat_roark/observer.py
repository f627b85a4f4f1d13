"""RoarkObserver: records one Pipecat call into the local WAL.

The observer never talks to the network and never awaits disk on the frame path:
``on_push_frame`` looks the frame's class up in a per-instance table (audio exits
first); the few frames that matter become small event structs (facts.py) handed to
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
from pathlib import Path
from typing import Any

from loguru import logger
from pipecat.frames.frames import Frame
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.processors.audio.audio_buffer_processor import AudioBufferProcessor
from pipecat.processors.frame_processor import FrameProcessor

from . import config, lifecycle, metrics_endpoint
from .call_delivery import CallDelivery
from .capture import clean_text, resolve_call_id
from .events import CallOpened
from .facts import FrameFacts
from .lifecycle import DEFAULT_EXIT_DRAIN_S
from .recorder import CallRecorder
from .recording import RoarkAudioBufferProcessor
from .store import now_us
from .watchdog import DEFAULT_IDLE_TIMEOUT_S
from .writer import DEFAULT_MAX_SPOOL_BYTES
from .writer_process import AnyWriter

__all__ = ["DEFAULT_CHUNK_BYTES", "RoarkAudioBufferProcessor", "RoarkObserver"]

DEFAULT_CHUNK_BYTES = 256 * 1024
"""Bytes of one stereo recording chunk (AudioBufferProcessor counts one mono track)."""

_monotonic = time.monotonic


class RoarkObserver(BaseObserver):
    r"""Records a Pipecat call (lifecycle, transcript, tool calls, stereo audio) durably.

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
        delivery_process: Deliver from a child process instead of the bot's event loop
            (default False; falls back to ``PIPECAT_ROARK_DELIVERY_PROCESS``): the first
            observer of a data directory and key starts one
            ``pipecat-roark drain --follow`` child, woken on every commit, that outlives
            the bot only for one last bounded pass. The HTTP and the drainer's SQL then
            cost the child's CPU, not the bot's; it costs a second process and its
            start-up (about 0.6 s, mostly imports), off the loop. If the child cannot
            start or dies, the in-loop drainer takes over.
        writer_process: Record from a child process (default False; falls back to
            ``PIPECAT_ROARK_WRITER_PROCESS``): the first observer of a data directory
            starts one ``python -m pipecat_roark.writer_child`` that does the SQLite
            transactions, chunk files and every ``fsync``, so they take no time under the
            bot's GIL. The bot keeps each record until the child says it is committed;
            if the child cannot start or dies, this process records itself from there,
            losing nothing. If the bot dies, even of SIGKILL, the child commits what it
            was sent. It costs a second process and its start-up, off the loop.
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
        min_free_bytes: int = config.DEFAULT_MIN_FREE_BYTES,
        idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S,
        exit_drain_s: float = DEFAULT_EXIT_DRAIN_S,
        keep_delivered_audio: bool = False,
        metrics_port: int | None = None,
        delivery_process: bool | None = None,
        writer_process: bool | None = None,
    ) -> None:
        super().__init__()
        call_id = resolve_call_id(pipecat_call_id, runner_args)
        self._api_key = config.resolve_api_key(api_key)
        self._directory = config.resolve_dir(data_dir)
        delivery = CallDelivery(
            self._directory,
            self._api_key,
            base_url,
            deliver,
            exit_drain_s,
            keep_delivered_audio,
            config.resolve_delivery_process(delivery_process),
        )
        self._recorder = recorder = CallRecorder(
            name=str(self),
            call_id=call_id,
            agent=CallOpened(
                at=0,
                agent_id=clean_text(agent_id),
                agent_name=None if agent_name is None else clean_text(agent_name),
                agent_prompt=None if agent_prompt is None else clean_text(agent_prompt),
            ),
            key_fp=config.key_fingerprint(self._api_key),
            delivery=delivery,
            max_spool_bytes=max_spool_bytes,
            min_free_bytes=min_free_bytes,
            idle_timeout_s=idle_timeout_s,
            before_end=self._release_all_played,
            writer_process=config.resolve_writer_process(writer_process),
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
        self._facts = FrameFacts(recorder, self._audio_processor, own=own_processor)
        self._dispatch = self._facts.dispatch
        self._watchdog = recorder.watchdog
        self._hooks = recorder.hooks
        self._played_pending = self._facts.played.pending
        lifecycle.register(self, delivery)
        lifecycle.install_exit_hooks()

    # ---- public API ----

    @property
    def pipecat_call_id(self) -> str:
        """The id this call is recorded and delivered under."""
        return self._recorder.call_id

    @property
    def audio_processor(self) -> AudioBufferProcessor:
        """Put this in the pipeline after ``transport.output()`` to record both sides."""
        return self._audio_processor

    @property
    def data_dir(self) -> Path:
        """Where the WAL (``wal.sqlite`` and ``chunks/``) of this call lives."""
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
            self._hooks.failed("aflush", exc)

    # ---- BaseObserver hooks (each wrapped: an exception would silence us for good) ----

    async def on_push_frame(self, data: FramePushed) -> None:
        """Turn a frame into facts for the call: a dict lookup, then an append. Never raises."""
        self._watchdog.last_frame = _monotonic()
        try:
            if self._played_pending:
                self._facts.played.release(data.timestamp)
            frame = data.frame
            cls = frame.__class__
            handler = self._dispatch.get(cls, _UNSEEN)
            if handler is None:
                return
            if handler is _UNSEEN:
                handler = self._facts.resolve(cls)
                if handler is None:
                    return
            handler(data, frame)
        except Exception as exc:
            self._hooks.failed("on_push_frame", exc)

    async def on_pipeline_started(self) -> None:
        """The pipeline started: open the call (once). Never raises."""
        try:
            self._recorder.attached = True
            self._recorder.open(now_us())
        except Exception as exc:
            self._hooks.failed("on_pipeline_started", exc)

    async def cleanup(self) -> None:
        """The pipeline is tearing down: finish a call that never ended. Never raises."""
        try:
            await super().cleanup()
        except Exception as exc:
            self._hooks.failed("cleanup", exc)
        try:
            await self._recorder.finish_in_teardown()
        except Exception as exc:
            self._hooks.failed("cleanup", exc)

    def end_abruptly(self, reason: str) -> AnyWriter | None:
        """Process exit: finalize now without awaiting (the event loop may be gone or blocked).

        Returns:
            The writer to flush if the call was open (see ``CallRecorder``), else None.
        """
        return self._recorder.end_abruptly(reason)

    # ---- what our audio processor and the recorder call back ----

    def _observe_first_pushes_only(self) -> None:
        """Our audio processor saw the pipeline's shape: later pushes carry nothing we need."""
        self._every_push = False

    def _note_played(self, processor: FrameProcessor, frame: Frame, direction: Any) -> None:
        self._facts.played.note_played(processor, frame, direction)

    def _release_all_played(self) -> None:
        self._facts.played.release(None)

    # ---- process wiring ----

    def _serve_metrics(self, port: int | None) -> None:
        """The opt-in Prometheus endpoint; a port that cannot be bound costs metrics, not the call."""
        port = metrics_endpoint.resolve_port(port)
        if port is None or self._recorder.writer is None:
            return
        addr = metrics_endpoint.resolve_addr()
        try:
            metrics_endpoint.serve(port, addr, self._directory)
        except OSError as exc:
            logger.error(
                f"{self}: cannot serve metrics on {addr}:{port} ({exc.strerror or exc}); "
                "calls are recorded as usual. Choose another metrics_port"
            )

    def _warn_if_no_key(self) -> None:
        if self._api_key is None and not lifecycle.PROCESS.warned_missing_key:
            lifecycle.PROCESS.warned_missing_key = True
            logger.warning(
                f"pipecat-roark: no Roark API key (api_key= or {config.ENV_API_KEY}); calls are "
                f"recorded in {self._directory} and will be delivered by "
                "`ROARK_API_KEY=... pipecat-roark drain`"
            )


_UNSEEN: Any = object()
