"""Waiting for the recording's tail: the last chunk an AudioBufferProcessor still holds.

Pipecat hands each chunk to ``on_audio_data`` in a background task of the processor, and
a processor that was never told to stop (a StopFrame, a cancelled pipeline) keeps its
last partial chunk in its buffer. The end of a call waits for both, bounded.
"""

from __future__ import annotations

import asyncio

from pipecat.processors.audio.audio_buffer_processor import AudioBufferProcessor

__all__ = ["TAIL_WAIT_S", "wait_for_tail"]

TAIL_WAIT_S = 2.0
"""How long the end of a call waits for the recording's last chunk handler."""


async def wait_for_tail(processor: AudioBufferProcessor) -> None:
    """Wait (bounded) for the recording's last chunk: Pipecat hands it to a background task."""
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
