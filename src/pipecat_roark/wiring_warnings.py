"""What the end of a call says when the pipeline was wired so that something was missed.

One loud line each, naming the fix: the recorder calls these as it finalizes a call (or,
for the observer that never saw a frame, a few seconds after the pipeline started).
"""

from __future__ import annotations

from loguru import logger

__all__ = ["empty_transcript", "no_recording", "not_attached"]


def no_recording(who: object, call_id: str) -> None:
    """The caller's own AudioBufferProcessor never recorded."""
    logger.warning(
        f"{who}: call {call_id} has no recording: the AudioBufferProcessor you "
        "passed never recorded. Start it with `await processor.start_recording()` "
        "(Pipecat 1.5+: AudioBufferProcessor(auto_start_recording=True); older "
        "versions ignore that argument)"
    )


def empty_transcript(who: object, call_id: str) -> None:
    """No transcript or TTS text reached the observer during the whole call."""
    logger.warning(
        f"{who}: call-ended with empty transcript for call {call_id}: no "
        "TranscriptionFrame or TTSTextFrame was seen. Check that STT/TTS services "
        "are in the pipeline and the observer is attached"
    )


def not_attached(who: object) -> None:
    """The audio processor runs but the observer was never handed to the pipeline."""
    logger.warning(
        f"{who}: the audio processor started but RoarkObserver received no frames: it is "
        "not attached. Pass it as PipelineWorker(pipeline, observers=[roark]) (or "
        "PipelineTask(pipeline, observers=[roark])); PipelineParams(observers=...) is "
        "silently ignored by Pipecat 1.x. Only audio is recorded for this call"
    )
