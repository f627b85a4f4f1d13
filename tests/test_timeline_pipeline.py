"""A scripted call through a real pipeline assembles into the expected payloads, in any process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import has_null, stored_events
from pipecat_roark import RoarkObserver
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
from pipecat_roark.testing import Bot, Realtime, ScriptedCall, Tool, User, run_pipeline
from pipecat_roark.timeline import assemble_call_ended, assemble_call_started, iso
from pipecat_roark.wire import CallEnded, encode
from test_capture_pipeline import AGENT

pytestmark = pytest.mark.anyio

TIMING_FIELDS = {"timestamp", "endTimestamp", "audioOffsetMs", "endAudioOffsetMs"}

EXPECTED_TRANSCRIPT = [
    {"role": "assistant", "content": "Hi, how can I help?"},
    {"role": "user", "content": "My order is late.", "userId": "caller", "language": "en-US"},
    {"role": "assistant", "content": "It shipped yesterday"},
    {"role": "user", "content": "Thanks, bye.", "userId": "caller", "language": "en-US"},
    {"role": "assistant", "content": "Goodbye!"},
]
EXPECTED_TOOLS = [
    {
        "kind": "tool_call",
        "toolCallId": "call_1",
        "name": "lookup_order",
        "arguments": '{"id":"42"}',
    },
    {"kind": "tool_result", "toolCallId": "call_1", "content": '{"status":"shipped"}'},
]


def untimed(entries: list[dict[str, object]]) -> list[dict[str, object]]:
    return [{k: v for k, v in e.items() if k not in TIMING_FIELDS} for e in entries]


def assembled(directory: Path, call_id: str) -> tuple[bytes, bytes]:
    events = stored_events(directory, call_id)
    return encode(assemble_call_started(call_id, events)), encode(
        assemble_call_ended(call_id, events)
    )


async def test_the_default_scripted_call_assembles_into_the_expected_call_ended(
    data_dir: Path,
) -> None:
    roark = RoarkObserver(**AGENT, pipecat_call_id="call-1", deliver=False)
    await run_pipeline([ScriptedCall(), roark.audio_processor], observers=[roark])

    started, ended = (json.loads(raw) for raw in assembled(data_dir, "call-1"))
    events = stored_events(data_dir, "call-1")
    opened = next(e for e in events if isinstance(e, CallOpened))
    closed = next(e for e in events if isinstance(e, CallClosed))
    sample_zero = next(e for e in events if isinstance(e, RecordingStarted)).at
    assert started == {
        "event": "call-started",
        "pipecatCallId": "call-1",
        "eventTimestamp": iso(opened.at),
        "agentId": "support-bot",
        "agentName": "Support Bot",
        "agentPrompt": "You are kind.",
    }
    assert {k: v for k, v in ended.items() if k not in ("transcript", "toolCalls")} == {
        "event": "call-ended",
        "pipecatCallId": "call-1",
        "eventTimestamp": iso(closed.at),
        "callStartedAt": iso(opened.at),
        "callEndedAt": iso(closed.at),
        "callEndedReason": "agent-ended",
        "agentSpokeFirst": True,
        "recordingSampleRate": 16000,
        "recordingNumChannels": 2,
    }
    assert untimed(ended["transcript"]) == EXPECTED_TRANSCRIPT
    assert untimed(ended["toolCalls"]) == EXPECTED_TOOLS

    # Each turn starts at its speaking edge, measured from the recording's sample 0.
    starts = [e.at for e in events if isinstance(e, (BotSpeech, UserSpeech)) and e.started]
    assert [t["timestamp"] for t in ended["transcript"]] == [iso(at) for at in starts]
    assert [t["audioOffsetMs"] for t in ended["transcript"]] == [
        max(0, round((at - sample_zero) / 1000)) for at in starts
    ]
    interruption = next(e for e in events if isinstance(e, Interruption))
    assert ended["transcript"][2]["endTimestamp"] == iso(interruption.at)


async def test_realtime_deltas_and_broadcast_tool_calls_assemble_once(data_dir: Path) -> None:
    roark = RoarkObserver(**AGENT, pipecat_call_id="rt", deliver=False)
    script = ScriptedCall(
        [
            Realtime(["Hel", "lo, ", "how can", " I help?"]),
            User("Where is it?"),
            Tool("t9", "track", {"order": 7}, "in transit"),
            Realtime(["It is ", "on its way."]),
        ]
    )
    await run_pipeline([script, roark.audio_processor], observers=[roark])
    _, raw = assembled(data_dir, "rt")
    ended = json.loads(raw)
    assert untimed(ended["transcript"]) == [
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Where is it?", "userId": "caller", "language": "en-US"},
        {"role": "assistant", "content": "It is on its way."},
    ]
    assert untimed(ended["toolCalls"]) == [
        {"kind": "tool_call", "toolCallId": "t9", "name": "track", "arguments": '{"order":7}'},
        {"kind": "tool_result", "toolCallId": "t9", "content": "in transit"},
    ]


async def test_a_second_process_assembles_the_same_payloads_from_the_database(
    data_dir: Path,
) -> None:
    roark = RoarkObserver(**AGENT, pipecat_call_id="call-1", deliver=False)
    await run_pipeline(
        [ScriptedCall([Bot(["Hello."]), User("Hi.")]), roark.audio_processor], observers=[roark]
    )
    here = assembled(data_dir, "call-1")

    code = (
        "import sys; from pathlib import Path\n"
        "from pipecat_roark.store import connect\n"
        "from pipecat_roark.events_table import load_events\n"
        "from pipecat_roark.timeline import assemble_call_started, assemble_call_ended\n"
        "from pipecat_roark.wire import encode\n"
        "conn = connect(Path(sys.argv[1]), read_only=True)\n"
        "events = load_events(conn, 'call-1')\n"
        "sys.stdout.buffer.write(encode(assemble_call_started('call-1', events)) + b'\\n')\n"
        "sys.stdout.buffer.write(encode(assemble_call_ended('call-1', events)) + b'\\n')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(data_dir)], capture_output=True, timeout=60, check=True
    )
    there = tuple(result.stdout.splitlines())
    assert there == here
    assert json.loads(here[1])["transcript"][0]["content"] == "Hello."


# ---- property: any event sequence assembles into a valid contract payload ----

TEXT = st.text(min_size=0, max_size=12)
AT = st.integers(min_value=0, max_value=10_000_000)


def event_strategy() -> st.SearchStrategy[Event]:
    return st.one_of(
        st.builds(UserSpeech, at=AT, started=st.booleans()),
        st.builds(BotSpeech, at=AT, started=st.booleans()),
        st.builds(Interruption, at=AT),
        st.builds(UserText, at=AT, text=TEXT, user_id=st.none() | TEXT, language=st.none() | TEXT),
        st.builds(
            BotText,
            at=AT,
            text=TEXT,
            spaced=st.booleans(),
            source=st.sampled_from(["tts", "llm"]),
            played=st.booleans(),
        ),
        st.builds(ToolCall, at=AT, tool_call_id=TEXT, name=TEXT, arguments=TEXT),
        st.builds(ToolResult, at=AT, tool_call_id=TEXT, name=TEXT, content=TEXT),
        st.builds(RecordingStarted, at=AT),
        st.builds(
            ChunkRecorded,
            at=AT,
            index=st.integers(0, 9),
            size=st.just(4),
            sample_rate=st.just(16000),
            num_channels=st.just(2),
        ),
        st.builds(CallClosed, at=AT, reason=st.sampled_from(["agent-ended", "unknown"])),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(event_strategy(), max_size=40))
def test_any_event_sequence_assembles_into_a_valid_payload(body: list[Event]) -> None:
    events: list[Event] = [CallOpened(at=0, agent_id="a"), *body]
    ended = assemble_call_ended("p", events)
    raw = encode(ended)
    assert msgspec_roundtrip(raw) == ended
    assert not has_null(msgspec.json.decode(raw)), "absent fields are omitted, never null"
    assert ended.transcript is None or all(t.content for t in ended.transcript)
    has_chunks = any(isinstance(e, ChunkRecorded) for e in body)
    for turn in ended.transcript or []:
        assert turn.role in ("user", "assistant")
        assert (turn.audio_offset_ms is not None) == (
            has_chunks and any(isinstance(e, RecordingStarted) for e in body)
        )
        assert turn.audio_offset_ms is None or turn.audio_offset_ms >= 0
    stamps = [t.timestamp for t in ended.transcript or []]
    assert stamps == sorted(stamps)
    assert (ended.agent_spoke_first is None) == (ended.transcript is None)


def msgspec_roundtrip(raw: bytes) -> CallEnded:
    return msgspec.json.decode(raw, type=CallEnded)
