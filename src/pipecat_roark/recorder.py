"""CallRecorder: the state of one call and the only code that hands its records to the writer.

The observer turns frames into facts and the audio processor reports what it sees; both
tell this recorder, which decides what the call's records are: it opens the call once,
appends its events while it is open, numbers its recording chunks, closes it with the
first end reason it hears, and finalizes it exactly once: at the end of the pipeline,
when the watchdog finds the session vanished, or abruptly at process exit. Its end waits,
bounded, for the recording's tail and for the commit, because Pipecat drops what is still
queued for an observer at teardown.

The end is heard inline (our audio processor sees the EndFrame) while the observer may
still be behind: facts Pipecat pushed before the end can reach us after it. So the end
is noted, with the pipeline clock's time, but stored only when the call is finalized:
a fact pushed before the end is kept (stamped no later than the end), one pushed after
it is refused, and the end is the call's last fact. A process killed in between leaves
no end; the drainer finalizes the call as ``observer-lost`` at its last fact.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from loguru import logger
from pipecat.frames.frames import Frame, StopFrame
from pipecat.processors.audio.audio_buffer_processor import AudioBufferProcessor

from . import compat, wiring_warnings
from .audio_tail import wait_for_tail
from .call_delivery import CallDelivery
from .capture import call_id_problem, clean_text
from .errors import PipecatRoarkError
from .events import CallClosed, CallOpened, Event, RecordingStarted
from .hooks import HookGuard
from .lifecycle import claim_call_id, release_call_id, writer_for
from .ops import ChunkOp, EventOp, FinalizeOp, OpenOp
from .store import now_us
from .watchdog import IdleWatchdog
from .writer_process import AnyWriter

__all__ = ["CallRecorder"]

FLUSH_WAIT_S = 5.0
"""How long the end of a call waits for its records to be committed."""

NOT_ATTACHED_CHECK_S = 5.0


def _reason(frame: Frame, default: str) -> str:
    reason = getattr(frame, "reason", None)
    if reason is None or reason == "":
        return default
    return clean_text(reason)


def _end_reason(frame: Frame) -> str:
    return "unknown" if isinstance(frame, StopFrame) else _reason(frame, "agent-ended")


def _writer_or_refusal(
    call_id: str, directory: Path, max_spool_bytes: int, min_free_bytes: int, process: bool
) -> tuple[AnyWriter | None, str | None]:
    """The process's writer for the call, or why the call will not be recorded.

    Returns:
        The writer and None, or None and the reason (a bad call id, an unusable store).
    """
    refused = call_id_problem(call_id)
    if refused is not None:
        return None, refused
    try:
        return writer_for(
            directory,
            process=process,
            max_spool_bytes=max_spool_bytes,
            min_free_bytes=min_free_bytes,
        ), None
    except PipecatRoarkError as exc:
        return None, str(exc)


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
        agent: CallOpened,
        key_fp: str | None,
        delivery: CallDelivery,
        max_spool_bytes: int,
        min_free_bytes: int,
        idle_timeout_s: float | None,
        before_end: Callable[[], None],
        writer_process: bool = False,
    ) -> None:
        self._name = name
        self.call_id = call_id
        self._agent = agent
        """The call's opening event, stamped when the call opens."""
        self.hooks = HookGuard(self, call_id)
        self._before_end = before_end
        """Called as the end begins, before the call closes: the observer records what it
        still holds back (played texts not yet put in order)."""
        self._key_fp = key_fp
        self._delivery = delivery
        self.writer, refused = _writer_or_refusal(
            call_id, delivery.directory, max_spool_bytes, min_free_bytes, writer_process
        )
        if refused is not None:
            logger.error(f"{self}: call {call_id!a} will not be recorded: {refused}")
        self._processor: AudioBufferProcessor | None = None
        self._own_processor = True
        self._opened = False
        self.attached = False
        """The observer has seen a frame: it, not the processor's cleanup, ends the call."""
        self._closed: tuple[int, str] | None = None
        """The end noted (wall time, reason); stored when the call is finalized."""
        self._reason_heard: str | None = None
        """An end's reason the observer saw coming, before our processor heard the end."""
        self._hears_end_inline = False
        """Our audio processor saw the StartFrame: it will hear the call's end inline."""
        self._closed_clock: int | None = None
        """The pipeline clock (ns) when the end was noted: later pushes are after the end."""
        self._finalized = False
        self.finish_task: asyncio.Task[None] | None = None
        self.watchdog = IdleWatchdog(
            idle_timeout_s,
            who=self,
            call_id=call_id,
            ended=self._ending,
            on_vanished=self._end_vanished,
            guard=self.hooks.guard,
        )
        """Its ``last_frame`` is stamped by the observer at every frame."""
        self._next_chunk = 0
        self._sample_zero_recorded = False
        self.saw_text = False
        """A transcript or TTS text was seen (else the end of the call warns)."""
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
        if self._opened or self.writer is None:
            return
        if not claim_call_id(self.call_id, self):
            self.writer = None
            logger.error(
                f"{self}: call {self.call_id!a} will not be recorded: another call in this "
                "process is recording under the same id. Give each call its own pipecat_call_id"
            )
            return
        self._opened = True
        opened = msgspec.structs.replace(self._agent, at=at)
        self.writer.submit(OpenOp(self.call_id, opened, self._key_fp))
        self.watchdog.start()
        self._delivery.start()

    def emit(self, event: Event, pushed: int | None = None) -> None:
        """Append one fact to the open call's timeline (nothing before open or after the end).

        ``pushed`` is when Pipecat pushed the frame it comes from (pipeline clock, ns): a
        fact that reaches us after the end was noted is kept if it was pushed before it.
        """
        if self.writer is None or not self._opened or self._finalized:
            return
        if self._closed is not None:
            late = self._pushed_before_end(event, pushed, self._closed[0])
            if late is None:
                return
            event = late
        self.writer.submit(EventOp(self.call_id, event))

    def _pushed_before_end(self, event: Event, pushed: int | None, end_at: int) -> Event | None:
        """A fact that reached us after the end was noted, as it is kept (None: refused).

        A lagging observer hands us facts Pipecat produced before the end: kept, stamped
        no later than the end, so they neither follow it nor extend the call. A frame
        pushed after the end (a pipeline going on after ``aflush``) is not the call's.

        Returns:
            The event to store, or None if its frame was pushed after the end.
        """
        end_clock = self._closed_clock
        if pushed is not None and end_clock is not None and pushed >= end_clock:
            return None
        if event.at > end_at:
            event = msgspec.structs.replace(event, at=end_at)
        return event

    def _pipeline_time(self) -> int | None:
        """The pipeline clock now, the clock Pipecat stamps each push with.

        Returns:
            Nanoseconds since the pipeline's clock started, or None before the pipeline
            set our processor up (then the end is told by finalize alone).
        """
        try:
            now = self._processor.get_clock().get_time() if self._processor is not None else 0
        except Exception:  # not set up: no clock yet
            return None
        return now if isinstance(now, int) and now > 0 else None

    def recording_started(self) -> bool:
        """The recording's sample 0 passed now: note it (and open the call if need be).

        Returns:
            True if noted now; False if it was already noted.
        """
        if self._sample_zero_recorded:
            return False
        self._sample_zero_recorded = True
        self.open(now_us())
        self.emit(RecordingStarted(at=now_us()))
        return True

    def close(self, at: int, reason: str) -> None:
        """Note the call's end and its reason; the first reason heard wins.

        Stored at finalize, after every fact pushed before it (see the module).
        """
        if self._closed is not None:
            return
        self._closed = (at, self._reason_heard or reason)
        self._closed_clock = self._pipeline_time()

    def processor_saw_start(self) -> None:
        """The StartFrame reached the audio processor: open, and check the observer later."""
        self._hears_end_inline = True
        self.open(now_us())
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.call_later(NOT_ATTACHED_CHECK_S, self.hooks.guard, self._check_attached)

    def terminal_frame(self, frame: Frame) -> None:
        """An End/Cancel/Stop frame reached the audio processor: the call ends, now."""
        self.open(now_us())
        self.close(now_us(), _end_reason(frame))

    def observed_terminal_frame(self, frame: Frame) -> None:
        """The observer saw an End/Cancel/Stop frame pushed.

        It sees the frame's first push, at the head of the pipeline, while the output
        transport may still be playing the last words. Where our audio processor is in
        the pipeline it hears the frame after them, inline, and that is the end; this
        only says why. Elsewhere (a processor of the user's) this is the end.
        """
        if self._hears_end_inline:
            self._reason_heard = self._reason_heard or _end_reason(frame)
        else:
            self.terminal_frame(frame)

    async def _on_audio_data(
        self, processor: Any, audio: bytes, sample_rate: int, num_channels: int
    ) -> None:
        # Runs as a Pipecat background task; it must enqueue before its first await so
        # chunks keep the order the processor emitted them in.
        try:
            if not audio or self.writer is None or self._finalized:
                return
            self.open(now_us())
            if not self._opened or self.writer is None:  # refused
                return
            index = self._next_chunk
            self._next_chunk += 1
            chunk = bytes(audio), int(sample_rate), int(num_channels)
            self.writer.submit(ChunkOp(self.call_id, index, *chunk, now_us()))
        except Exception as exc:
            self.hooks.failed("on_audio_data", exc)

    # ---- the end of the call ----

    async def end_now(self, reason: str) -> None:
        """End the call now with ``reason`` (unless it already ended) and make it durable."""
        self.close(now_us(), clean_text(reason))
        processor = self._processor
        if getattr(processor, "_recording", False) and processor is not None:
            await processor.stop_recording()
        await self._finish("unknown")

    def end_abruptly(self, reason: str) -> AnyWriter | None:
        """Process exit: finalize now without awaiting (the event loop may be gone or blocked).

        The recording's tail still buffered in the AudioBufferProcessor (up to one chunk)
        cannot be flushed here and is lost; everything already recorded is kept.

        Returns:
            The writer to flush if the call was open, else None.
        """
        if not self._opened or self._finalized or self.writer is None:
            return None
        self.close(now_us(), reason)
        self._finalize()
        return self.writer

    def _ending(self) -> bool:
        return self._finalized or self.finish_task is not None

    async def _end_vanished(self) -> None:
        try:
            await self.end_now("session-vanished")
        except Exception as exc:
            self.hooks.failed("aflush", exc)

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

        Raises:
            CancelledError: the host cancelled the teardown (from Pipecat 1.3 on, or once
                the end is complete).
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
        if not self._opened:
            return
        self._before_end()
        self.close(now_us(), default_reason)
        try:
            if self._processor is not None:
                await wait_for_tail(self._processor)
        finally:
            self._finalize()
        if self.writer is not None and not await self.writer.flush(FLUSH_WAIT_S):
            logger.warning(
                f"{self}: call {self.call_id} was not committed within {FLUSH_WAIT_S:.0f} s; "
                "it is still queued and will be written when the disk allows"
            )
        else:
            await self._delivery.after_end(self.call_id)

    def _finalize(self) -> None:
        if self._finalized or not self._opened or self.writer is None:
            return
        self._finalized = True
        self.watchdog.cancel()
        at, reason = self._closed or (now_us(), "unknown")
        self.writer.submit(EventOp(self.call_id, CallClosed(at=at, reason=reason)))
        self.writer.submit(FinalizeOp(self.call_id, at, reason))
        release_call_id(self.call_id, self)
        if not self._own_processor and not self._sample_zero_recorded:
            wiring_warnings.no_recording(self, self.call_id)
        if not self.saw_text:
            wiring_warnings.empty_transcript(self, self.call_id)

    async def processor_cleanup(self) -> None:
        """The pipeline is tearing down. If we were never attached, finish the call from here."""
        self._check_attached()
        if not self.attached and self._opened:
            await self.finish_in_teardown()

    def _check_attached(self) -> None:
        if self.attached or self._not_attached_warned:
            return
        self._not_attached_warned = True
        wiring_warnings.not_attached(self)
