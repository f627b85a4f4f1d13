"""Faults of the writer child (``writer_process``): each test is a defect found in review.

Real parts only: a real ``ProcessWriter`` starting a real ``python -m
pipecat_roark.writer_child``, real SQLite files, real SIGKILLs. A child is made to die at
an exact moment with ``PIPECAT_ROARK_CRASH_AT`` in the environment it inherits (this
process read its own crash point at import, so only the child is armed).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import LogCapture, stored_events
from pipecat_roark.events import CallOpened, UserText
from pipecat_roark.ops import ChunkOp, EventOp, FinalizeOp, OpenOp
from pipecat_roark.store import now_us
from pipecat_roark.writer_process import ProcessWriter

CLOSE_S = 60.0
"""Generous: these are not speed tests; a close that cannot finish fails them otherwise."""


def process_writer(directory: Path) -> ProcessWriter:
    return ProcessWriter(directory, max_spool_bytes=1 << 30, min_free_bytes=0)


def open_op(call_id: str) -> OpenOp:
    return OpenOp(call_id, CallOpened(at=now_us(), agent_id="agent"), None)


def said(call_id: str, text: str) -> EventOp:
    return EventOp(call_id, UserText(at=now_us(), text=text))


def user_texts(directory: Path, call_id: str) -> list[str]:
    return [e.text for e in stored_events(directory, call_id) if isinstance(e, UserText)]


def call_state(directory: Path, call_id: str) -> str | None:
    with sqlite3.connect(directory / "wal.sqlite") as conn:
        row = conn.execute("SELECT state FROM calls WHERE id = ?", (call_id,)).fetchone()
    return None if row is None else str(row[0])


def test_close_keeps_what_a_child_dying_during_close_did_not_commit(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child dies before committing the last frame, while the bot closes: the bot
    records that frame itself (it used to see the child's end as the close's own, and
    lose the frame)."""
    monkeypatch.setenv("PIPECAT_ROARK_CRASH_AT", "before-commit:2")
    writer = process_writer(data_dir)
    writer.submit(open_op("call-1"))
    assert writer.flush_sync(CLOSE_S), "the first frame is committed by the child"
    for text in ("one", "two", "three"):
        writer.submit(said("call-1", text))
    writer.submit(FinalizeOp("call-1", now_us(), "completed"))
    assert writer.close(CLOSE_S)
    assert writer.fell_back is not None, "the child was killed at its second commit"
    assert user_texts(data_dir, "call-1") == ["one", "two", "three"]
    assert call_state(data_dir, "call-1") == "ended"


def open_fds() -> set[str]:
    return {fd.name for fd in Path("/proc/self/fd").iterdir()}


@pytest.mark.parametrize("crash", [None, "before-commit"], ids=["clean", "child-killed"])
def test_close_leaves_no_pipe_to_the_child_open(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, crash: str | None
) -> None:
    """Once closed (after a clean exit of the child, or after it was killed and this
    process recorded in its place), no end of the child's pipes is left open here."""
    if crash is not None:
        monkeypatch.setenv("PIPECAT_ROARK_CRASH_AT", crash)
    process_writer(data_dir).close(CLOSE_S)  # the database exists: its files stay out
    before = open_fds()
    writer = process_writer(data_dir)
    writer.submit(open_op("call-1"))
    writer.submit(FinalizeOp("call-1", now_us(), "completed"))
    assert writer.close(CLOSE_S)
    assert (writer.fell_back is not None) == (crash is not None)
    assert open_fds() - before == set(), "the writer (still referenced) holds no pipe end"


