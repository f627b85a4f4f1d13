"""A bot process for crash tests: plays a seeded scripted call that never ends.

After every step it waits until everything observed so far is committed, then reports
on stdout (one JSON line) what it saw committed: the number of the call's events and a
digest of their bodies, and the sha256 of every chunk the AudioBufferProcessor emitted.
The parent kills it with SIGKILL at a point of its choosing and checks the database
against the last report.

    python capture_bot.py DATA_DIR CALL_ID SEED [END BASE_URL]

END is how the call ends ("hang", the default: never; "end": an EndFrame). With
BASE_URL the bot also delivers (its background drainer, key KEY) as a real bot does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sqlite3
import sys
from pathlib import Path

from pipecat_roark import RoarkObserver
from pipecat_roark.lifecycle import writer_for
from pipecat_roark.testing import Bot, Pause, ScriptedCall, Step, Tool, User, run_pipeline

KEY = "rk_crash_key"
WORDS = ["order", "late", "shipped", "refund", "address", "tomorrow", "sorry", "thanks"]


def seeded_script(seed: int, steps: int = 12) -> list[Step]:
    rng = random.Random(seed)
    script: list[Step] = []
    for i in range(steps):
        kind = rng.choice(["user", "bot", "bot", "tool", "pause"])
        words = rng.sample(WORDS, rng.randint(1, 4))
        if kind == "user":
            script.append(User(" ".join(words), ms=rng.choice([200, 400, 800])))
        elif kind == "bot":
            script.append(Bot(words, interrupt_after=rng.choice([None, None, 1])))
        elif kind == "tool":
            script.append(Tool(f"t{i}", "lookup", {"n": i}, {"ok": i}))
        else:
            script.append(Pause(rng.choice([100, 600])))
    return script


def committed(directory: Path, call_id: str) -> tuple[int, str]:
    with sqlite3.connect(f"file:{directory / 'wal.sqlite'}?mode=ro", uri=True) as conn:
        bodies = [
            b
            for (b,) in conn.execute(
                "SELECT body FROM events WHERE call_id = ? ORDER BY id", (call_id,)
            )
        ]
    conn.close()
    return len(bodies), hashlib.sha256(b"".join(bodies)).hexdigest()


async def main(
    directory: Path, call_id: str, seed: int, end: str = "hang", base_url: str | None = None
) -> None:
    roark = RoarkObserver(
        agent_id="crash-bot",
        pipecat_call_id=call_id,
        data_dir=directory,
        api_key=KEY if base_url else None,
        base_url=base_url,
        deliver=base_url is not None,
        chunk_bytes=8000,
    )
    emitted: list[str] = []

    @roark.audio_processor.event_handler("on_audio_data")
    async def tap(processor: object, audio: bytes, sample_rate: int, num_channels: int) -> None:
        emitted.append(hashlib.sha256(audio).hexdigest())

    async def report(step: int) -> None:
        # What was emitted before the barrier is what the flush vouches for: audio can
        # keep arriving while we wait for it.
        before = list(emitted)
        if not await writer_for(directory).flush(10):
            return
        count, digest = committed(directory, call_id)
        line = {"step": step, "events": count, "digest": digest, "emitted": before}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()

    script = ScriptedCall(seeded_script(seed), end=end, on_step=report)
    await run_pipeline([script, roark.audio_processor], observers=[roark])


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), *sys.argv[4:6]))
