"""Whether the writer child still answers what the bot waits for, and ending it, bounded.

The end of the child's answers pipe is not proof enough of its death, nor its silence of
its life: a process forked from the bot (a C library's ``fork()``, which runs none of
Python's at-fork hooks) or a grandchild may hold a copy of a pipe's end, so the end
never comes; a child stopped with SIGSTOP, or deadlocked, neither answers nor exits.
So the bot never waits on the child without a limit. It is judged by what it owes:
while frames wait for its acknowledgement, or its exit after the bot closed its input,
a child that has said nothing for ``STALL_S`` (``START_S`` before its first word: it
may still be importing on a loaded machine) is stuck. The bot then kills it and records
what it did not acknowledge itself (``writer_recovery``): SQLite keeps a killed
transaction out, so nothing is lost or recorded twice.

A working child is rarely silent that long while it owes: it says what is committed at
most ``writer_child.ACK_S`` after each commit, and its first word as soon as its database
is open. One commit that takes longer (a disk stalled for seconds) gets it replaced all
the same: correct, only slower, and said in one error line.

A pipe's end the bot holds for a child only for a moment (between ``os.pipe()`` and the
spawn, or the spawn and the owner storing it) is ``HiddenFromForks``: a Python fork of
the bot in that moment (another thread's ``os.fork``, ``multiprocessing``) closes its
copy at once. (A descriptor is closed at ``exec`` anyway; a bare fork keeps it.)
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time

from loguru import logger

from .answer_reader import WATCH_S, AnswerReader

__all__ = [
    "START_S",
    "STALL_S",
    "ChildWatch",
    "HiddenFromForks",
    "end_child",
    "ended_why",
    "exit_of",
    "reap",
    "silent_why",
    "stalled",
    "unwritable_why",
    "wait_for_last_word",
]

STALL_S = 10.0
"""How long a child that owes the bot an answer may say nothing before it is stuck: long
enough for a cloud disk's stalled ``fsync`` of several seconds, which would otherwise cost
the bot its child for the rest of its life."""
START_S = 20.0
"""The same, before the child's first word (its interpreter starting, its database opening)."""
_EXIT_WAIT_S = 2.0
"""How long a child whose pipe refused a frame or ended is given to exit (to say why)."""
_REAP_S = 5.0
"""How long a killed child is waited for (SIGKILL ends even a stopped process at once; a
process in uninterruptible sleep is left to ``subprocess``'s own reaping)."""


class ChildWatch:
    """When the child last spoke, and since when it owes the bot an answer.

    Plain attribute stores and reads, from any thread (the loop or the reader's thread
    hears, the sender or a waiting flush judges): a race costs at most one judgment made
    from the later of the two times, never a child judged stuck early.
    """

    def __init__(self) -> None:
        """Nothing owed, nothing heard yet."""
        self._started_at = time.monotonic()
        self._heard_at: float | None = None
        self._owed_since: float | None = None
        self._exit_owed = False

    def heard(self) -> None:
        """The child said something (any answer)."""
        self._heard_at = time.monotonic()

    def owe(self) -> None:
        """Something is owed from now on, unless something already was."""
        if self._owed_since is None:
            self._owed_since = time.monotonic()

    def owe_exit(self) -> None:
        """Its input is closed: its exit is owed from now on, whatever it acknowledges."""
        self._exit_owed = True
        self._owed_since = time.monotonic()

    def settled(self, still_owed: bool) -> None:
        """An acknowledgement came: owed from now if frames remain (or its exit), else not."""
        self._owed_since = time.monotonic() if still_owed or self._exit_owed else None

    def stuck(self) -> bool:
        """True if the child owes an answer and has been silent past its limit.

        Returns:
            Whether to stop waiting for it.
        """
        owed = self._owed_since
        if owed is None:
            return False
        heard = self._heard_at
        limit = START_S if heard is None else STALL_S
        quiet_since = max(owed, self._started_at if heard is None else heard)
        return time.monotonic() - quiet_since >= limit


def end_child(child: subprocess.Popen[bytes], reader: AnswerReader | None = None) -> None:
    """Kill ``child`` if it still runs, reap it, and read what it said (all bounded).

    The reader sees the exit even if the end of the answers never comes.
    """
    with contextlib.suppress(OSError):  # (already reaped: nothing to kill)
        child.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(_REAP_S)
    if reader is not None:
        reader.finish(STALL_S)


