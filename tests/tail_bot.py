"""A delivering bot process for the tail tests: plays a short script, writes the audio it
played to PLAYED (user track, then bot track, as two files), and then either ends the call
(``end``: EndFrame, then the process exits and its exit drain delivers) or hangs until it
is signalled (``hang``: SIGTERM, left to Python's default, the case where nobody else
handles it).

    python tail_bot.py DATA_DIR CALL_ID MODE PLAYED BASE_URL
Prints "ready" once everything played is committed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from pipecat_roark import RoarkObserver
from pipecat_roark.lifecycle import writer_for
from pipecat_roark.testing import ScriptedCall, run_pipeline
from test_tail import CHUNK_BYTES, KEY, tail_script


async def main(directory: Path, call_id: str, mode: str, played: Path, base_url: str) -> None:
    roark = RoarkObserver(
        agent_id="tail-bot",
        api_key=KEY,
        base_url=base_url,
        pipecat_call_id=call_id,
        data_dir=directory,
        chunk_bytes=CHUNK_BYTES,
    )
    script_steps = tail_script()

    async def ready(step: int) -> None:
        if step == len(script_steps):
            played.with_suffix(".user").write_bytes(bytes(script.stats.user_audio))
            played.with_suffix(".bot").write_bytes(bytes(script.stats.bot_audio))
            if await writer_for(directory).flush(10):
                print("ready", flush=True)

    script = ScriptedCall(script_steps, end=mode, on_step=ready)
    await run_pipeline([script, roark.audio_processor], observers=[roark])


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4]), sys.argv[5]))
