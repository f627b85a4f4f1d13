"""Payload assembly: stored events → the exact call-started / call-ended JSON of roark-api.md."""

from __future__ import annotations

import json

import msgspec
import pytest

from pipecat_roark.events import (
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
from pipecat_roark.timeline import assemble_call_ended, assemble_call_started, iso
from pipecat_roark.wire import encode

T0 = 1_779_962_400_000_000  # 2026-05-28T10:00:00+00:00 in µs


def ms(n: int) -> int:
    return T0 + n * 1000


def payload(events: list[Event], **kwargs: object) -> dict[str, object]:
    decoded: dict[str, object] = json.loads(encode(assemble_call_ended("c1", events, **kwargs)))  # type: ignore[arg-type]
    return decoded


OPEN = CallOpened(
    at=ms(0), agent_id="support-bot", agent_name="Support Bot", agent_prompt="Be kind."
)


def test_iso_has_microseconds_and_utc_offset() -> None:
    assert iso(T0) == "2026-05-28T10:00:00.000000+00:00"
    assert iso(T0 + 123_456) == "2026-05-28T10:00:00.123456+00:00"


def test_call_started_is_the_contract_json_and_omits_unset_fields() -> None:
    assert encode(assemble_call_started("c1", [OPEN])) == (
        b'{"event":"call-started","pipecatCallId":"c1",'
        b'"eventTimestamp":"2026-05-28T10:00:00.000000+00:00","agentId":"support-bot",'
        b'"agentName":"Support Bot","agentPrompt":"Be kind."}'
    )
    bare = CallOpened(at=ms(5), agent_id="a")
    assert json.loads(encode(assemble_call_started("c2", [bare]))) == {
        "event": "call-started",
        "pipecatCallId": "c2",
        "eventTimestamp": "2026-05-28T10:00:00.005000+00:00",
        "agentId": "a",
    }


def test_a_call_without_an_open_event_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="call 'c1' has no call-open event"):
        assemble_call_ended("c1", [UserText(at=ms(1), text="hi")])


FULL_CALL: list[Event] = [
    OPEN,
    RecordingStarted(at=ms(100)),
    BotSpeech(at=ms(100), started=True),
    *[BotText(at=ms(150 + i), text=w) for i, w in enumerate(["Hi,", "how", "can", "I", "help?"])],
    ChunkRecorded(at=ms(1000), index=0, size=64000, sample_rate=16000, num_channels=2),
    BotSpeech(at=ms(1900), started=False),
    UserSpeech(at=ms(2400), started=True),
    UserSpeech(at=ms(4000), started=False),
    UserText(at=ms(4100), text="My order", user_id="caller", language="en-US"),
    UserText(at=ms(4200), text="is late.", user_id="caller", language="en-US"),
    ToolCall(at=ms(4300), tool_call_id="call_1", name="lookup_order", arguments='{"id":"42"}'),
    ToolCall(at=ms(4301), tool_call_id="call_1", name="lookup_order", arguments='{"id":"42"}'),
    ToolResult(
        at=ms(4800), tool_call_id="call_1", name="lookup_order", content='{"status":"shipped"}'
    ),
    BotSpeech(at=ms(5000), started=True),
    *[BotText(at=ms(5100 + i), text=w) for i, w in enumerate(["It", "shipped", "yesterday"])],
    Interruption(at=ms(5600)),
    BotText(at=ms(5610), text="and"),  # after the cut: never heard
    UserSpeech(at=ms(5650), started=True),
    UserSpeech(at=ms(6500), started=False),
    UserText(at=ms(6600), text="Thanks, bye.", user_id="caller", language="en-US"),
    BotSpeech(at=ms(7000), started=True),
    BotText(at=ms(7050), text="Goodbye!"),
    ChunkRecorded(at=ms(8000), index=1, size=1000, sample_rate=16000, num_channels=2),
    BotSpeech(at=ms(7900), started=False),
    CallClosed(at=ms(8100), reason="agent-ended"),
]


def stamp(n: int) -> str:
    return iso(ms(n))


