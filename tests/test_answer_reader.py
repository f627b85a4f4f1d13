"""Who reads the writer child's answers (``answer_reader``): the event loop that submits
records, else a thread, never both at once, never one answer twice, and never a
descriptor closed under a loop that still watches it.

Real pipes, real event loops and a real writer child; the answers are the child's own
9-byte messages (``writer_pipe.MESSAGE``)."""

from __future__ import annotations

import asyncio
import os
import selectors
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipecat_roark.answer_reader import LOOP_READ_BYTES, AnswerReader
from pipecat_roark.events import CallOpened
from pipecat_roark.ops import OpenOp
from pipecat_roark.writer_pipe import COMMITTED, LOG, MESSAGE, RELEASED
from pipecat_roark.writer_process import ProcessWriter

WAIT_S = 20.0
"""A bound on every wait: a reader that never reads fails the test, it does not hang it."""


class Answers:
    """A real pipe whose read end an ``AnswerReader`` reads; what it handled, and where."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self.handled: list[tuple[bytes, int, bytes, str]] = []
        self.ends: list[str] = []
        self.arrived = threading.Condition()
        self.reader = AnswerReader(self.read_fd, self.handle, self.ended, name="test-reader")

    def handle(self, kind: bytes, number: int, line: bytes) -> None:
        with self.arrived:
            self.handled.append((kind, number, line, threading.current_thread().name))
            self.arrived.notify_all()

    def ended(self) -> None:
        with self.arrived:
            self.ends.append(threading.current_thread().name)
            self.arrived.notify_all()

    def send(self, kind: bytes, number: int, line: bytes = b"") -> None:
        os.write(self.write_fd, MESSAGE.pack(kind, len(line) if kind == LOG else number) + line)

    def wait_for(self, count: int) -> list[tuple[bytes, int, bytes, str]]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.handled) >= count, WAIT_S), self.handled
            return list(self.handled)

    async def wait_in_loop(self, count: int) -> list[tuple[bytes, int, bytes, str]]:
        for _ in range(int(WAIT_S / 0.01)):
            if len(self.handled) >= count:
                return list(self.handled)
            await asyncio.sleep(0.01)
        raise AssertionError(f"only {self.handled} arrived")


@pytest.fixture
def answers() -> Iterator[Answers]:
    made = Answers()
    yield made
    made.reader.close()
    os.close(made.write_fd)


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_without_a_loop_the_thread_reads_every_answer_once_even_split_across_writes(
    answers: Answers,
) -> None:
    message = MESSAGE.pack(RELEASED, 7)
    os.write(answers.write_fd, message[:4])  # half a message: nothing yet
    os.write(answers.write_fd, message[4:] + MESSAGE.pack(LOG, 5)[:3])
    os.write(answers.write_fd, MESSAGE.pack(LOG, 5)[3:] + b"INFO\t")
    answers.send(COMMITTED, 3)
    handled = answers.wait_for(3)
    assert [h[:3] for h in handled] == [
        (RELEASED, 7, b""),
        (LOG, 5, b"INFO\t"),
        (COMMITTED, 3, b""),
    ]
    assert {h[3] for h in handled} == {"test-reader"}


def test_a_running_loop_that_attached_reads_the_answers_itself(answers: Answers) -> None:
    async def call() -> list[tuple[bytes, int, bytes, str]]:
        answers.reader.attach(asyncio.get_running_loop())
        await asyncio.sleep(0.1)  # the thread sees the loop reading and stands aside
        for n in range(1, 6):
            answers.send(COMMITTED, n)
            await answers.wait_in_loop(n)
        return list(answers.handled)

    handled = asyncio.run(call())
    assert [h[:2] for h in handled] == [(COMMITTED, n) for n in range(1, 6)]
    # A thread woken for each of them is what this module exists to avoid.
    assert [h[3] for h in handled] == [threading.current_thread().name] * 5


def test_once_the_loop_has_stopped_the_thread_takes_the_answers_over(answers: Answers) -> None:
    async def call() -> None:
        answers.reader.attach(asyncio.get_running_loop())
        answers.send(COMMITTED, 1)
        await answers.wait_in_loop(1)

    asyncio.run(call())  # the loop is closed now; its selector watched the descriptor
    answers.send(RELEASED, 2)
    handled = answers.wait_for(2)
    assert handled[1][:2] == (RELEASED, 2)
    assert handled[1][3] == "test-reader"


def test_a_loop_blocked_in_a_thread_reads_block_still_gets_its_answer(answers: Answers) -> None:
    """``flush_sync`` called from the very loop that reads: it must not wait on itself."""

    async def call() -> bool:
        answers.reader.attach(asyncio.get_running_loop())
        await asyncio.sleep(0.1)
        released = threading.Event()
        original = answers.handle

        def handle(kind: bytes, number: int, line: bytes) -> None:
            original(kind, number, line)
            released.set()

        answers.reader._handle = handle
        with answers.reader.thread_reads():
            answers.send(RELEASED, 9)
            return released.wait(WAIT_S)  # blocks the loop, as flush_sync would

    assert asyncio.run(call()) is True
    assert answers.handled[-1][:2] == (RELEASED, 9)
    assert answers.handled[-1][3] == "test-reader"


def test_the_end_is_told_once_and_the_loop_stops_watching_it(answers: Answers) -> None:
    async def call() -> bool:
        loop = asyncio.get_running_loop()
        answers.reader.attach(loop)
        await asyncio.sleep(0.1)
        os.close(answers.write_fd)
        answers.write_fd = os.open(os.devnull, os.O_WRONLY)  # for the fixture to close
        for _ in range(int(WAIT_S / 0.01)):
            if answers.ends:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # a loop still watching an end calls back at once, forever
        return loop.remove_reader(answers.read_fd)  # True: it was still watched

    assert asyncio.run(call()) is False
    assert answers.reader.done.is_set()
    assert len(answers.ends) == 1


def test_close_from_another_thread_leaves_the_running_loop_to_close_the_descriptor(
    answers: Answers,
) -> None:
    seen: dict[str, bool] = {}

    async def call() -> None:
        loop = asyncio.get_running_loop()
        answers.reader.attach(loop)
        await asyncio.sleep(0.1)
        closer = threading.Thread(target=answers.reader.close)
        closer.start()
        await asyncio.to_thread(closer.join)
        for _ in range(int(WAIT_S / 0.01)):
            if not fd_is_open(answers.read_fd):
                break
            await asyncio.sleep(0.01)
        seen["closed"] = not fd_is_open(answers.read_fd)
        seen["watched"] = loop.remove_reader(answers.read_fd)

    asyncio.run(call())
    assert seen == {"closed": True, "watched": False}


def test_a_second_loop_takes_the_answers_over_from_a_stopped_one(answers: Answers) -> None:
    async def call(n: int) -> None:
        answers.reader.attach(asyncio.get_running_loop())
        await asyncio.sleep(0.1)
        answers.send(COMMITTED, n)
        await answers.wait_in_loop(n)

    asyncio.run(call(1))
    asyncio.run(call(2))
    handled = answers.wait_for(2)
    assert [h[:2] for h in handled] == [(COMMITTED, 1), (COMMITTED, 2)]
    assert [h[3] for h in handled] == [threading.current_thread().name] * 2


def test_a_writer_childs_commit_listeners_run_on_the_loop_that_records(tmp_path: Path) -> None:
    """End to end: a real child's DELIVERIES answer is handled by the recording loop."""
    writer = ProcessWriter(tmp_path, max_spool_bytes=1 << 26, min_free_bytes=0)
    where: list[str] = []
    got = threading.Event()

    def listener() -> None:
        where.append(threading.current_thread().name)
        got.set()

    writer.add_commit_listener(listener)

    async def call() -> None:
        assert await writer.flush(WAIT_S)  # the child is up, the loop reads
        assert await writer.flush(WAIT_S)
        writer.submit(OpenOp("listened", CallOpened(at=1, agent_id="bot"), None))
        assert await writer.flush(WAIT_S)
        for _ in range(int(WAIT_S / 0.01)):
            if got.is_set():
                return
            await asyncio.sleep(0.01)

    try:
        asyncio.run(call())
    finally:
        assert writer.close(WAIT_S)
    assert where and set(where) == {threading.current_thread().name}


