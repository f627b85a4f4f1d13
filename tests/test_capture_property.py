"""Property: whatever frames a pipeline carries (odd text, non-JSON tool payloads, missing
attributes, speaking edges in any order, odd-sized audio), RoarkObserver never raises
into the pipeline, the call is finalized, and its call-ended payload fits the contract."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    Frame,
    FunctionCallInProgressFrame,
    FunctionCallResultFrame,
    InputAudioRawFrame,
    InterruptionFrame,
    LLMTextFrame,
    OutputAudioRawFrame,
    TranscriptionFrame,
    TTSTextFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)

from helpers import has_null, stored_events
from pipecat_roark import RoarkObserver
from pipecat_roark.lifecycle import close_all_writers
from pipecat_roark.testing import run_pipeline
from pipecat_roark.timeline import assemble_call_ended, assemble_call_started
from pipecat_roark.wire import CallEnded, CallStarted, encode
from test_capture_bad_input import GarbageSource

TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=3),
    st.integers(),
    st.none(),
    st.just("x" * 20_000),
)
PAYLOAD = st.one_of(
    st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
    st.builds(object),
    st.sets(st.integers(), max_size=3),
    st.binary(max_size=8),
    st.floats(),
    st.none(),
)


def _tts(text: Any) -> Frame:
    return TTSTextFrame(text=text, text_type="word")


def _drop(frame: Frame, attribute: str) -> Frame:
    with contextlib.suppress(AttributeError):
        delattr(frame, attribute)
    return frame


FRAME = st.one_of(
    st.builds(lambda t: TranscriptionFrame(text=t, user_id="u", timestamp=""), TEXT),
    st.builds(
        lambda t: _drop(TranscriptionFrame(text="t", user_id="u", timestamp=""), t),
        st.sampled_from(["language", "user_id", "text"]),
    ),
    st.builds(_tts, TEXT),
    st.builds(lambda t: LLMTextFrame(text=t), TEXT),
    st.builds(
        lambda name, call_id, args: FunctionCallInProgressFrame(
            function_name=name, tool_call_id=call_id, arguments=args
        ),
        TEXT,
        st.sampled_from(["a", "b", 7, None]),
        PAYLOAD,
    ),
    st.builds(
        lambda call_id, result: FunctionCallResultFrame(
            function_name="f", tool_call_id=call_id, arguments={}, result=result
        ),
        st.sampled_from(["a", "b", 7, None]),
        PAYLOAD,
    ),
    st.sampled_from(
        [
            UserStartedSpeakingFrame,
            UserStoppedSpeakingFrame,
            BotStartedSpeakingFrame,
            BotStoppedSpeakingFrame,
            InterruptionFrame,
        ]
    ).map(lambda cls: cls()),
    st.builds(
        lambda n: InputAudioRawFrame(audio=b"\x01" * n, sample_rate=16000, num_channels=1),
        st.integers(0, 641),
    ),
    st.builds(
        lambda n: OutputAudioRawFrame(audio=b"\x02" * n, sample_rate=16000, num_channels=1),
        st.integers(0, 641),
    ),
)


def assert_finalized(directory: Path, call_id: str) -> None:
    """Ended, with its call-ended row queued after every chunk row (the tail included)."""
    conn = sqlite3.connect(directory / "wal.sqlite")
    try:
        assert conn.execute("SELECT state FROM calls WHERE id = ?", (call_id,)).fetchone() == (
            "ended",
        )
        kinds = [
            k
            for (k,) in conn.execute(
                "SELECT kind FROM deliveries WHERE call_id = ? ORDER BY id", (call_id,)
            )
        ]
    finally:
        conn.close()
    assert kinds[0] == "call-started" and kinds[-1] == "call-ended"
    assert set(kinds[1:-1]) <= {"chunk"}


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames=st.lists(FRAME, max_size=25))
def test_any_frames_never_raise_and_assemble_a_valid_payload(
    frames: list[Frame], tmp_path_factory: pytest.TempPathFactory
) -> None:
    directory = tmp_path_factory.mktemp("prop")
    roark = RoarkObserver(agent_id="prop", pipecat_call_id="p", data_dir=directory, deliver=False)
    asyncio.run(run_pipeline([GarbageSource(frames), roark.audio_processor], observers=[roark]))
    close_all_writers()
    events = stored_events(Path(directory), "p")
    assert_finalized(Path(directory), "p")
    started = json.loads(encode(assemble_call_started("p", events)))
    ended_raw = encode(assemble_call_ended("p", events))
    msgspec.json.decode(encode(assemble_call_started("p", events)), type=CallStarted)
    ended = msgspec.json.decode(ended_raw, type=CallEnded)
    assert started["pipecatCallId"] == ended.pipecat_call_id == "p"
    assert not has_null(json.loads(ended_raw)), "absent fields are omitted, never null"
    for turn in ended.transcript or []:
        assert turn.content and turn.role in ("user", "assistant")
        turn.content.encode("utf-8")  # storable and sendable: no lone surrogates
    for tool in ended.tool_calls or []:
        assert isinstance(tool.tool_call_id, str)


@pytest.mark.anyio
async def test_a_partial_sample_frame_is_passed_on_unrecorded_and_warned_once(
    data_dir: Path, logs: Any
) -> None:
    whole = OutputAudioRawFrame(audio=b"\x02\x00" * 320, sample_rate=16000, num_channels=1)
    partial = [
        InputAudioRawFrame(audio=b"\x01" * 605, sample_rate=16000, num_channels=1),
        OutputAudioRawFrame(audio=b"\x01" * 3, sample_rate=16000, num_channels=1),
    ]
    roark = RoarkObserver(agent_id="odd", pipecat_call_id="odd", deliver=False, chunk_bytes=640)
    frames: list[Frame] = [
        BotStartedSpeakingFrame(),
        whole,
        *partial,
        whole,
        BotStoppedSpeakingFrame(),
    ]
    await run_pipeline([GarbageSource(frames), roark.audio_processor], observers=[roark])
    close_all_writers()
    assert_finalized(data_dir, "odd")
    assert [type(e).__name__ for e in stored_events(data_dir, "odd")].count("ChunkRecorded") == 2
    assert len(logs.matching("is not whole 16-bit samples")) == 1
