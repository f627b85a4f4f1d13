"""The Roark wire contract as msgspec Structs.

One place owns the camelCase names, the field order and which fields are omitted,
so the observer, the drainer, the dev server and the tests cannot drift apart.
Fields that default to ``None`` are left out of the JSON (roark-api.md: "omitted when
not set"), never sent as ``null``.
"""

from __future__ import annotations

import hashlib
from urllib.parse import quote

import msgspec

__all__ = [
    "CallEnded",
    "CallStarted",
    "ChunkUploadUrl",
    "ChunkUploadUrlRequest",
    "ToolCallEntry",
    "ToolEntry",
    "ToolResultEntry",
    "TranscriptEntry",
    "decode_chunk_upload_url",
    "call_ended_key",
    "call_started_key",
    "chunk_key",
    "encode",
    "header_key",
    "key_label",
]

PCM_CONTENT_TYPE = "audio/pcm"


class TranscriptEntry(msgspec.Struct, rename="camel", omit_defaults=True, frozen=True):
    """One turn of the conversation, as heard."""

    role: str
    content: str
    timestamp: str
    audio_offset_ms: int | None = None
    end_timestamp: str | None = None
    end_audio_offset_ms: int | None = None
    user_id: str | None = None
    language: str | None = None


class ToolCallEntry(
    msgspec.Struct,
    tag_field="kind",
    tag="tool_call",
    rename="camel",
    omit_defaults=True,
    frozen=True,
):
    """The LLM asked for a function call; ``arguments`` is already a JSON string."""

    tool_call_id: str
    name: str
    arguments: str
    timestamp: str
    audio_offset_ms: int | None = None


class ToolResultEntry(
    msgspec.Struct,
    tag_field="kind",
    tag="tool_result",
    rename="camel",
    omit_defaults=True,
    frozen=True,
):
    """The function's result; ``content`` is a string (JSON for dicts and lists)."""

    tool_call_id: str
    content: str
    timestamp: str
    audio_offset_ms: int | None = None


ToolEntry = ToolCallEntry | ToolResultEntry


class CallStarted(
    msgspec.Struct,
    tag_field="event",
    tag="call-started",
    rename="camel",
    omit_defaults=True,
    frozen=True,
):
    """The call-started event: sent first, as soon as a call begins."""

    pipecat_call_id: str
    event_timestamp: str
    agent_id: str
    agent_name: str | None = None
    agent_prompt: str | None = None


class CallEnded(
    msgspec.Struct,
    tag_field="event",
    tag="call-ended",
    rename="camel",
    omit_defaults=True,
    frozen=True,
):
    """The call-ended event: sent last, with the whole transcript and tool calls."""

    pipecat_call_id: str
    event_timestamp: str
    call_started_at: str
    call_ended_at: str
    call_ended_reason: str
    agent_spoke_first: bool | None = None
    recording_sample_rate: int | None = None
    recording_num_channels: int | None = None
    transcript: list[TranscriptEntry] | None = None
    tool_calls: list[ToolEntry] | None = None


class ChunkUploadUrlRequest(msgspec.Struct, rename="camel", frozen=True):
    """Asks Roark where to PUT chunk ``chunk_index`` of a call's recording."""

    pipecat_call_id: str
    chunk_index: int
    content_type: str = PCM_CONTENT_TYPE


class ChunkUploadUrl(msgspec.Struct, rename="camel", frozen=True):
    """Roark's answer to a chunk-upload-url request (bare or inside ``{"data": …}``)."""

    upload_url: str
    s3_key: str | None = None
    chunk_index: int | None = None
    expires_in_seconds: float | None = None
    method: str = "PUT"
    content_type: str = PCM_CONTENT_TYPE


class _Envelope(msgspec.Struct):
    data: ChunkUploadUrl


def decode_chunk_upload_url(body: bytes) -> ChunkUploadUrl:
    """Roark's chunk-upload-url answer, in the bare or the ``{"data": …}`` shape.

    Returns:
        Where and how to upload the chunk.

    Raises:
        msgspec.DecodeError: ``body`` is not JSON.
        msgspec.ValidationError: the JSON has neither shape.
    """
    raw = msgspec.json.decode(body)
    if isinstance(raw, dict) and isinstance(raw.get("data"), dict):
        return msgspec.convert(raw["data"], ChunkUploadUrl)
    return msgspec.convert(raw, ChunkUploadUrl)


_encoder = msgspec.json.Encoder()


def encode(payload: msgspec.Struct) -> bytes:
    """Compact JSON bytes of a wire Struct.

    Returns:
        The request body as sent: camelCase names, ``None`` fields left out.
    """
    return _encoder.encode(payload)


HEADER_KEY_MAX = 200
"""Longest Idempotency-Key we send; longer keys go in their hash form."""

# Printable ASCII but "%" (the escape): a key of these, not starting or ending with a
# space (trimmed on the way), goes out exactly as stored, as older versions sent it.
_PLAIN = frozenset(chr(c) for c in range(0x20, 0x7F)) - {"%"}


def call_started_key(call_id: str) -> str:
    """The idempotency key of a call's call-started event.

    Returns:
        ``<call_id>:call-started``.
    """
    return f"{call_id}:call-started"


def chunk_key(call_id: str, index: int) -> str:
    """The idempotency key of chunk ``index`` of a call (its upload URL and its PUT).

    Returns:
        ``<call_id>:chunk:<index>``.
    """
    return f"{call_id}:chunk:{index}"


def call_ended_key(call_id: str) -> str:
    """The idempotency key of a call's call-ended event.

    Returns:
        ``<call_id>:call-ended``.
    """
    return f"{call_id}:call-ended"


def key_label(key: str, call_id: str) -> str:
    """What a key names within its call, for display: the inverse of the key functions above.

    Returns:
        ``call-started``, ``chunk:3`` or ``call-ended``: ``key`` without its call id prefix.
    """
    return key.removeprefix(f"{call_id}:")


def header_key(key: str) -> str:
    """The Idempotency-Key header for a stored key: any ``str`` in, printable ASCII out.

    Call ids are any text, but a header holds visible ASCII only (HTTP clients refuse
    the rest, and NUL or a newline can never be sent). A plain key
    goes out as it is; otherwise its UTF-8 is percent-encoded (``réunion`` →
    ``r%C3%A9union``); past ``HEADER_KEY_MAX`` characters, the first 64 encoded ones are
    kept and ``%sha256:<hex of the whole key>`` follows. Deterministic, so every retry
    and every process sends the same header, and one-to-one: a plain key has no ``%``,
    an encoded one has at least one ``%XX`` escape and no other ``%``, a hashed one
    ``%sha256:``.

    Returns:
        The header value: the key itself, its percent-encoding, or a prefix and its hash.
    """
    if len(key) <= HEADER_KEY_MAX and all(c in _PLAIN for c in key) and key.strip(" ") == key:
        return key
    encoded = quote(key.encode("utf-8", "surrogatepass"), safe="!#$&'()*+,/:;=?@[]~")
    if len(encoded) <= HEADER_KEY_MAX:
        return encoded
    head = encoded[:64].rsplit("%", 1)[0] if "%" in encoded[61:64] else encoded[:64]
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{head}%sha256:{digest}"
