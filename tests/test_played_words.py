"""Assistant text holds only the words the caller heard, decided by a real output transport.

``PlayedOutput`` is a real ``BaseOutputTransport``: Pipecat's media sender releases each
TTS word only once the audio before it was written. Its playback stalls at a known point,
the caller interrupts mid-sentence, and the call-ended transcript must hold exactly the
words the transport released: no fewer, and none of those dropped by the interruption.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from helpers import stored_events
from pipecat_roark import RoarkObserver
from pipecat_roark.events import BotText
from pipecat_roark.testing import (
    SAMPLE_RATE,
    Bot,
    Interrupt,
    PlayedOutput,
    ScriptedCall,
    User,
    run_pipeline,
)
from pipecat_roark.timeline import assemble_call_ended
from pipecat_roark.wire import encode

pytestmark = pytest.mark.anyio

WORDS = ["One,", "two,", "three,", "four,", "five."]
WORD_BYTES = SAMPLE_RATE * 2 * 100 // 1000  # Bot's 100 ms per word, mono s16le


async def test_an_interruption_mid_sentence_keeps_exactly_the_words_that_played(
    data_dir: Path,
) -> None:
    output = PlayedOutput(budget_bytes=2 * WORD_BYTES)  # playback stalls two words in

    async def on_step(step: int) -> None:
        if step == 1:  # the sentence is generated; interrupt once playback is stuck in it
            await asyncio.wait_for(output.stalled.wait(), timeout=60)  # detects a hang only

    roark = RoarkObserver(agent_id="played", pipecat_call_id="played-1", deliver=False)
    script = ScriptedCall(
        [Bot(WORDS), Interrupt(), User("Wait, stop."), Bot(["Okay."])],
        on_step=on_step,
        speaking_edges=False,  # the transport says when the bot speaks, as it plays
    )
    await run_pipeline([script, output, roark.audio_processor], observers=[roark])

    heard, later = output.spoken[:-1], output.spoken[-1]
    assert later == "Okay."
    # The words whose audio had started when playback stalled: two or three, never all.
    assert heard == WORDS[: len(heard)] and 2 <= len(heard) < len(WORDS), output.spoken
    events = stored_events(data_dir, "played-1")
    assert [e.text for e in events if isinstance(e, BotText) and e.played] == output.spoken
    ended = json.loads(encode(assemble_call_ended("played-1", events)))
    assistant = [t["content"] for t in ended["transcript"] if t["role"] == "assistant"]
    assert assistant == [" ".join(heard), "Okay."]
