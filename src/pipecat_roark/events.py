"""The raw per-call timeline stored in the WAL.

Events are facts the observer saw, in the order it saw them, with the wall-clock time
(``at``, microseconds since the Unix epoch, UTC). Nothing here is a Roark payload:
``timeline.py`` turns a call's events into payloads, so a fix to assembly also fixes
calls recorded before it. Encoded as compact msgpack with short tags; the tags are
part of the on-disk format and must never be renamed.
"""

from __future__ import annotations

import msgspec

__all__ = [
    "BotSpeech",
    "BotText",
    "CallClosed",
    "CallOpened",
    "ChunkRecorded",
    "Event",
    "Interruption",
    "RecordingStarted",
    "ToolCall",
    "ToolResult",
    "UserSpeech",
    "UserText",
    "decode_event",
    "encode_event",
]


class _Base(msgspec.Struct, tag_field="k", omit_defaults=True, frozen=True):
    at: int
    """Wall-clock microseconds since the Unix epoch (UTC)."""


class CallOpened(_Base, tag="open", frozen=True):
    """The call began (the pipeline's StartFrame), with the agent it is recorded for."""

    agent_id: str
    agent_name: str | None = None
    agent_prompt: str | None = None


class UserSpeech(_Base, tag="us", frozen=True):
    """UserStartedSpeakingFrame (started=True) / UserStoppedSpeakingFrame."""

    started: bool


class BotSpeech(_Base, tag="bs", frozen=True):
    """BotStartedSpeakingFrame (started=True) / BotStoppedSpeakingFrame."""

    started: bool


class Interruption(_Base, tag="int", frozen=True):
    """An InterruptionFrame: the bot's turn in progress was cut here."""


class UserText(_Base, tag="ut", frozen=True):
    """A final TranscriptionFrame."""

    text: str
    user_id: str | None = None
    language: str | None = None


class BotText(_Base, tag="bt", frozen=True):
    """Assistant text.

    ``source`` is ``"tts"`` for TTSTextFrame and ``"llm"`` for LLMTextFrame (used only
    when a call has no TTS text at all). ``played`` is True when the frame was seen
    leaving an output transport, i.e. released in step with the audio the caller heard.
    ``spaced`` mirrors ``includes_inter_frame_spaces``: concatenate verbatim.
    """

    text: str
    spaced: bool = False
    source: str = "tts"
    played: bool = False


class ToolCall(_Base, tag="tc", frozen=True):
    """The LLM asked for a function call (FunctionCallInProgressFrame)."""

    tool_call_id: str
    name: str
    arguments: str
    """Already a JSON string (dicts compact-encoded, strings verbatim, None → "{}")."""


class ToolResult(_Base, tag="tr", frozen=True):
    """A function call's result (FunctionCallResultFrame); ``content`` is already text."""

    tool_call_id: str
    name: str
    content: str


class RecordingStarted(_Base, tag="rec", frozen=True):
    """Wall time of the recording's sample 0 (first audio frame the buffer processor took)."""


class ChunkRecorded(_Base, tag="chunk", frozen=True):
    """A recording chunk is durable on disk (written in the same transaction as its row)."""

    index: int
    size: int
    sample_rate: int
    num_channels: int


class CallClosed(_Base, tag="end", frozen=True):
    """The call ended (End/Cancel/Stop frame, aflush, or finalization of an orphan)."""

    reason: str


Event = (
    CallOpened
    | UserSpeech
    | BotSpeech
    | Interruption
    | UserText
    | BotText
    | ToolCall
    | ToolResult
    | RecordingStarted
    | ChunkRecorded
    | CallClosed
)

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Event] = msgspec.msgpack.Decoder(Event)


def encode_event(event: Event) -> bytes:
    """An event as stored in the ``events`` table.

    Returns:
        Compact msgpack, tagged with the event's short on-disk tag.
    """
    return _encoder.encode(event)


def decode_event(body: bytes) -> Event:
    """A stored event back, whatever its kind.

    Returns:
        The event ``encode_event`` stored.

    Raises:
        msgspec.DecodeError: ``body`` is not msgpack (a damaged page).
        msgspec.ValidationError: it is, but not an event this version knows.
    """
    return _decoder.decode(body)
