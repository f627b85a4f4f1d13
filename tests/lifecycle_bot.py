"""A bot process that stays mid-call until it is signalled (for the exit-hook tests).

    python lifecycle_bot.py DATA_DIR CALL_ID MODE [CHUNK_BYTES]
MODE "default": SIGTERM is left to Python's default; "host": the host installs its own
SIGTERM handler first (prints "host handler" and leaves with status 3 at once); "record":
as "default", but the bot only records (no background drainer touches the database).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from pathlib import Path
from types import FrameType

from pipecat_roark import RoarkObserver
from pipecat_roark.testing import Bot, ScriptedCall, User, run_pipeline
from pipecat_roark.writer import writer_for


def host_handler(signum: int, frame: FrameType | None) -> None:
    print("host handler", flush=True)
    os._exit(3)


def committed(directory: Path, call_id: str, text: bytes) -> bool:
    with sqlite3.connect(directory / "wal.sqlite") as conn:
        found = conn.execute(
            "SELECT count(*) FROM events WHERE call_id = ? AND instr(body, ?) > 0",
            (call_id, text),
        ).fetchone()[0]
    conn.close()
    return bool(found)


async def main(directory: Path, call_id: str, mode: str, chunk_bytes: int) -> None:
    if mode == "host":
        signal.signal(signal.SIGTERM, host_handler)
    roark = RoarkObserver(
        agent_id="exit-bot",
        pipecat_call_id=call_id,
        data_dir=directory,
        chunk_bytes=chunk_bytes,
        deliver=mode != "record",
    )

    async def ready(step: int) -> None:
        # The observer sees frames from a queue of its own, so the caller's "Hi." may still
        # be on its way when this step ends: ready means it is committed.
        if step != 2:
            return
        for _ in range(1000):  # bounded: 10 s
            if await writer_for(directory).flush(10) and committed(directory, call_id, b"Hi."):
                print("ready", flush=True)
                return
            await asyncio.sleep(0.01)

    script = ScriptedCall(
        [Bot(["Hello", "there."]), User("Hi."), Bot(["Still here?"])], end="hang", on_step=ready
    )
    await run_pipeline([script, roark.audio_processor], observers=[roark])


if __name__ == "__main__":
    chunk_bytes = int(sys.argv[4]) if len(sys.argv) > 4 else 256 * 1024
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], chunk_bytes))
