"""Experiment (issue 12): what framing and writing a mixed call's records costs, alone.

Pickles a mixed call's worth of writer ops (228 events, 13 chunks of 256 KiB) into
frames of N ops and writes them into a 1 MiB pipe to a child that reads and discards,
timing this thread's CPU. No event loop, no other thread: the cost of the work itself,
to hold against what the same work costs inside a bot (scripts/exp_thread_cpu.py).

    uv run python scripts/exp_pipe_cost.py
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time

from pipecat_roark.events import BotSpeech
from pipecat_roark.ops import ChunkOp, EventOp
from pipecat_roark.writer_pipe import encode_frame, write_all

CALLS = 20


def main() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import os\nwhile os.read(0, 1 << 20): pass"],
        stdin=subprocess.PIPE,
    )
    assert child.stdin is not None
    fd = child.stdin.fileno()
    fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
    event = EventOp("call-x", BotSpeech(at=123_456_789, started=True))
    chunk = ChunkOp("call-x", 3, os.urandom(256 * 1024), 16000, 2, 5)
    ops = [event] * 228 + [chunk] * 13
    for per_frame in (1, 3, 10):
        start, seq = time.thread_time(), 0
        for _ in range(CALLS):
            for i in range(0, len(ops), per_frame):
                seq += 1
                write_all(fd, encode_frame(seq, ops[i : i + per_frame]))
        spent = (time.thread_time() - start) / CALLS * 1000
        print(f"{per_frame:>2} ops per frame: {spent:.2f} ms of CPU per call")
    child.stdin.close()
    child.wait()


if __name__ == "__main__":
    main()
