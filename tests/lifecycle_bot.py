"""A bot process for the exit and SIGTERM tests: stays mid-call until it is signalled.

    python lifecycle_bot.py DATA_DIR CALL_ID MODE [CHUNK_BYTES] [SECOND_DIR]

It delivers when ROARK_API_KEY and ROARK_BASE_URL are set. It prints "ready" once the
first two steps of its call are committed. MODE:

- "default": nobody handles SIGTERM but us; the call never ends by itself.
- "record": as "default", but the bot only records (no background drainer of its own
  touches the database: the drain and CLI tests look at the rows it leaves).
- "host": a host with a graceful shutdown of its own, as uvicorn: it installs its SIGTERM
  handler before any observer (prints "host handler" when it runs), lets the running
  call finish its script (ending with reason ``customer-ended-call``), then starts one
  more call (CALL_ID-late, in a worker thread, never ending), prints "late ready" once
  that call's first steps are committed, and exits with status 3 (``sys.exit``).
- "migrate": as "default", and after "ready" it creates a second observer on
  SECOND_DIR (which the test keeps locked, so its migration waits while holding the
  writers' lock); a watcher thread prints "locked" once the writers' lock is taken.
- "runner": Pipecat's ``WorkerRunner(handle_sigterm=True)`` runs a call that never ends
  by itself; the runner cancels it on SIGTERM, then the process exits with status 3.
- "uvicorn": a real uvicorn server on 127.0.0.1 (prints "listening PORT"); each
  ``GET /call`` runs one call (the whole script, reason ``customer-ended-call``) and
  answers when it has ended. On SIGTERM uvicorn finishes the request in flight, then
  restores the default action and re-raises the signal: the process dies without atexit.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from pipecat_roark import RoarkObserver, lifecycle
from pipecat_roark.lifecycle import writer_for
from pipecat_roark.testing import Bot, ScriptedCall, Step, User, run_pipeline

FIRST_STEPS: list[Step] = [Bot(["Hello", "there."]), User("Hi.")]
MORE_STEPS: list[Step] = [
    Bot(["Still", "here?"]),
    User("Yes, one more thing."),
    Bot(["Sure,", "go", "ahead."]),
    User("Bye."),
    Bot(["Goodbye!"]),
]
host_saw_sigterm = False


def host_handler(signum: int, frame: FrameType | None) -> None:
    global host_saw_sigterm
    host_saw_sigterm = True  # like uvicorn: note it; running calls are let finish
    print("host handler", flush=True)


def committed(directory: Path, call_id: str, text: bytes) -> bool:
    with sqlite3.connect(directory / "wal.sqlite") as conn:
        found = conn.execute(
            "SELECT count(*) FROM events WHERE call_id = ? AND instr(body, ?) > 0",
            (call_id, text),
        ).fetchone()[0]
    conn.close()
    return bool(found)


async def call(
    directory: Path,
    call_id: str,
    chunk_bytes: int,
    script: ScriptedCall,
    ready: str,
    on_ready: Callable[[], object] = lambda: None,
    *,
    deliver: bool = True,
) -> None:
    roark = RoarkObserver(
        agent_id="exit-bot",
        pipecat_call_id=call_id,
        data_dir=directory,
        chunk_bytes=chunk_bytes,
        exit_drain_s=30.0,
        deliver=deliver,
    )

    async def report(step: int) -> None:
        # The observer sees frames from a queue of its own, so the caller's "Hi." may still
        # be on its way when this step ends: ready means it is committed.
        if step != 2:
            return
        for _ in range(1000):  # bounded: 10 s
            if await writer_for(directory).flush(10) and committed(directory, call_id, b"Hi."):
                print(ready, flush=True)
                on_ready()
                return
            await asyncio.sleep(0.01)

    script.on_step = report
    await run_pipeline([script, roark.audio_processor], observers=[roark])


def watch_writers_lock() -> None:
    for _ in range(60_000):  # bounded: at most about a minute
        if lifecycle.PROCESS.writers_lock.locked():
            print("locked", flush=True)
            return
        time.sleep(0.001)


async def run_with_sigterm_runner(directory: Path, call_id: str, chunk_bytes: int) -> None:
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.task import PipelineParams

    from pipecat_roark import compat

    roark = RoarkObserver(
        agent_id="exit-bot", pipecat_call_id=call_id, data_dir=directory, chunk_bytes=chunk_bytes
    )

    async def report(step: int) -> None:
        if step == 2 and await writer_for(directory).flush(10):
            print("ready", flush=True)

    script = ScriptedCall(FIRST_STEPS + MORE_STEPS[:1], end="hang", on_step=report)
    worker = compat.PipelineWorker(  # PipelineTask before Pipecat 1.3
        Pipeline([script, roark.audio_processor]),
        params=PipelineParams(audio_in_sample_rate=16000, audio_out_sample_rate=16000),
        observers=[roark],
        idle_timeout_secs=None,
        enable_rtvi=False,
        enable_turn_tracking=False,
    )
    runner = compat.WorkerRunner(handle_sigint=False, handle_sigterm=True)
    await compat.run_worker(runner, worker)


async def serve_calls(directory: Path, call_id: str, chunk_bytes: int) -> None:
    import socket

    import uvicorn

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        script = ScriptedCall(FIRST_STEPS + MORE_STEPS, pace=1.0, end_reason="customer-ended-call")
        await call(directory, call_id, chunk_bytes, script, "ready")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"call ended"})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    # Listening before we say so: a request sent at once waits in the backlog until
    # uvicorn accepts it, instead of being refused (the test then waited for ever).
    sock.listen(16)
    print(f"listening {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, lifespan="off", log_level="warning")
    await uvicorn.Server(config).serve(sockets=[sock])


async def main(directory: Path, call_id: str, mode: str, chunk_bytes: int, second: str) -> None:
    if mode == "runner":
        await run_with_sigterm_runner(directory, call_id, chunk_bytes)
        return
    if mode == "uvicorn":
        await serve_calls(directory, call_id, chunk_bytes)
        return
    if mode == "host":
        signal.signal(signal.SIGTERM, host_handler)
        script = ScriptedCall(FIRST_STEPS + MORE_STEPS, pace=1.0, end_reason="customer-ended-call")
        await call(directory, call_id, chunk_bytes, script, "ready")
        print(f"call ended; host saw SIGTERM: {host_saw_sigterm}", flush=True)
        late = ScriptedCall(FIRST_STEPS + MORE_STEPS, pace=1.0, end="hang")
        late_ready = threading.Event()
        late_call = call(
            directory, f"{call_id}-late", chunk_bytes, late, "late ready", late_ready.set
        )
        threading.Thread(target=asyncio.run, args=(late_call,), daemon=True).start()
        await asyncio.to_thread(late_ready.wait, 60)
        return
    script = ScriptedCall(FIRST_STEPS + MORE_STEPS[:1], end="hang")
    if mode != "migrate":
        await call(directory, call_id, chunk_bytes, script, "ready", deliver=mode != "record")
        return
    ready = asyncio.Event()
    running = asyncio.ensure_future(
        call(directory, call_id, chunk_bytes, script, "ready", ready.set)
    )
    await asyncio.wait_for(ready.wait(), 60)
    threading.Thread(target=watch_writers_lock, daemon=True).start()
    RoarkObserver(agent_id="exit-bot", pipecat_call_id="second", data_dir=second, deliver=False)
    await running


if __name__ == "__main__":
    chunk_bytes = int(sys.argv[4]) if len(sys.argv) > 4 else 256 * 1024
    second = sys.argv[5] if len(sys.argv) > 5 else ""
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], chunk_bytes, second))
    sys.exit(3)