def test_a_full_call_assembles_into_the_exact_contract_payload() -> None:
    assert payload(FULL_CALL) == {
        "event": "call-ended",
        "pipecatCallId": "c1",
        "eventTimestamp": stamp(8100),
        "callStartedAt": stamp(0),
        "callEndedAt": stamp(8100),
        "callEndedReason": "agent-ended",
        "agentSpokeFirst": True,
        "recordingSampleRate": 16000,
        "recordingNumChannels": 2,
        "transcript": [
            {
                "role": "assistant",
                "content": "Hi, how can I help?",
                "timestamp": stamp(100),
                "audioOffsetMs": 0,
                "endTimestamp": stamp(1900),
                "endAudioOffsetMs": 1800,
            },
            {
                "role": "user",
                "content": "My order is late.",
                "timestamp": stamp(2400),
                "audioOffsetMs": 2300,
                "endTimestamp": stamp(4000),
                "endAudioOffsetMs": 3900,
                "userId": "caller",
                "language": "en-US",
            },
            {
                "role": "assistant",
                "content": "It shipped yesterday",
                "timestamp": stamp(5000),
                "audioOffsetMs": 4900,
                "endTimestamp": stamp(5600),
                "endAudioOffsetMs": 5500,
            },
            {
                "role": "user",
                "content": "Thanks, bye.",
                "timestamp": stamp(5650),
                "audioOffsetMs": 5550,
                "endTimestamp": stamp(6500),
                "endAudioOffsetMs": 6400,
                "userId": "caller",
                "language": "en-US",
            },
            {
                "role": "assistant",
                "content": "Goodbye!",
                "timestamp": stamp(7000),
                "audioOffsetMs": 6900,
                "endTimestamp": stamp(7900),
                "endAudioOffsetMs": 7800,
            },
        ],
        "toolCalls": [
            {
                "kind": "tool_call",
                "toolCallId": "call_1",
                "name": "lookup_order",
                "arguments": '{"id":"42"}',
                "timestamp": stamp(4300),
                "audioOffsetMs": 4200,
            },
            {
                "kind": "tool_result",
                "toolCallId": "call_1",
                "content": '{"status":"shipped"}',
                "timestamp": stamp(4800),
                "audioOffsetMs": 4700,
            },
        ],
    }


def test_without_a_recorded_chunk_there_are_no_offsets_and_no_recording_fields() -> None:
    events = [e for e in FULL_CALL if not isinstance(e, ChunkRecorded)]
    out = payload(events)
    assert "recordingSampleRate" not in out and "recordingNumChannels" not in out
    for entry in [*out["transcript"], *out["toolCalls"]]:  # type: ignore[misc]
        assert "audioOffsetMs" not in entry and "endAudioOffsetMs" not in entry


def test_realtime_deltas_are_joined_verbatim_and_other_chunks_with_one_space() -> None:
    events: list[Event] = [
        OPEN,
        BotSpeech(at=ms(10), started=True),
        BotText(at=ms(11), text="Hel", spaced=True),
        BotText(at=ms(12), text="lo ", spaced=True),
        BotText(at=ms(13), text="there.", spaced=True),
        BotSpeech(at=ms(20), started=False),
        UserText(at=ms(30), text="  ok  "),
        UserText(at=ms(31), text="then"),
        BotSpeech(at=ms(40), started=True),
        BotText(at=ms(41), text="Right"),
        BotText(at=ms(42), text=" now.", spaced=True),
        BotSpeech(at=ms(50), started=False),
    ]
    contents = [t["content"] for t in payload(events)["transcript"]]  # type: ignore[union-attr]
    assert contents == ["Hello there.", "ok then", "Right now."]


def test_played_words_win_and_an_interruption_keeps_only_what_played() -> None:
    events: list[Event] = [
        OPEN,
        # The TTS service emits the whole sentence at once; the transport plays two words.
        *[BotText(at=ms(5 + i), text=w) for i, w in enumerate(["One", "two", "three", "four"])],
        BotSpeech(at=ms(10), started=True),
        BotText(at=ms(11), text="One", played=True),
        BotText(at=ms(12), text="two", played=True),
        Interruption(at=ms(13)),
        UserText(at=ms(20), text="Stop."),
    ]
    out = payload(events, reason_if_open="client-disconnected")
    assert [(t["role"], t["content"]) for t in out["transcript"]] == [  # type: ignore[union-attr]
        ("assistant", "One two"),
        ("user", "Stop."),
    ]
    assert out["callEndedReason"] == "client-disconnected"