def test_a_session_refused_for_a_reused_call_id_stays_unrecorded_after_a_fallback(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call id already recorded: the child refuses the second session, then dies. The
    bot's own writer must go on refusing it, not append the second session's records to
    the earlier call (it did: the refusal lived only in the dead child)."""
    earlier = process_writer(data_dir)
    earlier.submit(open_op("reused"))
    earlier.submit(said("reused", "the earlier call"))
    earlier.submit(FinalizeOp("reused", now_us(), "completed"))
    assert earlier.close(CLOSE_S)

    monkeypatch.setenv("PIPECAT_ROARK_CRASH_AT", "before-commit:2")
    writer = process_writer(data_dir)
    writer.submit(open_op("reused"))  # refused by the child: the id is recorded
    writer.submit(open_op("bystander"))  # the child's first commit
    assert writer.flush_sync(CLOSE_S)
    writer.submit(said("reused", "the second session"))
    writer.submit(said("bystander", "still here"))  # the child dies before this commit
    assert writer.flush_sync(CLOSE_S)
    writer.submit(said("reused", "the second session, after the fallback"))
    writer.submit(FinalizeOp("reused", now_us(), "completed"))
    writer.submit(FinalizeOp("bystander", now_us(), "completed"))
    assert writer.close(CLOSE_S)
    assert writer.fell_back is not None
    assert user_texts(data_dir, "reused") == ["the earlier call"]
    assert user_texts(data_dir, "bystander") == ["still here"]
    assert call_state(data_dir, "bystander") == "ended"


FORKING_BOT = """
import os, sys
from collections.abc import Callable
from pathlib import Path
from pipecat_roark.events import CallOpened, UserText
from pipecat_roark.lifecycle import writer_for
from pipecat_roark.ops import ChunkOp, EventOp, FinalizeOp, OpenOp
from pipecat_roark.store import now_us

directory = Path(sys.argv[1])

def record(call_id):
    writer = writer_for(directory, process=True, max_spool_bytes=1 << 30, min_free_bytes=0)
    writer.submit(OpenOp(call_id, CallOpened(at=now_us(), agent_id="agent"), None))
    writer.submit(EventOp(call_id, UserText(at=now_us(), text=call_id)))
    writer.submit(FinalizeOp(call_id, now_us(), "completed"))
    return writer

parent = record("parent")
assert parent.flush_sync(60)
hold_read, hold_write = os.pipe()
pid = os.fork()
if pid == 0:  # the fork records a call of its own, and lives on until the parent closed
    print("fork closed", record("forked").close(60), flush=True)
    os.read(hold_read, 1)
    os._exit(0)
print("parent closed", parent.close(10), flush=True)
os.write(hold_write, b"x")
os.waitpid(pid, 0)
"""


def test_a_forked_bot_records_its_own_calls_and_the_parent_still_closes(
    data_dir: Path,
) -> None:
    """After ``os.fork()`` the fork holds a copy of the parent's writer without its
    threads, and copies of the pipe to the child. The fork's calls were queued to no one
    (lost), and while the fork lived, the parent's close waited for an end of input the
    child never saw. Now the fork starts a writer of its own, and the parent closes."""
    bot = subprocess.run(
        [sys.executable, "-c", FORKING_BOT, str(data_dir)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert bot.returncode == 0, bot.stderr
    assert "parent closed True" in bot.stdout, bot.stdout
    assert "fork closed True" in bot.stdout, bot.stdout
    assert user_texts(data_dir, "parent") == ["parent"]
    assert user_texts(data_dir, "forked") == ["forked"]
    assert call_state(data_dir, "forked") == "ended"


def test_the_child_is_not_given_the_api_key(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child only writes the database: it has no use for the key, and a copy of it in
    another process's environment is one more place to leak it from (a core dump, a
    ``ps e``)."""
    monkeypatch.setenv("ROARK_API_KEY", "rk-writer-child-must-not-see")
    writer = process_writer(data_dir)
    try:
        assert writer.flush_sync(CLOSE_S)  # the child runs
        assert writer.child_pid is not None
        environ = Path(f"/proc/{writer.child_pid}/environ").read_bytes()
    finally:
        assert writer.close(CLOSE_S)
    read = b"PIPECAT_ROARK_WRITER_OWNER=" in environ
    leaked = b"rk-writer-child-must-not-see" in environ
    assert read, "the child's own environment was read"
    assert not leaked, "the key is in the child's environment"


def wait_for_log(logs: LogCapture, needle: str) -> None:
    for _ in range(600):  # bounded: 60 s
        if logs.matching(needle):
            return
        time.sleep(0.1)
    pytest.fail(f"never logged: {needle!r}")


def point(link: Path, target: Path) -> None:
    """Make ``link`` a symlink to ``target`` in one step (a rename over the old link)."""
    fresh = link.with_name(link.name + ".new")
    fresh.symlink_to(target)
    fresh.replace(link)


def test_records_wait_for_a_database_that_is_unusable_when_the_child_dies(
    tmp_path: Path, logs: LogCapture
) -> None:
    """The child dies while the data directory is unusable (here: it leads under a plain
    file), so the bot cannot open a writer of its own either. What it holds, and what comes
    meanwhile, waits and is recorded once the directory is back, as the writer thread keeps
    a refusing database's records and retries. (Every record from then on was dropped for
    the rest of the process, with one line logged.)"""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "blocker").write_bytes(b"a file, not a directory")
    data_dir = tmp_path / "roark"
    point(data_dir, real)
    writer = process_writer(data_dir)
    try:
        writer.submit(open_op("call-1"))
        writer.submit(said("call-1", "before"))
        assert writer.flush_sync(CLOSE_S)
        point(data_dir, tmp_path / "blocker" / "roark")
        assert writer.child_pid is not None
        writer.submit(said("call-1", "sent to the child"))
        os.kill(writer.child_pid, signal.SIGKILL)
        wait_for_log(logs, "cannot be recorded from this process either")
        writer.submit(said("call-1", "while nothing can record"))
        point(data_dir, real)
        assert writer.flush_sync(CLOSE_S), "recorded once the directory is back"
        writer.submit(FinalizeOp("call-1", now_us(), "completed"))
    finally:
        assert writer.close(CLOSE_S)
    assert user_texts(real, "call-1") == [
        "before",
        "sent to the child",
        "while nothing can record",
    ]
    assert call_state(real, "call-1") == "ended"


