"""A call's stored events → the exact Roark payloads. Pure: no clock, no I/O.

Assembly happens at delivery time, not capture time, so a fix here also fixes calls
recorded before it, and a call cut off by a crash still yields its partial turns.
The turn rules are the reference observer's, learned the hard way (roark-api.md):

- A user turn gathers final transcriptions and is flushed when the bot starts
  speaking, the user starts speaking again, or the call ends. Its ``timestamp`` is
  the speech onset, its ``endTimestamp`` the speech end; without speaking frames,
  the first text and the flush moment.
- A bot turn opens at BotStartedSpeaking (or its first text, without speaking
  frames) and closes at BotStoppedSpeaking, an interruption, the next user onset
  or the end of the call. Text after an interruption and before the bot's next
  onset was never heard and is dropped.
- Assistant words are the ones the output transport released (``played``) when the
  call has any; else the TTS text; else, for a call with no TTS at all, the LLM text.
- Spaced chunks (realtime deltas) are concatenated as they are; others get one space.
- Audio offsets count from the recording's sample 0 and exist only if a chunk was
  recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec

from .events import (
    BotSpeech,
    BotText,
    CallClosed,
    CallOpened,
    ChunkRecorded,
    Event,
    Interruption,
    RecordingStarted,
    ToolCall,
    ToolResult,
    UserSpeech,
    UserText,
)
from .wire import CallEnded, CallStarted, ToolCallEntry, ToolEntry, ToolResultEntry, TranscriptEntry

__all__ = [
    "DEFAULT_RECOVERY_REASON",
    "assemble_call_ended",
    "assemble_call_started",
    "iso",
]

DEFAULT_RECOVERY_REASON = "observer-lost"


def iso(at_us: int) -> str:
    """ISO 8601 UTC with microseconds, the shape the reference sends.

    Returns:
        ``at_us`` (microseconds since the epoch) as ``…T10:00:00.123456+00:00``.
    """
    seconds, micros = divmod(at_us, 1_000_000)
    return (
        datetime.fromtimestamp(seconds, UTC)
        .replace(microsecond=micros)
        .isoformat(timespec="microseconds")
    )


def assemble_call_started(call_id: str, events: Sequence[Event]) -> CallStarted:
    """The call-started payload, from the call's CallOpened event.

    Returns:
        The call-started event to send, stamped when the call opened.

    Raises:
        ValueError: the call has no CallOpened event.
    """
    opened = _opened(call_id, events)
    return CallStarted(
        pipecat_call_id=call_id,
        event_timestamp=iso(opened.at),
        agent_id=opened.agent_id,
        agent_name=opened.agent_name,
        agent_prompt=opened.agent_prompt,
    )


def assemble_call_ended(
    call_id: str,
    events: Sequence[Event],
    *,
    reason_if_open: str = DEFAULT_RECOVERY_REASON,
    ended_at: int | None = None,
) -> CallEnded:
    """The call-ended payload.

    A call without a CallClosed event (recovery after a crash) ends with
    ``reason_if_open`` at ``ended_at`` (default: its last event), pending text included.

    Returns:
        The call-ended event to send: times, reason, transcript, tool calls and the
        recording's format when it has chunks.

    Raises:
        ValueError: the call has no CallOpened event.
    """
    opened = _opened(call_id, events)
    closed = next((e for e in events if isinstance(e, CallClosed)), None)
    if closed is not None:
        end_at, reason = closed.at, closed.reason
    else:
        end_at = ended_at if ended_at is not None else max(e.at for e in events)
        reason = reason_if_open

    events = _not_after(events, end_at)
    chunks = [e for e in events if isinstance(e, ChunkRecorded)]
    sample_zero = _sample_zero(events) if chunks else None
    turns = _Turns(events, sample_zero).build(end_at)
    tools = _tool_entries(events, sample_zero)
    return CallEnded(
        pipecat_call_id=call_id,
        event_timestamp=iso(end_at),
        call_started_at=iso(opened.at),
        call_ended_at=iso(end_at),
        call_ended_reason=reason,
        agent_spoke_first=turns[0].role == "assistant" if turns else None,
        recording_sample_rate=chunks[0].sample_rate if chunks else None,
        recording_num_channels=chunks[0].num_channels if chunks else None,
        transcript=turns or None,
        tool_calls=tools or None,
    )


def _not_after(events: Sequence[Event], end_at: int) -> Sequence[Event]:
    """The call's events, none of them later than its end (chunk records aside).

    The observer stores a fact that reached it after the end (a lagging observer, the
    frame pushed before the end) stamped no later than the end, and before it. Versions
    before that stored such facts after the end, stamped when they were observed: their
    words are kept, at the end, so no turn or tool call lies after the call.

    Returns:
        ``events`` itself when none is later than ``end_at``, else a copy with those
        stamped ``end_at``.
    """
    if all(e.at <= end_at or isinstance(e, ChunkRecorded) for e in events):
        return events
    return [
        e
        if e.at <= end_at or isinstance(e, ChunkRecorded)
        else msgspec.structs.replace(e, at=end_at)
        for e in events
    ]


def _opened(call_id: str, events: Sequence[Event]) -> CallOpened:
    for event in events:
        if isinstance(event, CallOpened):
            return event
    raise ValueError(f"call {call_id!r} has no call-open event: nothing to assemble")


def _sample_zero(events: Sequence[Event]) -> int | None:
    return next((e.at for e in events if isinstance(e, RecordingStarted)), None)


def _offset(at: int, sample_zero: int | None) -> int | None:
    if sample_zero is None:
        return None
    return max(0, round((at - sample_zero) / 1000))


def _join(pieces: list[tuple[str, bool]]) -> str:
    out = ""
    for text, spaced in pieces:
        if spaced:
            out += text
        else:
            piece = text.strip()
            if piece:
                out = f"{out} {piece}" if out and not out.endswith(" ") else out + piece
    return out.strip()


@dataclass
class _Turn:
    start: int
    speech_onset: bool
    end: int | None = None
    pieces: list[tuple[str, bool]] = field(default_factory=list)
    user_id: str | None = None
    language: str | None = None


class _Turns:
    """Walks the events once, keeping at most one open user turn and one open bot turn."""

    def __init__(self, events: Sequence[Event], sample_zero: int | None) -> None:
        self.events = events
        self.sample_zero = sample_zero
        self.bot_source = _bot_source(events)
        self.done: list[tuple[str, _Turn]] = []
        self.user: _Turn | None = None
        self.user_onset: int | None = None
        self.user_stop: int | None = None
        self.bot: _Turn | None = None
        self.bot_muted = False  # after an interruption, until the bot's next onset

    def build(self, end_at: int) -> list[TranscriptEntry]:
        for event in self.events:
            if isinstance(event, UserSpeech):
                self._user_speech(event)
            elif isinstance(event, UserText):
                self._user_text(event)
            elif isinstance(event, BotSpeech):
                self._bot_speech(event)
            elif isinstance(event, BotText):
                self._bot_text(event)
            elif isinstance(event, Interruption):
                self._close_bot(event.at)
                self.bot_muted = True
        self._flush_user(end_at)
        self._close_bot(end_at)
        ordered = sorted(enumerate(self.done), key=lambda item: (item[1][1].start, item[0]))
        entries = [self._entry(role, turn) for _, (role, turn) in ordered]
        return [entry for entry in entries if entry.content]

    def _user_speech(self, event: UserSpeech) -> None:
        if event.started:
            self._flush_user(event.at)
            self._close_bot(event.at)
            self.user_onset, self.user_stop = event.at, None
        else:
            self.user_stop = event.at

    def _user_text(self, event: UserText) -> None:
        if self.user is None:
            onset = self.user_onset
            self.user = _Turn(
                start=onset if onset is not None else event.at, speech_onset=onset is not None
            )
        self.user.pieces.append((event.text, False))
        self.user.user_id = event.user_id or self.user.user_id
        self.user.language = event.language or self.user.language

    def _flush_user(self, at: int) -> None:
        turn = self.user
        if turn is not None:
            stop = self.user_stop
            turn.end = stop if stop is not None and stop >= turn.start else at
            self.done.append(("user", turn))
        self.user = None
        self.user_onset = self.user_stop = None

    def _bot_speech(self, event: BotSpeech) -> None:
        if event.started:
            self._flush_user(event.at)
            self.bot_muted = False
            if self.bot is not None and not self.bot.speech_onset:
                self.bot.start, self.bot.speech_onset = event.at, True  # its text came first
            else:
                self._close_bot(event.at)
                self.bot = _Turn(start=event.at, speech_onset=True)
        else:
            self._close_bot(event.at)

    def _bot_text(self, event: BotText) -> None:
        # Muted after an interruption: generated text that never played. Words the output
        # transport released were heard, and it releases the first word of the next turn
        # before it reports the bot speaking again.
        if not _counts(event, self.bot_source) or (self.bot_muted and not event.played):
            return
        if self.bot is None:
            self.bot = _Turn(start=event.at, speech_onset=False)
        self.bot.pieces.append((event.text, event.spaced))

    def _close_bot(self, at: int) -> None:
        turn = self.bot
        if turn is not None:
            turn.end = at
            self.done.append(("assistant", turn))
        self.bot = None

    def _entry(self, role: str, turn: _Turn) -> TranscriptEntry:
        end = turn.end if turn.end is not None else turn.start
        return TranscriptEntry(
            role=role,
            content=_join(turn.pieces),
            timestamp=iso(turn.start),
            audio_offset_ms=_offset(turn.start, self.sample_zero),
            end_timestamp=iso(end),
            end_audio_offset_ms=_offset(end, self.sample_zero),
            user_id=turn.user_id,
            language=turn.language,
        )


def _bot_source(events: Sequence[Event]) -> tuple[str, bool]:
    """Which assistant text counts for this call: played TTS, else TTS, else LLM.

    Returns:
        The source to keep and whether only played text of it counts.
    """
    texts = [e for e in events if isinstance(e, BotText)]
    if any(e.source == "tts" and e.played for e in texts):
        return ("tts", True)
    if any(e.source == "tts" for e in texts):
        return ("tts", False)
    return ("llm", False)


def _counts(event: BotText, source: tuple[str, bool]) -> bool:
    wanted, played_only = source
    return event.source == wanted and (event.played or not played_only)


def _tool_entries(events: Sequence[Event], sample_zero: int | None) -> list[ToolEntry]:
    entries: list[ToolEntry] = []
    calls: set[str] = set()
    results: set[str] = set()
    for event in events:
        if isinstance(event, ToolCall) and event.tool_call_id not in calls:
            calls.add(event.tool_call_id)
            entries.append(
                ToolCallEntry(
                    tool_call_id=event.tool_call_id,
                    name=event.name,
                    arguments=event.arguments,
                    timestamp=iso(event.at),
                    audio_offset_ms=_offset(event.at, sample_zero),
                )
            )
        elif isinstance(event, ToolResult) and event.tool_call_id not in results:
            results.add(event.tool_call_id)
            entries.append(
                ToolResultEntry(
                    tool_call_id=event.tool_call_id,
                    content=event.content,
                    timestamp=iso(event.at),
                    audio_offset_ms=_offset(event.at, sample_zero),
                )
            )
    return entries