def test_flush_sync_from_the_loop_that_reads_the_answers_returns_once_committed(
    tmp_path: Path,
) -> None:
    """The loop that would read the release is the one blocked waiting for it."""
    writer = ProcessWriter(tmp_path, max_spool_bytes=1 << 26, min_free_bytes=0)

    async def call() -> tuple[bool, bool]:
        assert await writer.flush(WAIT_S)  # the child is up, this loop reads its answers
        writer.submit(OpenOp("in-loop-sync", CallOpened(at=1, agent_id="bot"), None))
        return writer.flush_sync(WAIT_S), await writer.flush(WAIT_S)

    try:
        assert asyncio.run(call()) == (True, True)
        writer.submit(OpenOp("after-the-loop", CallOpened(at=2, agent_id="bot"), None))
        assert writer.flush_sync(WAIT_S)  # the loop is gone: the thread reads
    finally:
        assert writer.close(WAIT_S)
    assert writer.fell_back is None


class CountingSelector(selectors.DefaultSelector):
    """A real selector that counts how often it reported one descriptor readable."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.readable = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = super().select(timeout)
        self.readable += sum(1 for key, _ in events if key.fd == self.fd)
        return events


def test_the_loop_neither_spins_nor_waits_while_the_thread_holds_the_answers(
    answers: Answers,
) -> None:
    """A thread reads while a flush_sync of another thread waits; it holds the reading
    lock while it hands an answer on (a slow log sink, a listener). The loop, told the
    descriptor is readable, found the lock taken and returned: level-triggered, it was
    told again at once, tens of thousands of times a second until the thread let go. And
    its next attach waited for that lock."""
    selector = CountingSelector(answers.read_fd)
    handing_on, let_go, handed_on = threading.Event(), threading.Event(), threading.Event()
    original = answers.handle

    def slow_first_answer(kind: bytes, number: int, line: bytes) -> None:
        original(kind, number, line)
        if number == 1:
            handing_on.set()
            let_go.wait(WAIT_S)
            handed_on.set()

    answers.reader._handle = slow_first_answer
    inside, leave = threading.Event(), threading.Event()

    def flush_sync_elsewhere() -> None:
        with answers.reader.thread_reads():
            inside.set()
            leave.wait(WAIT_S)

    waiter = threading.Thread(target=flush_sync_elsewhere)
    waiter.start()
    assert inside.wait(WAIT_S)

    async def call() -> tuple[int, bool]:
        loop = asyncio.get_running_loop()
        answers.reader.attach(loop)
        answers.send(COMMITTED, 1)
        assert handing_on.wait(WAIT_S)  # (blocking this loop: the thread takes answer 1)
        answers.send(COMMITTED, 2)  # readable now, the lock held by the thread
        told = selector.readable
        for _ in range(10):
            await asyncio.sleep(0.01)
        told = selector.readable - told
        answers.reader.attach(loop)  # the next gathering's: it must not wait for the lock
        waited = handed_on.is_set()
        let_go.set()
        leave.set()
        await answers.wait_in_loop(2)
        return told, waited

    try:
        with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(selector)) as runner:
            told, waited = runner.run(call())
    finally:
        let_go.set()
        leave.set()
        waiter.join()
    assert told <= 2, f"the loop was told {told} times of one answer it could not read"
    assert not waited, "attach waited for the thread to hand the answer on"
    assert [h[:2] for h in answers.handled] == [(COMMITTED, 1), (COMMITTED, 2)]


def test_answers_are_read_while_the_loop_that_reads_them_is_blocked(answers: Answers) -> None:
    """The loop that attached is running but stuck in a blocking call (a bot's handler;
    another loop in another thread records on): the thread stood aside for as long as
    that loop ran, so nobody read the answers, and another loop's flush waited on it."""
    attached, unblock = threading.Event(), threading.Event()

    def blocked_loop() -> None:
        async def call() -> None:
            answers.reader.attach(asyncio.get_running_loop())
            await asyncio.sleep(0.1)  # the thread sees the loop reading and stands aside
            attached.set()
            unblock.wait(2 * WAIT_S)  # a blocking call in the loop

        asyncio.run(call())

    stuck = threading.Thread(target=blocked_loop)
    stuck.start()
    try:
        assert attached.wait(WAIT_S)
        answers.send(RELEASED, 1)
        handled = answers.wait_for(1)
    finally:
        unblock.set()
        stuck.join()
    assert handled[0][:2] == (RELEASED, 1)
    assert handled[0][3] == "test-reader"


