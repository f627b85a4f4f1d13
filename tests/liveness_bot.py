"""A bot process for the liveness tests: one call of about ten seconds in real time.

    python liveness_bot.py DATA_DIR CALL_ID END [EXIT_DRAIN_S]

END "end": the call ends after its script with reason ``customer-ended-call``; "hang":
it never ends (the test kills the process). It delivers when ROARK_API_KEY and
ROARK_BASE_URL are set (otherwise a sidecar does). It prints "started" once the call's
first step is committed, and its call's turns as JSON when the pipeline is done.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from pipecat_roark import RoarkObserver
from pipecat_roark.lifecycle import writer_for
from pipecat_roark.testing import Bot, Pause, ScriptedCall, Step, User, run_pipeline

REASON = "customer-ended-call"
SCRIPT: list[Step] = [
    Bot(["Hello,", "thanks", "for", "calling."], ms_per_word=300),
    Pause(800),
    User("I need to change my address.", ms=1500),
    Pause(500),
    Bot(["Sure,", "what", "is", "the", "new", "one?"], ms_per_word=300),
    User("Ten Main Street.", ms=1500),
    Pause(500),
    Bot(["Done.", "Anything", "else?"], ms_per_word=300),
    User("No, bye.", ms=1000),
    Bot(["Goodbye!"], ms_per_word=400),
]
TURNS = [
    "Hello, thanks for calling.",
    "I need to change my address.",
    "Sure, what is the new one?",
    "Ten Main Street.",
    "Done. Anything else?",
    "No, bye.",
    "Goodbye!",
]


async def main(directory: Path, call_id: str, end: str, exit_drain_s: float) -> None:
    roark = RoarkObserver(
        agent_id="liveness-bot",
        pipecat_call_id=call_id,
        data_dir=directory,
        chunk_bytes=32000,
        exit_drain_s=exit_drain_s,
    )

    async def started(step: int) -> None:
        if step == 1 and await writer_for(directory).flush(10):
            print("started", flush=True)

    script = ScriptedCall(SCRIPT, pace=1.0, end=end, end_reason=REASON, on_step=started)
    await run_pipeline([script, roark.audio_processor], observers=[roark])
    print(json.dumps({"steps": script.stats.steps_done}), flush=True)


if __name__ == "__main__":
    drain_s = float(sys.argv[4]) if len(sys.argv) > 4 else 5.0
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], drain_s))