def wait_for_last_word(
    reader: AnswerReader, child: subprocess.Popen[bytes], watch: ChildWatch, talking_s: float
) -> None:
    """Its input closed: wait for the end of the child's answers, never without a limit.

    A child silent past ``STALL_S`` (stopped, deadlocked, or never told its input ended:
    a fork of the bot holds a copy of its stdin) is killed; what it did not acknowledge
    is the bot's to record. One that keeps talking gets ``talking_s`` (as long as its own
    writer may take to close).
    """
    deadline = time.monotonic() + talking_s
    while not reader.finish(WATCH_S):
        if watch.stuck() or time.monotonic() >= deadline:
            logger.warning(
                f"pipecat-roark: the writer process {child.pid} did not finish after its "
                f"input ended ({stalled()} without a word); killing it"
            )
            end_child(child, reader)  # and what it said before it died
            return


def reap(child: subprocess.Popen[bytes]) -> None:
    """Reap a child that is exiting (its answers ended, or it was killed), bounded.

    One still there after ``STALL_S`` is killed.
    """
    try:
        child.wait(STALL_S)
    except subprocess.TimeoutExpired:
        end_child(child)


def stalled() -> str:
    """``STALL_S`` for a log line.

    Returns:
        ``"10 s"``, say.
    """
    return f"{STALL_S:.0f} s"


def silent_why(child: subprocess.Popen[bytes] | None) -> str:
    """Why a child that owes answers is given up on.

    Returns:
        One clause naming its pid and how long it said nothing.
    """
    return f"the writer process {_pid(child)} said nothing for {stalled()}"


def exit_of(child: subprocess.Popen[bytes] | None) -> str:
    """How the child ended, without waiting for it.

    Returns:
        One clause naming its pid and exit status (or that it is still there).
    """
    if child is None:
        return "the writer process did not start"
    code = child.poll()
    if code is None:
        return f"the writer process {child.pid} stopped answering"
    return f"the writer process {child.pid} exited with status {code}"


def ended_why(child: subprocess.Popen[bytes] | None) -> str:
    """Why the child's answers ended: its exit status, once it has one (bounded wait).

    Returns:
        The exit, or that it closed its answers and did not exit.
    """
    with contextlib.suppress(subprocess.TimeoutExpired):
        if child is not None:
            child.wait(_EXIT_WAIT_S)  # its answers ended: it is exiting
    return exit_of(child)


def unwritable_why(child: subprocess.Popen[bytes] | None, exc: Exception) -> str:
    """Why a frame could not be written: the child's exit status, once it has one.

    Returns:
        The exit, or the write's error if the child is still there after a moment.
    """
    if isinstance(exc, TimeoutError):  # it read nothing and said nothing: stuck
        return f"the writer process {_pid(child)} read nothing for {stalled()}"
    with contextlib.suppress(subprocess.TimeoutExpired):
        if child is not None:
            child.wait(_EXIT_WAIT_S)  # it closed its stdin: it is exiting
            return exit_of(child)
    return f"the writer process cannot be written to ({exc})"


def _pid(child: subprocess.Popen[bytes] | None) -> str:
    return "(not started)" if child is None else str(child.pid)


_HIDDEN: set[int] = set()
"""Descriptors a fork of this process closes at once (see ``HiddenFromForks``)."""


class HiddenFromForks:
    """Descriptors that a fork of this process closes at once, before it runs anything else.

    ``release`` one before closing it here: a number closed while hidden could be reused
    by another thread for another file, which a fork would then close.
    """

    def __init__(self, *fds: int) -> None:
        """Hide ``fds`` from forks from now on."""
        self._fds: set[int] = set()
        for fd in fds:
            self.add(fd)

    def add(self, fd: int) -> None:
        """Hide ``fd`` too."""
        self._fds.add(fd)
        _HIDDEN.add(fd)

    def release(self, *fds: int) -> None:
        """Stop hiding ``fds`` (all of them if none is named): closed, or owned elsewhere now."""
        for fd in fds or tuple(self._fds):
            self._fds.discard(fd)
            _HIDDEN.discard(fd)


def _close_hidden_in_fork() -> None:
    for fd in list(_HIDDEN):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HIDDEN.clear()


os.register_at_fork(after_in_child=_close_hidden_in_fork)
