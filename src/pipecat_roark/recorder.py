"""CallRecorder: the state of one call and the only code that hands its records to the writer.

The observer turns frames into facts and the audio processor reports what it sees; both
tell this recorder, which decides what the call's records are: it opens the call once,
appends its events while it is open, numbers its recording chunks, closes it with the
first end reason it hears, and finalizes it exactly once: at the end of the pipeline,
when the watchdog finds the session vanished, or abruptly at process exit. Its end waits,
bounded, for the recording's tail and for the commit, because Pipecat drops what is still
queued for an observer at teardown.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loguru import logger
from pipecat.frames.frames import Frame, StopFrame
from pipecat.processors.audio.audio_buffer_processor import AudioBufferProcessor

from . import compat, lifecycle
from .capture import call_id_problem, claim_call_id, clean_text, release_call_id
from .drain import ensure_background_drainer
from .errors import PipecatRoarkError
from .events import CallClosed, CallOpened, Event, RecordingStarted
from .ops import ChunkOp, EventOp, FinalizeOp, OpenOp
from .store import now_us
from .writer import Writer, writer_for

__all__ = ["DEFAULT_IDLE_TIMEOUT_S", "CallRecorder"]

TAIL_WAIT_S = 2.0
"""How long the end of a call waits for the recording's last chunk handler."""

FLUSH_WAIT_S = 5.0
"""How long the end of a call waits for its records to be committed."""

NOT_ATTACHED_CHECK_S = 5.0
DEFAULT_IDLE_TIMEOUT_S = 600.0
"""No frame at all for this long means the session vanished (the pipeline produces audio
frames continuously while a call lives, even in silence)."""


def _reason(frame: Frame, default: str) -> str:
    reason = getattr(frame, "reason", None)
    if reason is None or reason == "":
        return default
    return clean_text(reason)