def test_a_close_left_to_a_loop_that_stops_before_running_it_still_closes_the_descriptor(
    answers: Answers,
) -> None:
    """Closed from another thread while the loop that watches the answers runs, the
    descriptor is left to that loop; a loop in its last turn (stopping: the bot's loop
    ending as its writer child dies) never ran that callback, and the descriptor stayed
    open for good."""
    loop = asyncio.new_event_loop()
    attached, closed_elsewhere = threading.Event(), threading.Event()

    def last_turn() -> None:
        answers.reader.attach(loop)
        attached.set()
        loop.stop()
        assert closed_elsewhere.wait(WAIT_S)  # closed meanwhile: left to this loop

    def close_elsewhere() -> None:
        assert attached.wait(WAIT_S)
        answers.reader.close()
        closed_elsewhere.set()

    closer = threading.Thread(target=close_elsewhere)
    closer.start()
    loop.call_soon(last_turn)
    try:
        loop.run_forever()
    finally:
        closer.join()
        loop.close()
    for _ in range(int(WAIT_S / 0.01)):
        if not fd_is_open(answers.read_fd):
            break
        threading.Event().wait(0.01)
    assert not fd_is_open(answers.read_fd)


def test_a_thread_reads_block_never_waits_for_an_answer_being_handed_on(
    answers: Answers,
) -> None:
    """``flush_sync`` counted itself in under the reading lock, which whoever reads holds
    while handing an answer on: a handler stuck in a write (a log line to a full stderr
    pipe) kept the SIGTERM thread's bounded flush from even starting, and so the
    process from ever leaving."""
    stuck, let_go = threading.Event(), threading.Event()

    def stuck_handler(kind: bytes, number: int, line: bytes) -> None:
        stuck.set()
        let_go.wait(2 * WAIT_S)

    answers.reader._handle = stuck_handler
    answers.send(LOG, 0, b"WARNING\ta line for a full pipe")
    entered = threading.Event()

    def flush_sync_elsewhere() -> None:
        with answers.reader.thread_reads():
            entered.set()

    waiter = threading.Thread(target=flush_sync_elsewhere)
    try:
        assert stuck.wait(WAIT_S)  # the reader's thread holds the lock, stuck
        waiter.start()
        assert entered.wait(WAIT_S), "thread_reads waited for the stuck handler"
    finally:
        let_go.set()
        if waiter.ident is not None:
            waiter.join()