def test_llm_text_counts_only_when_the_call_has_no_tts_text() -> None:
    events: list[Event] = [
        OPEN,
        BotText(at=ms(1), text="Hi ", spaced=True, source="llm"),
        BotText(at=ms(2), text="there", spaced=True, source="llm"),
    ]
    assert payload(events)["transcript"] == [
        {
            "role": "assistant",
            "content": "Hi there",
            "timestamp": stamp(1),
            "endTimestamp": stamp(2),
        }
    ]
    with_tts = [*events, BotText(at=ms(3), text="Hello.")]
    assert [t["content"] for t in payload(with_tts)["transcript"]] == ["Hello."]  # type: ignore[union-attr]


def test_without_speaking_frames_turns_fall_back_to_text_and_flush_times() -> None:
    events: list[Event] = [
        OPEN,
        UserText(at=ms(10), text="Hello?"),
        UserText(at=ms(12), text="Anyone?"),
        BotText(at=ms(30), text="Yes."),
        CallClosed(at=ms(40), reason="agent-ended"),
    ]
    out = payload(events)
    assert out["agentSpokeFirst"] is False
    assert out["transcript"] == [
        {
            "role": "user",
            "content": "Hello? Anyone?",
            "timestamp": stamp(10),
            "endTimestamp": stamp(40),
        },
        {"role": "assistant", "content": "Yes.", "timestamp": stamp(30), "endTimestamp": stamp(40)},
    ]


def test_the_bot_speaking_after_its_text_keeps_one_turn_starting_at_speech() -> None:
    events: list[Event] = [
        OPEN,
        BotText(at=ms(5), text="Hi!"),
        BotSpeech(at=ms(8), started=True),
        BotSpeech(at=ms(20), started=False),
    ]
    assert payload(events)["transcript"] == [
        {"role": "assistant", "content": "Hi!", "timestamp": stamp(8), "endTimestamp": stamp(20)}
    ]


def test_a_call_cut_off_mid_turn_is_finalized_with_its_pending_text() -> None:
    events: list[Event] = [
        OPEN,
        BotSpeech(at=ms(10), started=True),
        BotText(at=ms(11), text="Your order"),
        BotText(at=ms(12), text="is"),
    ]
    out = payload(events)
    assert out["callEndedReason"] == "observer-lost"
    assert out["callEndedAt"] == stamp(12)
    assert out["transcript"] == [
        {
            "role": "assistant",
            "content": "Your order is",
            "timestamp": stamp(10),
            "endTimestamp": stamp(12),
        }
    ]
    later = payload(events, reason_if_open="process-exit", ended_at=ms(99))
    assert (later["callEndedReason"], later["callEndedAt"]) == ("process-exit", stamp(99))

    pending_user: list[Event] = [
        OPEN,
        UserSpeech(at=ms(3), started=True),
        UserText(at=ms(4), text="Hi"),
    ]
    assert payload(pending_user)["transcript"] == [
        {"role": "user", "content": "Hi", "timestamp": stamp(3), "endTimestamp": stamp(4)}
    ]


def test_a_silent_call_omits_transcript_tools_and_agent_spoke_first() -> None:
    out = payload(
        [OPEN, UserSpeech(at=ms(1), started=True), CallClosed(at=ms(2), reason="unknown")]
    )
    assert out == {
        "event": "call-ended",
        "pipecatCallId": "c1",
        "eventTimestamp": stamp(2),
        "callStartedAt": stamp(0),
        "callEndedAt": stamp(2),
        "callEndedReason": "unknown",
    }


def test_the_payload_decodes_as_the_contract_struct() -> None:
    from pipecat_roark.wire import CallEnded

    raw = encode(assemble_call_ended("c1", FULL_CALL))
    assert msgspec.json.decode(raw, type=CallEnded) == assemble_call_ended("c1", FULL_CALL)
    assert b"null" not in raw
