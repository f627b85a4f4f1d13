"""A bot process that records with ``writer_process=True`` and is killed mid-call.

    python writer_process_bot.py DATA_DIR CALL_ID [delivery-process]

Key from ROARK_API_KEY; nothing is delivered from here (``deliver=False``): a later
``pipecat-roark drain`` does it. With ``delivery-process``, its delivery child
(``delivery_process=True``, to ROARK_BASE_URL) delivers instead. It prints one JSON line
``{"child": PID, "bot": PID}`` once its writer child has committed a first record, then
plays a call that never ends. After each step it reports one JSON line
``{"step", "flushed", "chunks", "delivery"}``: ``chunks`` is the sha256 of every chunk
the AudioBufferProcessor handed to the recorder before the report, ``flushed`` says
whether the writer child acknowledged all of them as committed first, and ``delivery``
is the delivery child's pid once it started, else null. Then it waits for one line on stdin: ``go`` (flush after the next
step too) or ``noflush`` (from now on, report without waiting for the child: the
parent stopped it, so what the bot hands over stays in the pipe).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from pathlib import Path

from pipecat_roark import RoarkObserver, lifecycle
from pipecat_roark.testing import Bot, Pause, ScriptedCall, Step, Tool, User, run_pipeline
from pipecat_roark.writer_process import ProcessWriter

FLUSH_S = 30.0


def script() -> list[Step]:
    """Twelve steps, each with audio: several 8000-byte chunks per step after the first."""
    return [
        Bot(["Hello,", "this", "is", "support."]),
        User("My parcel never came.", ms=600),
        Tool("t1", "lookup", {"order": 7}, {"status": "lost"}),
        Bot(["Sorry,", "let", "me", "check."]),
        Pause(300),
        User("It was a birthday present.", ms=800),
        Bot(["I", "will", "send", "another", "today."]),
        User("Thank you.", ms=400),
        Tool("t2", "reship", {"order": 7}, {"ok": True}),
        Bot(["Done,", "it", "ships", "tonight."]),
        User("Great.", ms=600),
        Bot(["Anything", "else?"]),
    ]


def say(line: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def delivery_child() -> int | None:
    """The pid of this process's delivery child, once a call started it."""
    for child in lifecycle.PROCESS.delivery_processes.values():
        pid = getattr(child, "pid", None)
        if pid is not None:
            return int(pid)
    return None


async def main(directory: Path, call_id: str, delivery: bool) -> None:
    roark = RoarkObserver(
        agent_id="writer-process-bot",
        pipecat_call_id=call_id,
        data_dir=directory,
        deliver=delivery,
        delivery_process=delivery,
        chunk_bytes=8000,
        writer_process=True,
    )
    writer = lifecycle.running_writer(directory)
    assert isinstance(writer, ProcessWriter), writer
    assert await writer.flush(FLUSH_S), "the writer child started and answers"
    say({"child": writer.child_pid, "bot": os.getpid()})

    handed: list[str] = []
    flushing = True

    @roark.audio_processor.event_handler("on_audio_data")
    async def tap(processor: object, audio: bytes, sample_rate: int, num_channels: int) -> None:
        handed.append(hashlib.sha256(audio).hexdigest())

    async def report(step: int) -> None:
        nonlocal flushing
        before = list(handed)  # what a flush started now vouches for
        flushed = flushing and await writer.flush(FLUSH_S)
        say({"step": step, "flushed": flushed, "chunks": before, "delivery": delivery_child()})
        if flushing:
            command = await asyncio.to_thread(sys.stdin.readline)
            flushing = command.strip() != "noflush"

    call = ScriptedCall(script(), end="hang", on_step=report)
    await run_pipeline([call, roark.audio_processor], observers=[roark])  # type: ignore[arg-type]


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:] == ["delivery-process"]))
