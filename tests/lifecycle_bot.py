"""A bot process that stays mid-call until it is signalled (for the exit-hook tests).

    python lifecycle_bot.py DATA_DIR CALL_ID MODE [CHUNK_BYTES]
MODE "default": SIGTERM is left to Python's default; "host": the host installs its own
SIGTERM handler first (prints "host handler" and leaves with status 3 at once).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from pipecat_roark import RoarkObserver
from pipecat_roark.testing import Bot, ScriptedCall, User, run_pipeline
from pipecat_roark.writer import writer_for


def host_handler(signum: int, frame: FrameType | None) -> None:
    print("host handler", flush=True)
    os._exit(3)


async def main(directory: Path, call_id: str, mode: str, chunk_bytes: int) -> None:
    if mode == "host":
        signal.signal(signal.SIGTERM, host_handler)
    roark = RoarkObserver(
        agent_id="exit-bot", pipecat_call_id=call_id, data_dir=directory, chunk_bytes=chunk_bytes
    )

    async def ready(step: int) -> None:
        if step == 2 and await writer_for(directory).flush(10):
            print("ready", flush=True)

    script = ScriptedCall(
        [Bot(["Hello", "there."]), User("Hi."), Bot(["Still here?"])], end="hang", on_step=ready
    )
    await run_pipeline([script, roark.audio_processor], observers=[roark])


if __name__ == "__main__":
    chunk_bytes = int(sys.argv[4]) if len(sys.argv) > 4 else 256 * 1024
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], chunk_bytes))
