"""A bot process that records with ``delivery_process=True`` and waits to be killed.

    python delivery_process_bot.py DATA_DIR CALL_ID [shutdown | fork-shutdown]

Key and base URL come from ROARK_API_KEY and ROARK_BASE_URL. It plays a short call to
its end, waits until the writer committed it, then prints one JSON line
``{"child": PID}`` (its delivery child) and sleeps until it is killed. With "shutdown"
it runs ``lifecycle.shut_down()`` before printing, as its exit would, and lives on.
With "fork-shutdown" it first forks (``os.fork``): the fork lives as long as the bot,
and the line names it too (``"fork"``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

from pipecat_roark import RoarkObserver, config, lifecycle
from pipecat_roark.lifecycle import writer_for
from pipecat_roark.testing import Bot, ScriptedCall, Tool, User, run_pipeline


async def main(directory: Path, call_id: str, mode: str | None) -> None:
    roark = RoarkObserver(
        agent_id="delivery-process-bot",
        pipecat_call_id=call_id,
        data_dir=directory,
        chunk_bytes=8000,
        delivery_process=True,
    )
    script = [
        Bot(["Hello", "there."]),
        User("Where is my order?", ms=600),
        Tool("t1", "lookup", {"order": 7}, {"status": "shipped"}),
        Bot(["It", "shipped."]),
    ]
    await run_pipeline([ScriptedCall(script), roark.audio_processor], observers=[roark])  # type: ignore[arg-type]
    assert writer_for(directory).flush_sync(30), "the call was committed"
    key = (config.registry_key(directory), config.key_fingerprint(config.resolve_api_key()))
    child = lifecycle.PROCESS.delivery_processes[key]
    for _ in range(600):  # bounded: the child is spawned in a thread
        if getattr(child, "pid", None) is not None:
            break
        time.sleep(0.05)
    fork = None
    if mode == "fork-shutdown":
        hold_read, hold_write = os.pipe()
        fork = os.fork()
        if fork == 0:  # lives until the bot is gone (its write end closes)
            os.close(hold_write)
            os.read(hold_read, 1)
            os._exit(0)
        os.close(hold_read)
    if mode is not None:
        await asyncio.to_thread(lifecycle.shut_down)
    print(json.dumps({"child": getattr(child, "pid", None), "fork": fork}), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3] if sys.argv[3:] else None))
