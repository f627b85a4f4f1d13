"""The writer child: the bot's durable writer, in a process of its own (``writer_process``).

``python -m pipecat_roark.writer_child --dir DIR``, started by the bot's
``ProcessWriter``: a ``Writer`` fed from stdin. The bot's calls are recorded under the
bot's owner identity (it comes in the environment), so a checker judges the bot, not this
child, when it asks whether a call's process is gone.

After each frame a barrier tells the bot what is committed; the bot keeps every frame
until then and, if this child dies, gives them to a writer of its own. At EOF (the bot
closed the pipe, or died: the kernel closes it for a process killed with SIGKILL) the
writer commits everything it was given and the child exits 0. It runs in a session of its
own, so the terminal's Ctrl-C reaches only the bot, which then closes the pipe.

While it lives it holds the bot's owner lock (``owner_lock``; the bot took it and passes
it with ``--owner-lock-fd``), so no drainer ends the bot's calls while this child may still
commit records of them; a clean exit removes the lock file once everything is committed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

from loguru import logger

from . import owner_lock
from .ops import BarrierOp
from .owner import Owner
from .scheduling import run_as_batch_work
from .writer import Writer
from .writer_pipe import (
    COMMITTED,
    DELIVERIES,
    LOG,
    MESSAGE,
    RELEASED,
    RemoteBarrier,
    decode_frame,
    write_all,
)

__all__ = ["ENV_OWNER", "main", "owner_from_env", "owner_to_env"]

ENV_OWNER = "PIPECAT_ROARK_WRITER_OWNER"
"""The bot's owner (``host``, ``pid`` and token, tab-separated), for the child's rows."""
DELIVERIES_S = 0.1
"""How often at most the child says that commits added deliveries (see ``_Replies``)."""
ACK_S = 0.1
"""How often at most the child says what is committed (see ``_Replies``)."""
_PUMP_S = 0.01
"""How long the child gathers before it answers, once something is to be said."""
CLOSE_TIMEOUT_S = 120.0
"""How long the child's writer may take to commit what it holds once the bot is gone."""


def owner_to_env(owner: Owner) -> str:
    """The bot's owner as the child reads it back.

    Returns:
        ``host``, ``pid`` and token, tab-separated.
    """
    return f"{owner.host}\t{owner.pid}\t{owner.token}"


def owner_from_env(value: str | None) -> Owner | None:
    """The owner ``owner_to_env`` wrote, or None if it is missing or malformed.

    Returns:
        The bot's owner, or None (the child then records under its own).
    """
    try:
        host, pid, token = (value or "").split("\t")
        return Owner(host=host, pid=int(pid), token=token)
    except ValueError:
        return None


class _Replies:
    """Writes the child's messages to the bot; any thread, one message at a time.

    Each answer wakes a thread of the bot, which costs the bot more CPU than the answer's
    work, so answers are few. A flush's release goes at once (someone waits for it).
    That a commit added deliveries goes at once after a quiet ``DELIVERIES_S`` (the end
    of a call is delivered without delay), else once per ``DELIVERIES_S``. What is
    committed goes at most every ``ACK_S``, the latest only: the bot needs it only to let
    go of its copies.

    The pump sleeps until the next answer is due, not in ``_PUMP_S`` steps: at 50
    real-time calls the steps woke it 100 times a second, one of every ten wake-ups of
    the children on the bot's two CPUs (issue 12, eighth pass).
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._gone = False
        self._committed = 0
        self._said_committed = 0
        self._committed_said_at = 0.0
        self._deliveries = False
        self._deliveries_said_at = 0.0
        self._due = threading.Event()
        self._sooner = threading.Event()
        """Something may be due before the pump's sleep ends (deliveries were added)."""
        self._saying = threading.Lock()
        threading.Thread(target=self._pump, name="pipecat-roark-answers", daemon=True).start()

    def committed(self, seq: int) -> None:
        """Frames up to ``seq`` are committed (the writer thread, in order)."""
        self._committed = seq
        self._due.set()

    def deliveries_added(self) -> None:
        """A commit added deliveries (the writer thread): a drainer waits for that word."""
        with self._saying:
            self._deliveries = True
        if self.say_what_is_due(time.monotonic()) is None:
            return
        self._due.set()
        self._sooner.set()  # a pump asleep until a later answer is due wakes for this one

    def say_what_is_due(self, now: float, *, everything: bool = False) -> float | None:
        """Send what is due by ``now`` (``everything``: all of it, the last word at exit).

        Returns:
            Seconds until the rest may be said, or None when nothing is left to say.
        """
        with self._saying:
            waits = []
            if self._deliveries:
                due_at = self._deliveries_said_at + DELIVERIES_S
                if everything or now >= due_at:
                    self._deliveries, self._deliveries_said_at = False, now
                    self.send(DELIVERIES, 0)
                else:
                    waits.append(due_at - now)
            committed = self._committed
            if committed != self._said_committed:
                due_at = self._committed_said_at + ACK_S
                if everything or now >= due_at:
                    self._said_committed, self._committed_said_at = committed, now
                    self.send(COMMITTED, committed)
                else:
                    waits.append(due_at - now)
            return min(waits) if waits else None

    def _pump(self) -> None:
        while True:
            self._due.wait()
            time.sleep(_PUMP_S)  # what else comes meanwhile goes in the same answer
            while True:
                self._due.clear()  # (before saying: what comes after it wakes us again)
                self._sooner.clear()
                wait = self.say_what_is_due(time.monotonic())
                if wait is None:
                    break
                self._sooner.wait(wait)

    def send(self, kind: bytes, number: int, payload: bytes = b"") -> None:
        with self._lock:
            if self._gone:
                return
            try:
                write_all(self._fd, MESSAGE.pack(kind, number) + payload)
            except OSError:  # the bot is gone: what it left is committed all the same
                self._gone = True

    def log(self, message: Any) -> None:
        """A loguru sink: the line goes to the bot, which logs it with its own sinks."""
        record = message.record
        text = f"{record['level'].name}\t{record['message']}".encode(errors="replace")
        self.send(LOG, len(text), text)
        if self._gone:  # no bot to say it: stderr, as a process of its own would
            sys.stderr.write(str(message))