class LoopWithoutReaders(asyncio.SelectorEventLoop):
    """A loop that cannot watch a descriptor (as Windows' proactor loop cannot)."""

    asked = 0

    def add_reader(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        LoopWithoutReaders.asked += 1
        raise NotImplementedError("no add_reader on this loop")


def test_a_loop_that_cannot_watch_the_answers_is_asked_once_and_the_thread_reads(
    answers: Answers,
) -> None:
    """``attach`` runs at every gathering of records: a refusal must not be retried there."""

    async def call() -> None:
        for _ in range(5):
            answers.reader.attach(asyncio.get_running_loop())
        answers.send(COMMITTED, 1)
        await answers.wait_in_loop(1)

    loop = LoopWithoutReaders()
    try:
        loop.run_until_complete(call())
    finally:
        loop.close()
    assert LoopWithoutReaders.asked == 1
    assert answers.handled[0][:2] == (COMMITTED, 1)
    assert answers.handled[0][3] == "test-reader"


FLOODER = """
import os, struct, sys
message = struct.Struct("<cQ")
fd, count = int(sys.argv[1]), int(sys.argv[2])
parts = []
for n in range(1, count + 1):
    if n % 50:
        parts.append(message.pack(b"C", n))
    else:  # a log line now and then, of varying length: reads cut some of them
        line = b"INFO\\t" + str(n).encode() * (n % 97)
        parts.append(message.pack(b"L", len(line)) + line)
data = memoryview(b"".join(parts))
while data:
    data = data[os.write(fd, data):]
"""


def test_a_flooding_child_never_holds_the_loop_for_more_than_one_bounded_read(
    answers: Answers,
) -> None:
    """A child that writes answers faster than the bot reads them (a stuck log loop, a
    bug): the loop's callback read until the pipe was empty, which it never was while
    the child wrote, so the loop ran nothing else for as long as the child flooded. Now
    each callback reads at most ``LOOP_READ_BYTES``, the loop's other callbacks run in
    between, and every answer still arrives once, whole and in order."""
    count = 120_000
    turns = 0
    turn_of_answer: list[int] = []
    loop_thread = threading.current_thread().name
    original = answers.handle

    def counting_handle(kind: bytes, number: int, line: bytes) -> None:
        original(kind, number, line)
        if threading.current_thread().name == loop_thread:
            turn_of_answer.append(turns)

    answers.reader._handle = counting_handle

    async def call() -> None:
        nonlocal turns
        answers.reader.attach(asyncio.get_running_loop())
        await asyncio.sleep(0.1)  # the thread sees the loop reading and stands aside
        flooder = subprocess.Popen(
            [sys.executable, "-c", FLOODER, str(answers.write_fd), str(count)],
            pass_fds=(answers.write_fd,),
        )
        os.close(answers.write_fd)  # the flooder's end only: its exit is the answers' end
        answers.write_fd = os.open(os.devnull, os.O_WRONLY)  # for the fixture to close
        try:
            for _ in range(10_000_000):  # one turn of the loop each
                if answers.ends:
                    break
                turns += 1
                await asyncio.sleep(0)
        finally:
            flooder.kill()
            flooder.wait()

    asyncio.run(call())
    assert answers.ends, "the flood's end was read"
    numbers = [h[1] for h in answers.handled if h[0] == COMMITTED]
    assert numbers == [n for n in range(1, count + 1) if n % 50], "each answer once, in order"
    lines = [h[2] for h in answers.handled if h[0] == LOG]
    assert lines == [b"INFO\t" + str(n).encode() * (n % 97) for n in range(50, count + 1, 50)]
    per_turn = Counter(turn_of_answer)
    most = max(per_turn.values())
    assert most <= LOOP_READ_BYTES // MESSAGE.size, (
        f"one turn of the loop handled {most} answers: it read for as long as the child wrote"
    )
    assert len(per_turn) >= len(turn_of_answer) // (LOOP_READ_BYTES // MESSAGE.size)