def test_identical_events_are_each_recorded_once_across_a_fallback(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two events with identical bodies (same fact, same microsecond): one committed and
    acknowledged, then one more and a pair the child commits without acknowledging (their
    frame waits for a chunk file), and one it never commits. The fallback left out every
    stored body once, whatever its count: the uncommitted twin of an acknowledged event was
    lost, and of a committed pair one was recorded again."""
    monkeypatch.setenv("PIPECAT_ROARK_CRASH_AT", "before-commit:3")
    at = now_us()  # one microsecond for all: identical bodies
    twin = EventOp("call-1", UserText(at=at, text="same"))
    pair = EventOp("call-1", UserText(at=at, text="pair"))
    writer = process_writer(data_dir)
    writer.submit(open_op("call-1"))
    writer.submit(open_op("audio"))
    writer.submit(twin)
    assert writer.flush_sync(CLOSE_S), "commit 1: acknowledged"
    # A chunk (its row waits for its file, and its frame's acknowledgement with it) and
    # the pair, committed at once (commit 2); then the twin: the child dies before commit 3
    # (the twin's, or the chunk row's with it).
    writer.submit(ChunkOp("audio", 0, bytes(8 << 20), 16000, 2, now_us()))
    writer.submit(pair)
    writer.submit(pair)
    for _ in range(600):  # bounded: 60 s
        if user_texts(data_dir, "call-1").count("pair") == 2:
            break
        time.sleep(0.1)
    writer.submit(twin)
    assert writer.flush_sync(CLOSE_S)
    writer.submit(FinalizeOp("call-1", now_us(), "completed"))
    writer.submit(FinalizeOp("audio", now_us(), "completed"))
    assert writer.close(CLOSE_S)
    assert writer.fell_back is not None
    texts = user_texts(data_dir, "call-1")
    assert texts == ["same", "pair", "pair", "same"], texts


def wait_until(predicate: Callable[[], bool]) -> None:
    for _ in range(600):  # bounded: 60 s
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail("the child never got there")


def test_a_call_the_child_opened_without_acknowledging_it_is_adopted(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child commits a call's open but dies before acknowledging its frame (the frame
    waits for a chunk file): the bot's writer takes the call over; the open is not given
    to it again (it would refuse it as a reused id, and the rest of the call with it)."""
    monkeypatch.setenv("PIPECAT_ROARK_CRASH_AT", "before-commit:3")
    writer = process_writer(data_dir)
    writer.submit(open_op("audio"))
    assert writer.flush_sync(CLOSE_S), "commit 1"
    writer.submit(ChunkOp("audio", 0, bytes(8 << 20), 16000, 2, now_us()))
    writer.submit(open_op("call-2"))
    writer.submit(said("call-2", "opened"))  # commit 2; the chunk's row is commit 3
    wait_until(lambda: user_texts(data_dir, "call-2") == ["opened"])
    writer.submit(said("call-2", "after"))
    assert writer.flush_sync(CLOSE_S)
    writer.submit(FinalizeOp("call-2", now_us(), "completed"))
    writer.submit(FinalizeOp("audio", now_us(), "completed"))
    assert writer.close(CLOSE_S)
    assert writer.fell_back is not None
    assert user_texts(data_dir, "call-2") == ["opened", "after"]
    assert call_state(data_dir, "call-2") == "ended"


def test_a_second_session_right_after_the_first_stays_refused_after_a_fallback(
    data_dir: Path,
) -> None:
    """One call id, two sessions in a row, the second opened before the end of the first
    was acknowledged (here: in the same frame). That acknowledgement forgot the second
    session's open, so the fallback could not screen it again, and its records went into
    the first call."""
    writer = process_writer(data_dir)
    # Queued while the sender thread starts the child: its first frame holds them all.
    writer.submit(open_op("reused"))
    writer.submit(said("reused", "the first session"))
    writer.submit(FinalizeOp("reused", now_us(), "completed"))
    writer.submit(open_op("reused"))  # refused by the child: the id is recorded
    assert writer.flush_sync(CLOSE_S)
    assert writer.child_pid is not None
    os.kill(writer.child_pid, signal.SIGKILL)
    writer.submit(said("reused", "the second session"))
    writer.submit(FinalizeOp("reused", now_us(), "completed"))
    assert writer.close(CLOSE_S)
    assert writer.fell_back is not None
    assert user_texts(data_dir, "reused") == ["the first session"]


FROZEN_BOT = """
import sys
import threading
from pathlib import Path
from pipecat_roark.events import CallOpened
from pipecat_roark.ops import FinalizeOp, OpenOp
from pipecat_roark.store import now_us
from pipecat_roark.writer_process import ProcessWriter

# What PyInstaller and its kin set: sys.executable is the application itself.
sys.frozen = True
sys.executable = sys.argv[2]
writer = ProcessWriter(Path(sys.argv[1]), max_spool_bytes=1 << 30, min_free_bytes=0)
writer.submit(OpenOp("frozen", CallOpened(at=now_us(), agent_id="agent"), None))
writer.submit(FinalizeOp("frozen", now_us(), "completed"))
print("closed", writer.close(60), writer.fell_back, flush=True)
"""


def test_a_frozen_application_records_itself_and_never_runs_its_own_executable(
    data_dir: Path, tmp_path: Path
) -> None:
    """In a frozen application ``sys.executable`` is the application: ``-m
    pipecat_roark.writer_child`` started another copy of the bot (which, ignoring the
    arguments, could start writer children of its own). It records in this process."""
    marker = tmp_path / "the application ran again"
    application = tmp_path / "frozen-bot"
    application.write_text(f'#!/bin/sh\necho "$@" > "{marker}"\n')
    application.chmod(0o700)
    bot = subprocess.run(
        [sys.executable, "-c", FROZEN_BOT, str(data_dir), str(application)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert bot.returncode == 0, bot.stderr
    assert "closed True" in bot.stdout, bot.stdout
    assert not marker.exists(), marker.read_text()
    assert call_state(data_dir, "frozen") == "ended"


def test_what_the_childs_interpreter_prints_does_not_garble_its_answers(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child's answers came on its stdout, where anything its interpreter prints goes
    too (here a ``sitecustomize``, as a debugging hook or an import-time notice would):
    the bot read those bytes as answers, out of step with the real ones, so commits went
    unacknowledged (or a stray ``C`` acknowledged frames that were not committed)."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text('print("Custom site hook: C is for commit")\n')
    monkeypatch.setenv("PYTHONPATH", f"{hooks}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    writer = process_writer(data_dir)
    try:
        writer.submit(open_op("call-1"))
        writer.submit(said("call-1", "hello"))
        assert writer.flush_sync(CLOSE_S)
        writer.submit(FinalizeOp("call-1", now_us(), "completed"))
    finally:
        assert writer.close(CLOSE_S)
    assert writer.fell_back is None
    assert user_texts(data_dir, "call-1") == ["hello"]


def test_close_after_a_fallback_waits_for_this_process_writer(data_dir: Path) -> None:
    """After a fallback, close gave this process's writer its default 5 s and then said
    True whatever it had committed: here the database is locked by another connection for
    longer than that, and close returned True with the last records still in memory."""
    writer = process_writer(data_dir)
    writer.submit(open_op("call-1"))
    assert writer.flush_sync(CLOSE_S)
    assert writer.child_pid is not None
    os.kill(writer.child_pid, signal.SIGKILL)
    assert writer.flush_sync(CLOSE_S), "recorded by this process's writer"
    assert writer.fell_back is not None
    lock = sqlite3.connect(data_dir / "wal.sqlite", isolation_level=None, check_same_thread=False)
    lock.execute("BEGIN IMMEDIATE")  # another process's long write transaction
    released = threading.Event()

    def release_later() -> None:
        time.sleep(8.0)  # longer than the 5 s close gave that writer
        lock.execute("COMMIT")
        lock.close()
        released.set()

    writer.submit(said("call-1", "while the database is locked"))
    writer.submit(FinalizeOp("call-1", now_us(), "completed"))
    holder = threading.Thread(target=release_later)
    holder.start()
    try:
        closed = writer.close(CLOSE_S)
        after_the_lock = released.is_set()
        texts = user_texts(data_dir, "call-1")
    finally:
        holder.join()
    assert closed
    assert after_the_lock, "close said True while the records waited for the lock"
    assert texts == ["while the database is locked"]


@pytest.fixture
def descriptors_above_1024() -> Iterator[None]:
    """A bot with many open files (sockets of many calls): its next pipes are numbered
    above 1024, where ``select.select`` refuses them (``FD_SETSIZE``)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"at most {hard} open files here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.usefixtures("descriptors_above_1024")
def test_a_bot_with_more_than_1024_open_files_still_hears_its_writer_child(
    data_dir: Path,
) -> None:
    """The answers' reader thread waited with ``select.select``, which raises on a
    descriptor numbered 1024 or more: the thread died at once, a flush without a loop
    timed out and close waited forever for answers nobody read. The sender's wait for
    room in a full pipe did the same, and the sender thread died with it."""
    writer = process_writer(data_dir)
    try:
        writer.submit(open_op("call-1"))
        assert writer.flush_sync(CLOSE_S), "the answer was read"
        audio = bytes(range(256)) * (4 << 12)  # 1 MiB a chunk: the pipe fills
        for index in range(8):
            writer.submit(ChunkOp("call-1", index, audio, 16000, 2, now_us()))
        writer.submit(said("call-1", "after the audio"))
        assert writer.flush_sync(CLOSE_S), "the sender waited for room and wrote it all"
        writer.submit(FinalizeOp("call-1", now_us(), "completed"))
    finally:
        assert writer.close(CLOSE_S)
    assert writer.fell_back is None
    assert user_texts(data_dir, "call-1") == ["after the audio"]
    with sqlite3.connect(data_dir / "wal.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM chunks").fetchone() == (8,)


def test_a_flush_in_one_loop_is_answered_while_the_loop_that_reads_answers_is_blocked(
    data_dir: Path,
) -> None:
    """Two loops in two threads record into one writer; the one that reads the child's
    answers is stuck in a blocking call. The other loop's flush waited for it (and timed
    out), though its records were committed."""
    writer = process_writer(data_dir)
    attached, unblock = threading.Event(), threading.Event()

    def blocked_loop() -> None:
        async def call() -> None:
            writer.submit(open_op("reads"))
            assert await writer.flush(CLOSE_S)  # the child is up
            writer.submit(said("reads", "attached"))  # written, and read, by this loop
            assert await writer.flush(CLOSE_S)
            attached.set()
            unblock.wait(2 * CLOSE_S)  # a blocking call in the loop

        asyncio.run(call())

    async def other_call() -> bool:
        writer.submit(open_op("other"))
        return await writer.flush(CLOSE_S)

    stuck = threading.Thread(target=blocked_loop)
    stuck.start()
    try:
        assert attached.wait(CLOSE_S)
        flushed = asyncio.run(other_call())
    finally:
        unblock.set()
        stuck.join()
        assert writer.close(CLOSE_S)
    assert flushed
    assert writer.fell_back is None


HOLDER = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)  # a copy of the child's answers' write end
print("holding", flush=True)
sys.stdin.read()  # until the test lets go
"""


@pytest.fixture
def answers_write_end_held_elsewhere() -> Iterator[Callable[[int], None]]:
    """Another process (a grandchild, a fork of the bot) holding a copy of the writer
    child's answers' write end: their end never comes, whatever the child does."""
    holders: list[subprocess.Popen[str]] = []

    def hold(child_pid: int) -> None:
        argv = Path(f"/proc/{child_pid}/cmdline").read_bytes().split(b"\0")
        answers_fd = int(argv[argv.index(b"--answers-fd") + 1])
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, f"/proc/{child_pid}/fd/{answers_fd}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        holders.append(holder)
        assert holder.stdout is not None
        assert holder.stdout.readline() == "holding\n"

    yield hold
    for holder in holders:
        holder.kill()
        holder.communicate()  # (closes the pipes to it)


def test_a_child_killed_while_another_process_holds_its_answers_is_still_replaced(
    data_dir: Path, answers_write_end_held_elsewhere: Callable[[int], None]
) -> None:
    """The bot learned of the child's death only from the end of its answers: with a copy
    of their write end in another process, it never came, and the bot's records waited
    for a dead child for good. The bot also watches the child's exit now."""
    writer = process_writer(data_dir)
    writer.submit(open_op("call-1"))
    assert writer.flush_sync(CLOSE_S)
    assert writer.child_pid is not None
    answers_write_end_held_elsewhere(writer.child_pid)
    os.kill(writer.child_pid, signal.SIGKILL)
    writer.submit(said("call-1", "after the child died"))
    try:
        assert writer.flush_sync(CLOSE_S), "recorded by this process's writer"
        writer.submit(FinalizeOp("call-1", now_us(), "completed"))
    finally:
        assert writer.close(CLOSE_S)
    assert writer.fell_back is not None and "-9" in writer.fell_back
    assert user_texts(data_dir, "call-1") == ["after the child died"]
    assert call_state(data_dir, "call-1") == "ended"


def test_a_flush_waiting_on_a_stopped_child_is_answered_by_this_process(
    data_dir: Path,
) -> None:
    """A child stopped with SIGSTOP neither answers nor exits: a flush waited its whole
    limit, and every flush after it. A child that owes answers and says nothing for
    ``STALL_S`` is killed now, and this process records what it did not acknowledge."""
    writer = process_writer(data_dir)
    writer.submit(open_op("call-1"))
    assert writer.flush_sync(CLOSE_S)
    child = writer.child_pid
    assert child is not None
    os.kill(child, signal.SIGSTOP)
    try:
        writer.submit(said("call-1", "to a stopped child"))
        assert writer.flush_sync(CLOSE_S), "recorded by this process's writer"
        writer.submit(FinalizeOp("call-1", now_us(), "completed"))
    finally:
        assert writer.close(CLOSE_S)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    assert writer.fell_back is not None and "said nothing" in writer.fell_back
    assert user_texts(data_dir, "call-1") == ["to a stopped child"]
    assert call_state(data_dir, "call-1") == "ended"


def test_close_with_a_stopped_child_and_a_full_pipe_is_bounded_and_keeps_everything(
    data_dir: Path,
) -> None:
    """The child is stopped and the pipe to it full: the sender waited for room without a
    limit, so close never even reached the child, and the records stayed in memory."""
    writer = process_writer(data_dir)
    writer.submit(open_op("call-1"))
    assert writer.flush_sync(CLOSE_S)
    child = writer.child_pid
    assert child is not None
    os.kill(child, signal.SIGSTOP)
    audio = bytes(range(256)) * (4 << 12)  # 1 MiB a chunk: the pipe fills
    try:
        for index in range(4):
            writer.submit(ChunkOp("call-1", index, audio, 16000, 2, now_us()))
        writer.submit(said("call-1", "after the audio"))
        writer.submit(FinalizeOp("call-1", now_us(), "completed"))
        assert writer.close(CLOSE_S), "close finished"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    assert writer.fell_back is not None
    assert user_texts(data_dir, "call-1") == ["after the audio"]
    assert call_state(data_dir, "call-1") == "ended"
    with sqlite3.connect(data_dir / "wal.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM chunks").fetchone() == (4,)


C_FORKING_BOT = """
import ctypes, os, sys
from pathlib import Path
from pipecat_roark.events import CallOpened, UserText
from pipecat_roark.lifecycle import writer_for
from pipecat_roark.ops import EventOp, FinalizeOp, OpenOp
from pipecat_roark.store import now_us

directory = Path(sys.argv[1])
writer = writer_for(directory, process=True, max_spool_bytes=1 << 30, min_free_bytes=0)
writer.submit(OpenOp("call-1", CallOpened(at=now_us(), agent_id="agent"), None))
writer.submit(EventOp("call-1", UserText(at=now_us(), text="before the fork")))
assert writer.flush_sync(60)
hold_read, hold_write = os.pipe()
# A C library's fork (no Python at-fork hook runs): the copy holds every descriptor of
# the bot, the child's stdin among them, until the bot lets it go.
pid = ctypes.PyDLL(None).fork()
if pid == 0:
    os.read(hold_read, 1)
    os._exit(0)
writer.submit(EventOp("call-1", UserText(at=now_us(), text="after the fork")))
writer.submit(FinalizeOp("call-1", now_us(), "completed"))
print("closed", writer.close(60), flush=True)
os.write(hold_write, b"x")
os.waitpid(pid, 0)
"""


def test_close_ends_even_when_a_c_level_fork_holds_the_childs_stdin(data_dir: Path) -> None:
    """A fork made in C (a native library; Python's at-fork hooks do not run) holds a copy
    of the child's stdin: the child never saw the end of its input, and the bot's close
    waited for the child's last word for good. The child owes its exit once its input is
    closed: silent past ``STALL_S``, it is killed; everything was committed already."""
    bot = subprocess.run(
        [sys.executable, "-c", C_FORKING_BOT, str(data_dir)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert bot.returncode == 0, bot.stderr
    assert "closed True" in bot.stdout, (bot.stdout, bot.stderr[-2000:])
    assert user_texts(data_dir, "call-1") == ["before the fork", "after the fork"]
    assert call_state(data_dir, "call-1") == "ended"