def _feed(writer: Writer, replies: _Replies) -> None:
    """Submit every frame from stdin to ``writer`` until EOF.

    Raises:
        FrameUnreadable: a frame did not decode (the bot writes it itself).
    """
    stdin = sys.stdin.fileno()
    while True:
        try:
            frame = decode_frame(stdin)
        except EOFError:
            logger.warning("pipecat-roark: the bot died while sending records; keeping the rest")
            return
        except Exception as exc:  # a frame we cannot read: the bot replays it into its own
            raise FrameUnreadable(f"{type(exc).__name__}: {exc}") from exc
        if frame is None:
            return
        seq, ops = frame
        for op in ops:
            if isinstance(op, RemoteBarrier):
                writer.submit(BarrierOp(partial(replies.send, RELEASED, op.number), op.call_id))
            else:
                writer.submit(op)
        writer.submit(BarrierOp(partial(replies.committed, seq)))


class FrameUnreadable(Exception):
    """A frame from the bot did not decode: exit, so the bot writes it itself."""


def _leave_stopping_to_the_bot() -> None:
    """Ignore SIGTERM and SIGINT: the child stops when the bot closes its pipe, or dies.

    A service manager's stop signals every process of the service at once (systemd's
    default control-group kill; ``pkill -f`` by a deploy script). Dying of it here would
    leave the bot's own SIGTERM handling, which ends its open calls through this child,
    to fall back to a writer of its own mid-shutdown. Nothing would be lost, but the
    stop would cost an error line and a replay; ignored, the child commits what the bot
    sends it and exits when the bot is done. A SIGKILL still ends it.
    """
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    """Run the writer child until the bot closes its pipe.

    Returns:
        0 once everything received is committed; 1 if the writer could not be started.
    """
    parser = argparse.ArgumentParser(prog="python -m pipecat_roark.writer_child")
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--max-spool-bytes", type=int, required=True)
    parser.add_argument("--min-free-bytes", type=int, required=True)
    parser.add_argument("--answers-fd", type=int, required=True)
    parser.add_argument("--owner-lock-fd", type=int, default=None)
    args = parser.parse_args(argv)
    _leave_stopping_to_the_bot()
    run_as_batch_work()
    replies = _Replies(args.answers_fd)
    logger.remove()
    logger.add(replies.log, level="INFO", format="{message}")
    owner = owner_from_env(os.environ.get(ENV_OWNER))
    try:
        writer = Writer(
            args.dir,
            max_spool_bytes=args.max_spool_bytes,
            min_free_bytes=args.min_free_bytes,
            owner=owner,
        )
    except Exception as exc:
        logger.error(f"pipecat-roark: the writer process cannot open {args.dir} ({exc})")
        return 1
    writer.add_commit_listener(replies.deliveries_added)
    replies.send(COMMITTED, 0)  # the first word: the bot judges this child's silence from here
    code = 0
    try:
        _feed(writer, replies)
    except FrameUnreadable as exc:
        logger.error(
            f"pipecat-roark: the writer process read a frame it cannot decode ({exc}); "
            "exiting so the bot records it itself. Please report this"
        )
        code = 1
    finally:
        closed = writer.close(CLOSE_TIMEOUT_S)
        if not closed:
            logger.error(
                f"pipecat-roark: the writer process for {args.dir} did not finish committing "
                f"in {CLOSE_TIMEOUT_S:.0f} s; run `pipecat-roark status`"
            )
        elif args.owner_lock_fd is not None and owner is not None:
            # Everything is committed: nothing more of the bot's calls will come from here.
            owner_lock.release(args.dir, owner.token, args.owner_lock_fd)
        replies.say_what_is_due(time.monotonic(), everything=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