class CallRecorder:
    """One call's state (open, closed, finalized) and its records, in the process's writer.

    Touched only from the event loop, except ``end_abruptly`` (process exit). Every
    failure is logged once per kind under the observer's name and swallowed.
    """

    def __init__(
        self,
        *,
        name: str,
        call_id: str,
        agent_id: str,
        agent_name: str | None,
        agent_prompt: str | None,
        key_fp: str | None,
        api_key: str | None,
        directory: Path,
        base_url: str | None,
        deliver: bool,
        max_spool_bytes: int,
        min_free_bytes: int,
        idle_timeout_s: float | None,
        exit_drain_s: float,
        keep_delivered_audio: bool,
        before_end: Callable[[], None],
    ) -> None:
        self._name = name
        self.call_id = call_id
        self._agent = (agent_id, agent_name, agent_prompt)
        self._before_end = before_end
        """Called as the end begins, before the call closes: the observer records what it
        still holds back (played texts not yet put in order)."""
        self._key_fp = key_fp
        self._api_key = api_key
        self._directory = directory
        self._base_url = base_url
        self._deliver = deliver
        self._idle_timeout_s = idle_timeout_s
        self._exit_drain_s = exit_drain_s
        self._keep_delivered_audio = keep_delivered_audio
        self.writer: Writer | None = None
        refused = call_id_problem(call_id)
        try:
            if refused is None:
                self.writer = writer_for(
                    directory, max_spool_bytes=max_spool_bytes, min_free_bytes=min_free_bytes
                )
        except PipecatRoarkError as exc:
            refused = str(exc)
        if refused is not None:
            logger.error(f"{self}: call {call_id!a} will not be recorded: {refused}")
        self._processor: AudioBufferProcessor | None = None
        self._own_processor = True
        self.opened = False
        self.attached = False
        """The observer has seen a frame: it, not the processor's cleanup, ends the call."""
        self._closed: tuple[int, str] | None = None
        self.finalized = False
        self.finish_task: asyncio.Task[None] | None = None
        self.last_frame = time.monotonic()
        """Monotonic time of the observer's latest frame, for the watchdog."""
        self._watchdog: asyncio.TimerHandle | None = None
        self._vanished: asyncio.Task[None] | None = None
        self._next_chunk = 0
        self.sample_zero_recorded = False
        self.saw_text = False
        """A transcript or TTS text was seen (else the end of the call warns)."""
        self._hook_errors: set[str] = set()
        self._not_attached_warned = False

    def __str__(self) -> str:
        return self._name

    def use_processor(self, processor: AudioBufferProcessor, *, own: bool) -> None:
        """Take the recording from ``processor`` (``own``: the default one, armed by itself)."""
        self._processor = processor
        self._own_processor = own
        processor.add_event_handler("on_audio_data", self._on_audio_data)

    # ---- the call's records ----

    def open(self, at: int) -> None:
        """Record the call's start, once; refused when another live call holds its id."""
        if self.opened or self.writer is None:
            return
        if not claim_call_id(self.call_id, self):
            self.writer = None
            logger.error(
                f"{self}: call {self.call_id!a} will not be recorded: another call in this "
                "process is recording under the same id. Give each call its own pipecat_call_id"
            )
            return
        self.opened = True
        agent_id, agent_name, agent_prompt = self._agent
        opened = CallOpened(
            at=at, agent_id=agent_id, agent_name=agent_name, agent_prompt=agent_prompt
        )
        self.writer.submit(OpenOp(self.call_id, opened, self._key_fp))
        self.last_frame = time.monotonic()
        self._arm_watchdog()
        self._start_delivery()

    def emit(self, event: Event) -> None:
        """Append one fact to the open call's timeline (nothing before open or after the end)."""
        if self.writer is not None and self.opened and not self.finalized:
            self.writer.submit(EventOp(self.call_id, event))

    def recording_started(self) -> bool:
        """The recording's sample 0 passed now; False if it was already noted."""
        if self.sample_zero_recorded:
            return False
        self.sample_zero_recorded = True
        self.open(now_us())
        self.emit(RecordingStarted(at=now_us()))
        return True

    def close(self, at: int, reason: str) -> None:
        """Note the call's end and its reason; the first one heard wins."""
        if self._closed is not None:
            return
        self._closed = (at, reason)
        if self.opened and self.writer is not None and not self.finalized:
            self.writer.submit(EventOp(self.call_id, CallClosed(at=at, reason=reason)))

    def processor_saw_start(self) -> None:
        """The StartFrame reached the audio processor: open, and check the observer later."""
        self.open(now_us())
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.call_later(NOT_ATTACHED_CHECK_S, self.guard, self._check_attached)

    def terminal_frame(self, frame: Frame) -> None:
        """An End/Cancel/Stop frame: the call ends with its reason."""
        reason = "unknown" if isinstance(frame, StopFrame) else _reason(frame, "agent-ended")
        self.open(now_us())
        self.close(now_us(), reason)

    async def _on_audio_data(
        self, processor: Any, audio: bytes, sample_rate: int, num_channels: int
    ) -> None:
        # Runs as a Pipecat background task; it must enqueue before its first await so
        # chunks keep the order the processor emitted them in.
        try:
            if not audio or self.writer is None or self.finalized:
                return
            self.open(now_us())
            if not self.opened or self.writer is None:  # refused
                return
            index = self._next_chunk
            self._next_chunk += 1
            self.writer.submit(
                ChunkOp(
                    self.call_id,
                    index,
                    bytes(audio),
                    int(sample_rate),
                    int(num_channels),
                    now_us(),
                )
            )
        except Exception as exc:
            self.hook_failed("on_audio_data", exc)

    # ---- the end of the call ----

    async def end_now(self, reason: str) -> None:
        """End the call now with ``reason`` (unless it already ended) and make it durable."""
        self.close(now_us(), clean_text(reason))
        processor = self._processor
        if getattr(processor, "_recording", False) and processor is not None:
            await processor.stop_recording()
        await self._finish("unknown")

    def end_abruptly(self, reason: str) -> Writer | None:
        """Process exit: finalize now without awaiting (the event loop may be gone or
        blocked); returns the writer to flush if the call was open.

        The recording's tail still buffered in the AudioBufferProcessor (up to one chunk)
        cannot be flushed here and is lost; everything already recorded is kept.
        """
        if not self.opened or self.finalized or self.writer is None:
            return None
        self.close(now_us(), reason)
        self._finalize()
        return self.writer

    def _arm_watchdog(self) -> None:
        if self._idle_timeout_s is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        remaining = self._idle_timeout_s - (time.monotonic() - self.last_frame)
        delay = max(0.05, min(remaining, self._idle_timeout_s / 4, 30.0))
        self._watchdog = loop.call_later(delay, self.guard, self._watchdog_tick)

    def _watchdog_tick(self) -> None:
        self._watchdog = None
        if self.finalized or self.finish_task is not None or self._idle_timeout_s is None:
            return
        idle = time.monotonic() - self.last_frame
        if idle < self._idle_timeout_s:
            self._arm_watchdog()
            return
        logger.warning(
            f"{self}: no frame for {idle:.0f} s: the session vanished without an EndFrame; "
            f"finalizing call {self.call_id} (reason session-vanished). Call "
            "`await roark.aflush()` when your client disconnects to end calls sooner"
        )
        self._vanished = asyncio.ensure_future(self._end_vanished())

    async def _end_vanished(self) -> None:
        try:
            await self.end_now("session-vanished")
        except Exception as exc:
            self.hook_failed("aflush", exc)

    async def _finish(self, default_reason: str) -> None:
        """Close, wait for the tail chunk, finalize, make durable. Safe to call repeatedly."""
        if self.finish_task is None:
            self.finish_task = asyncio.ensure_future(self._finish_once(default_reason))
        # Shielded: a host cancelling its task mid-end must not cancel the finalization.
        await asyncio.shield(self.finish_task)

    async def finish_in_teardown(self) -> None:
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
                finishing = self.finish_task
                if compat.HAS_WORKER or task is None or finishing is None or finishing.done():
                    raise
                task.uncancel()  # bounded: the end itself is (tail and commit waits)
                logger.debug(
                    f"{self}: the host cancelled during the end of call {self.call_id}; "
                    "finishing it first (Pipecat < 1.3 would hang on a cancelled teardown)"
                )

    async def _finish_once(self, default_reason: str) -> None:
        if not self.opened:
            return
        self._before_end()
        self.close(now_us(), default_reason)
        try:
            await self._wait_for_tail()
        finally:
            self._finalize()
        if self.writer is not None and not await self.writer.flush(FLUSH_WAIT_S):
            logger.warning(
                f"{self}: call {self.call_id} was not committed within {FLUSH_WAIT_S:.0f} s; "
                "it is still queued and will be written when the disk allows"
            )
        elif lifecycle.host_is_shutting_down() and self._deliver and self._api_key:
            await lifecycle.deliver_before_exit(
                self._directory,
                self._api_key,
                self._base_url,
                self.call_id,
                self._exit_drain_s,
                keep_delivered_audio=self._keep_delivered_audio,
            )

    async def _wait_for_tail(self) -> None:
        """Wait (bounded) for the recording's last chunk: Pipecat hands it to a background task."""
        processor = self._processor
        if processor is None:
            return
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
        if self.finalized or not self.opened or self.writer is None:
            return
        self.finalized = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        at, reason = self._closed or (now_us(), "unknown")
        self.writer.submit(FinalizeOp(self.call_id, at, reason))
        release_call_id(self.call_id, self)
        if not self._own_processor and not self.sample_zero_recorded:
            logger.warning(
                f"{self}: call {self.call_id} has no recording: the AudioBufferProcessor you "
                "passed never recorded. Start it with `await processor.start_recording()` "
                "(Pipecat 1.5+: AudioBufferProcessor(auto_start_recording=True); older "
                "versions ignore that argument)"
            )
        if not self.saw_text:
            logger.warning(
                f"{self}: call-ended with empty transcript for call {self.call_id}: no "
                "TranscriptionFrame or TTSTextFrame was seen. Check that STT/TTS services "
                "are in the pipeline and the observer is attached"
            )

    async def processor_cleanup(self) -> None:
        """The pipeline is tearing down. If we were never attached, finish the call from here."""
        self._check_attached()
        if not self.attached and self.opened:
            await self.finish_in_teardown()

    def _check_attached(self) -> None:
        if self.attached or self._not_attached_warned:
            return
        self._not_attached_warned = True
        logger.warning(
            f"{self}: the audio processor started but RoarkObserver received no frames: it is "
            "not attached. Pass it as PipelineWorker(pipeline, observers=[roark]) (or "
            "PipelineTask(pipeline, observers=[roark])); PipelineParams(observers=...) is "
            "silently ignored by Pipecat 1.x. Only audio is recorded for this call"
        )

    def _start_delivery(self) -> None:
        """Deliver while the call runs: this process's background drainer (started once)."""
        if self._deliver and self._api_key and self.writer is not None:
            ensure_background_drainer(
                self._directory,
                self._api_key,
                self._base_url,
                keep_delivered_audio=self._keep_delivered_audio,
            )

    # ---- failure handling ----

    def guard(self, function: Callable[..., object], *args: Any) -> None:
        """Run a callback; log and swallow what it raises (nothing reaches the pipeline)."""
        try:
            function(*args)
        except Exception as exc:
            self.hook_failed(getattr(function, "__name__", "callback"), exc)

    def hook_failed(self, where: str, exc: BaseException) -> None:
        """Log one failure, once per place and exception class: the call goes on."""
        key = f"{where}:{type(exc).__name__}"
        if key in self._hook_errors:
            return
        self._hook_errors.add(key)
        logger.opt(exception=exc).error(
            f"{self}: {where} failed ({type(exc).__name__}: {exc}); that frame was skipped and "
            f"call {self.call_id} goes on. Please report this with the traceback"
        )
