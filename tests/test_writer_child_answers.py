"""The writer child's answers to the bot (``writer_child._Replies``): few, and the latest.

Every answer, and every wake-up of the thread that sends them, costs CPU on the bot's
machine; the pump sleeps until the next answer is due. Real pipes and a real thread; the
wake-ups are the kernel's own count for that thread (Linux)."""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from pathlib import Path

import pytest

from pipecat_roark import writer_child
from pipecat_roark.writer_pipe import COMMITTED, MESSAGE

WAIT_S = 20.0
"""A bound on every wait: a pump that never answers fails the test, it does not hang it."""

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/<tid>/status")


def wakes(thread: threading.Thread) -> int:
    """How many times ``thread`` went to sleep and was woken (voluntary switches)."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return int(status.split("voluntary_ctxt_switches:")[1].split()[0])


def committed_answers(fd: int, last: int) -> list[int]:
    """Read the child's answers until it says ``last`` is committed (bounded)."""
    said: list[int] = []
    buffer = b""
    deadline = time.monotonic() + WAIT_S
    while not said or said[-1] != last:
        assert time.monotonic() < deadline, f"the pump said only {said}"
        if select.select([fd], [], [], 0.5)[0]:
            buffer += os.read(fd, 4096)
        while len(buffer) >= MESSAGE.size:
            kind, number = MESSAGE.unpack(buffer[: MESSAGE.size])
            buffer = buffer[MESSAGE.size :]
            assert kind == COMMITTED
            said.append(number)
    return said


def test_the_answer_pump_sleeps_until_an_answer_is_due() -> None:
    read_fd, write_fd = os.pipe()
    before = set(threading.enumerate())
    replies = writer_child._Replies(write_fd)
    (pump,) = set(threading.enumerate()) - before
    try:
        # A commit every 5 ms for 0.6 s: the child says what is committed at most every
        # ACK_S (100 ms), the latest only. A pump that looked every 10 ms meanwhile woke
        # about 60 times; one that sleeps until the answer is due, about 7.
        start = wakes(pump)
        for seq in range(1, 121):
            replies.committed(seq)
            time.sleep(0.005)
        said = committed_answers(read_fd, 120)
        woken = wakes(pump) - start
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert said == sorted(set(said)), "each answer newer than the last"
    assert len(said) <= 12, f"at most one answer per ACK_S, not one per commit: {said}"
    assert woken <= 25, f"the pump woke {woken} times in 0.6 s of commits"
